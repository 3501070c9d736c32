"""``describe``: the bytes of the optimizer state the user built, attributed by path."""

from __future__ import annotations

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


def test_bad_arguments_are_refused():
  with pytest.raises(TypeError, match="an optimizer or its state, not both"):
    q.describe(_params(), optax.adamw(1e-3), state=())
  with pytest.raises(TypeError, match=r"\['quantization'\] configure the default"):
    q.describe(_params(), optax.adamw(1e-3), quantization=q.Int8Quantization())


def test_missing_rules_warning_once_per_optimizer_not_per_trace():
  params = {"mlp": {"kernel": jnp.ones((8, 8))}}
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
