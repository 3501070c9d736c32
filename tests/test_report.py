"""``describe``: the bytes of the optimizer state the user built, attributed by path."""

from __future__ import annotations

import math
import re
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import qadam_mini_jax as q
import tiny_models as tm

pytestmark = pytest.mark.filterwarnings("ignore:Adam-mini partition found no")

# An MLP with an embedding and an output layer; (in, out) kernels.
SHAPES = {"embed/embedding": (128, 64), "mlp/kernel": (256, 64), "mlp/bias": (64,),
          "norm/scale": (64,), "lm_head/kernel": (64, 128)}


def _params():
  return tm.nest({p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in SHAPES.items()})


def _rows(table):
  """{path: state bytes} of a describe table, and its total line."""
  lines = table.splitlines()
  rows = {l.split()[0]: int(l.split()[-1].replace(",", "")) for l in lines[1:-1]
          if not l.startswith("(")}
  return rows, lines


def test_q_adam_mini_reports_int8_bytes_not_adam_minis():
  rows, lines = _rows(q.describe(_params(), q.q_adam_mini(1e-3)))
  # By hand: 16,384 int8 codes; groups run down each of the 64 columns (256
  # rows: one group each): 64 fp32 scales; v per output neuron: 64 fp32.
  assert rows["mlp/kernel"] == 16_384 + 64 * 4 + 64 * 4
  # Rows of 64 < 256: the table is one row of 32 groups; v per token.
  assert rows["embed/embedding"] == 8192 + 32 * 4 + 128 * 4
  # Under min_size 4096 elements: fp32 m; v per tensor, per element for biases.
  assert rows["norm/scale"] == 64 * 4 + 4
  assert rows["mlp/bias"] == 64 * 4 + 64 * 4  # plain Adam: v per element
  n = sum(x.size for x in jax.tree.leaves(_params()))
  state = jax.eval_shape(q.q_adam_mini(1e-3).init, _params())
  total = q.tree_nbytes(state)
  assert lines[-1].endswith(f"{total:,} ({total / n:.4f} B/param)")
  assert lines[-2].startswith("(not per parameter)")  # step count and rounding key
  assert int(lines[-2].split()[-1]) == total - sum(rows.values()) == 4 + 8
  # The default (no optimizer) is adam_mini's float m: the bytes differ.
  float_rows, _ = _rows(q.describe(_params()))
  assert float_rows["mlp/kernel"] == 16_384 * 4 + 64 * 4
  # ... unless told the quantization.
  int8_rows, _ = _rows(q.describe(_params(), quantization=q.Int8Quantization()))
  assert int8_rows == rows


def test_any_optax_state_is_attributed_by_path():
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  rows, lines = _rows(q.describe(_params(), tx))
  for path, shape in SHAPES.items():
    assert rows[path] == 8 * int(jnp.prod(jnp.asarray(shape)))  # mu and nu in fp32
  state = tx.init(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _params()))
  assert q.describe(_params(), state=state) == "\n".join(lines)  # a state built already


def test_nnx_optimizer_state_with_stacked_layers():
  partition = q.BlockPartition(num_heads=tm.HEADS, num_kv_heads=tm.KV_HEADS)
  tx = q.q_adam_mini(1e-3, partition=partition, quantization=q.Int8Quantization(min_size=256))
  params = nnx.state(nnx.eval_shape(lambda: tm.NnxLlama(nnx.Rngs(0))), nnx.Param)
  opt = nnx.eval_shape(lambda: nnx.Optimizer(tm.NnxLlama(nnx.Rngs(0)), tx, wrt=nnx.Param))
  table = q.describe(params, state=nnx.state(opt, nnx.optimizer.OptState), partition=partition)
  rows, lines = _rows(table)
  # int8 codes (512) + 2 fp32 scales (rows of 16 < 256: one row of two groups)
  # + fp32 v per token (32 * 4)
  assert rows["embed/embedding"] == 512 + 2 * 4 + 32 * 4
  assert lines[0].split() == ["path", "shape", "rule", "blocks", "state", "bytes"]
  assert next(l for l in lines if l.startswith("embed/embedding")).split()[-3:-1] == [
      "embedding", "32"]
  stacked = {"layers": {"mlp": {"kernel": jax.ShapeDtypeStruct((3, 64, 96), jnp.float32)}}}
  layered = q.BlockPartition(layers={"layers": 0})
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # no embedding in this tree
    table = q.describe(stacked, q.q_adam_mini(1e-3, partition=layered), partition=layered)
  row = next(l for l in table.splitlines() if l.startswith("layers/mlp/kernel"))
  assert "per layer (axes (0,))" in row and row.split()[-2] == "288"  # 3 layers x 96 neurons
  assert int(row.split()[-1].replace(",", "")) == 3 * (64 * 96 + 96 * 4 + 96 * 4)


def test_int8_weights_with_the_fused_optimizer():
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), _params())
  qp = jax.eval_shape(lambda: q.quantize_params(params, q.BlockPartition(), q.Int8Quantization()))
  assert q.weights.is_quantized(qp["mlp"]["kernel"])
  rows, _ = _rows(q.describe(qp, q.fused_q_adam_mini(1e-3)))
  assert rows["mlp/kernel"] == 16_384 + 64 * 4 + 64 * 4  # the state, not the weight codes


# Stacked layers (axis 0, and axis 1 as in MaxText) next to unstacked leaves, INT8 m
# in groups of 16 for leaves (of one layer) of at least 512 elements.
STACKED_SHAPES = {"embed/embedding": (64, 16), "layers/mlp/kernel": (3, 40, 16),
                  "layers/attn/q_proj/kernel": (3, 16, 16), "layers/norm/scale": (3, 16),
                  "scan/mlp/kernel": (40, 3, 16), "lm_head/kernel": (16, 64)}
STACKED_PARTITION = q.BlockPartition(num_heads=2, layers={"layers": 0, "scan": 1})
SMALL_GROUPS = q.Int8Quantization(group_size=16, min_size=512)
# path: (shape, rule, blocks, state bytes), by hand.
STACKED_ROWS = {
    # INT8 rows of 16 (one group each, scales (64, 1)): 1024 codes + 64 fp32 scales;
    # v per token: 64 fp32.
    "embed/embedding": ("(64, 16)", "embedding", 64, 1024 + 64 * 4 + 64 * 4),
    # Each layer (40, 16): 640 >= 512 elements, INT8; groups down each column of 40
    # rows: 16, 16 and a ragged 8, so 3 x 16 fp32 scales a layer; v per neuron per layer.
    "layers/mlp/kernel": ("(3, 40, 16)", "mlp per layer (axes (0,))", 48,
                          3 * (640 + 3 * 16 * 4 + 16 * 4)),
    "scan/mlp/kernel": ("(40, 3, 16)", "mlp per layer (axes (1,))", 48,
                        3 * (640 + 3 * 16 * 4 + 16 * 4)),
    # Each layer (16, 16): 256 < 512 elements (the whole leaf's 768 are not), fp32 m;
    # v per head (2) per layer.
    "layers/attn/q_proj/kernel": ("(3, 16, 16)", "query per layer (axes (0,))", 6,
                                  3 * 256 * 4 + 6 * 4),
    "layers/norm/scale": ("(3, 16)", "whole per layer (axes (0,))", 3, 48 * 4 + 3 * 4),
    # INT8, one group down each of the 64 columns; v per token (column).
    "lm_head/kernel": ("(16, 64)", "output", 64, 1024 + 64 * 4 + 64 * 4),
}


def _columns(table):
  """{path: (shape, rule, blocks, state bytes)} of a describe table's parameter rows."""
  cells = [re.split(r"\s{2,}", line) for line in table.splitlines()[1:]]
  return {c[0]: (c[1], c[2], int(c[3]), int(c[4].replace(",", ""))) for c in cells
          if len(c) == 5 and c[3].isdigit()}


def _stacked_params():
  return tm.nest({p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in STACKED_SHAPES.items()})


def test_stacked_layers_report_per_layer_rules_blocks_and_bytes():
  """INT8 groups, min_size and blocks are those of each layer, wherever the layer axis is."""
  tx = q.q_adam_mini(1e-3, partition=STACKED_PARTITION, quantization=SMALL_GROUPS)
  table = q.describe(_stacked_params(), tx, partition=STACKED_PARTITION)
  assert _columns(table) == STACKED_ROWS
  lines = table.splitlines()
  assert re.split(r"\s{2,}", lines[-2]) == ["(not per parameter)", "counts, keys...", "12"]
  n = sum(math.prod(s) for s in STACKED_SHAPES.values())
  total = sum(row[-1] for row in STACKED_ROWS.values()) + 12
  assert total == q.tree_nbytes(jax.eval_shape(tx.init, _stacked_params()))
  assert lines[-1].split()[:3] == ["total", f"{n:,}", "params"]
  assert lines[-1].endswith(f"{total:,} ({total / n:.4f} B/param)")


def test_int8_weights_report_their_values_and_the_optimizer_state_only():
  """INT8 weights (stacked too) are reported by their float value's shape, and their
  codes and scales, which are the weights, not optimizer state, are not counted: the
  table is that of the same optimizer on float weights."""
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), _stacked_params())
  qp = jax.eval_shape(lambda: q.quantize_params(params, STACKED_PARTITION, SMALL_GROUPS))
  int8 = {q.partition.path_str(path) for path, x in jax.tree_util.tree_flatten_with_path(
      qp, is_leaf=q.weights.is_quantized)[0] if q.weights.is_quantized(x)}
  # q_proj's layers are under min_size: it stays float, as its m does.
  assert int8 == {"embed/embedding", "layers/mlp/kernel", "scan/mlp/kernel", "lm_head/kernel"}
  opt = q.fused_q_adam_mini(1e-3, partition=STACKED_PARTITION, quantization=SMALL_GROUPS)
  table = q.describe(qp, opt, partition=STACKED_PARTITION)
  assert _columns(table) == STACKED_ROWS
  chain = q.q_adam_mini(1e-3, partition=STACKED_PARTITION, quantization=SMALL_GROUPS)
  assert table == q.describe(_stacked_params(), chain, partition=STACKED_PARTITION)


def test_bad_arguments_are_refused():
  with pytest.raises(TypeError, match="an optimizer or its state, not both"):
    q.describe(_params(), optax.adamw(1e-3), state=())
  with pytest.raises(TypeError, match=r"\['quantization'\] configure the default"):
    q.describe(_params(), optax.adamw(1e-3), quantization=q.Int8Quantization())


def test_missing_rules_warning_once_per_optimizer_not_per_trace():
  # "dense" matches no rule: one block for the whole tensor, hence the warning.
  params = {"mlp": {"kernel": jnp.ones((8, 8))}, "dense": {"kernel": jnp.ones((8, 8))}}
  tx = q.q_adam_mini(1e-3)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tx.init(params)
    jax.jit(tx.init)(params)
    jax.eval_shape(tx.init, params)
    q.describe(params, tx)
    assert [str(w.message)[:29] for w in caught] == ["Adam-mini partition found no "]
    q.q_adam_mini(1e-3).init(params)  # another optimizer says it again
    assert len(caught) == 2
