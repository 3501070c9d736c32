"""Block partition: default rules, overrides, errors, block means."""

import contextlib
import functools
import re
import warnings

import chex
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qadam_mini_jax as q
from qadam_mini_jax import partition as P
import tiny_models as tm

S = jax.ShapeDtypeStruct


def _specs(params, partition=None):
  flat = jax.tree_util.tree_flatten_with_path(
      q.block_specs(params, partition or q.BlockPartition()),
      is_leaf=lambda x: x is None or isinstance(x, q.BlockSpec))[0]
  return {P.path_str(p): s for p, s in flat}


def test_nnx_llama_rules_and_block_shapes():
  model = tm.NnxLlama(nnx.Rngs(0))
  part = q.BlockPartition(num_heads=tm.HEADS, num_kv_heads=tm.KV_HEADS)
  specs = _specs(nnx.state(model, nnx.Param), part)
  expected = {  # path: (rule, keep-dims v shape)
      "embed/embedding": ("embedding", (tm.VOCAB, 1)),
      "layers/0/attn/q_proj/kernel": ("query", (1, tm.HEADS)),
      "layers/0/attn/k_proj/kernel": ("key", (1, tm.KV_HEADS)),
      "layers/0/attn/v_proj/kernel": ("value", (1, tm.KV_HEADS * tm.HEAD_DIM)),
      "layers/0/attn/o_proj/kernel": ("attn_out", (1, tm.DIM)),
      "layers/0/mlp/gate_proj/kernel": ("mlp", (1, tm.FFN)),
      "layers/0/mlp/up_proj/kernel": ("mlp", (1, tm.FFN)),
      "layers/0/mlp/down_proj/kernel": ("mlp", (1, tm.DIM)),
      "layers/0/attn_norm/scale": ("whole", (1,)),
      "norm/scale": ("whole", (1,)),
      "lm_head/kernel": ("output", (1, tm.VOCAB)),
  }
  state = nnx.state(model, nnx.Param)
  shapes = {P.path_str(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
  assert set(specs) == set(expected) | {"layers/0/mlp_norm/scale"}
  for path, (rule, vshape) in expected.items():
    assert specs[path].rule == rule, path
    assert P.block_shape(specs[path], shapes[path]) == vshape, path


def test_linen_3d_kernels_read_heads_from_shape():
  params = tm.LinenLm().init(jax.random.key(0), tm.tokens(jax.random.key(1)))
  specs = _specs(params)  # no head count given: 3-D kernels carry it
  h, d = tm.HEADS, tm.DIM // tm.HEADS
  assert specs["params/attn/query/kernel"] == q.BlockSpec((0, 2), None, "query")
  assert specs["params/attn/key/kernel"] == q.BlockSpec((0, 2), None, "key")
  assert P.block_shape(specs["params/attn/value/kernel"], (tm.DIM, h, d)) == (1, h, d)
  assert specs["params/attn/out/kernel"] == q.BlockSpec((0, 1), None, "attn_out")
  assert specs["params/attn/query/bias"].rule == "per_element"
  assert specs["params/embed/embedding"].rule == "embedding"


def test_whole_component_matching_not_substrings():
  params = {"kiln": {"kernel": S((8, 8), jnp.float32)},          # contains "ln"
            "keyboard": {"kernel": S((8, 8), jnp.float32)},      # starts with "key"
            "wkv": {"kernel": S((8, 8), jnp.float32)},           # contains "wk"
            "embedding_norm": {"scale": S((8, 8), jnp.float32)},
            "head_mlp_out": {"kernel": S((8, 8), jnp.float32)}}
  assert {k.split("/")[0]: s.rule for k, s in _specs(params).items()} == {
      "kiln": "whole", "keyboard": "whole", "wkv": "whole",
      "embedding_norm": "whole", "head_mlp_out": "whole"}


def test_value_as_one_block_and_head_dim():
  params = {"attn": {"q_proj": {"kernel": S((16, 24), jnp.float32)},   # 3 heads of 8
                     "k_proj": {"kernel": S((16, 8), jnp.float32)},    # 1 kv head
                     "v_proj": {"kernel": S((16, 8), jnp.float32)}}}
  specs = _specs(params, q.BlockPartition(head_dim=8, value_as_one_block=True))
  assert specs["attn/q_proj/kernel"].heads == (1, 3)
  assert specs["attn/k_proj/kernel"].heads == (1, 1)
  assert specs["attn/v_proj/kernel"] == q.BlockSpec((0, 1), None, "value")


def test_query_key_per_neuron():
  params = {"attn": {"q_proj": {"kernel": S((16, 24), jnp.float32)},
                     "k_proj": {"kernel": S((16, 8), jnp.float32)},
                     "query": {"kernel": S((16, 3, 8), jnp.float32)}},   # DenseGeneral
            "mlp": {"up_proj": {"kernel": S((16, 32), jnp.float32)}}}
  part = q.BlockPartition(head_dim=8, query_key_per_neuron=True)
  specs = _specs(params, part)
  assert specs["attn/q_proj/kernel"] == q.BlockSpec((0,), None, "query")
  assert specs["attn/k_proj/kernel"] == q.BlockSpec((0,), None, "key")
  assert specs["attn/query/kernel"] == q.BlockSpec((0,), None, "query")
  assert specs["mlp/up_proj/kernel"] == q.BlockSpec((0,), None, "mlp")
  g = jnp.arange(16 * 24, dtype=jnp.float32).reshape(16, 24)
  np.testing.assert_allclose(P.block_mean(g, specs["attn/q_proj/kernel"]),
                             np.asarray(g).mean(axis=0, keepdims=True))  # one v per column


def test_fused_qkv_is_one_block_per_head():
  params = {"attn": {"qkv_proj": {"kernel": S((16, (4 + 2 * 2) * 4), jnp.float32)}}}
  spec = _specs(params, q.BlockPartition(num_heads=4, num_kv_heads=2))["attn/qkv_proj/kernel"]
  assert spec == q.BlockSpec((0,), (1, 8), "fused_qkv")


def test_user_rules_dict_and_callable_take_precedence():
  params = {"blocks": {"0": {"mixer": {"kernel": S((8, 12), jnp.float32)}}},
            "tok": {"table": S((10, 8), jnp.float32)},
            "mlp": {"fc1": {"kernel": S((8, 8), jnp.float32)}}}
  rules = {"tok/table": "embedding", r"mixer/kernel": q.BlockSpec((0,), (1, 3)),
           "mlp/fc1/kernel": lambda path, shape: q.BlockSpec((0, 1), rule="mine")}
  specs = _specs(params, q.BlockPartition(rules=rules))
  assert specs["tok/table"].rule == "embedding"
  assert specs["blocks/0/mixer/kernel"].heads == (1, 3)
  assert specs["mlp/fc1/kernel"].rule == "mine"
  fn = lambda path, shape: "whole" if path.endswith("table") else None
  specs = _specs(params, q.BlockPartition(rules=fn))
  assert specs["tok/table"].rule == "whole"
  assert specs["mlp/fc1/kernel"].rule == "mlp"  # None: defaults still apply


@pytest.mark.parametrize("partition, params, message", [
    (q.BlockPartition(num_heads=5), {"attn": {"q_proj": {"kernel": S((16, 16), jnp.float32)}}},
     "attn/q_proj/kernel: query axis 1 of size 16 does not split into 5 heads"),
    (q.BlockPartition(), {"attn": {"q_proj": {"kernel": S((16, 16), jnp.float32)}}},
     "attn/q_proj/kernel: the query rule needs the head count"),
    (q.BlockPartition(rules={"norm/scale": "embedding"}), {"norm": {"scale": S((16,), jnp.float32)}},
     "norm/scale: the embedding rule needs a kernel of rank >= 2"),
    (q.BlockPartition(rules={"w": q.BlockSpec((2,))}), {"w": S((4, 4), jnp.float32)},
     "w: block axes (2,) are invalid"),
    (q.BlockPartition(rules={"w": q.BlockSpec((0,), (1, 3))}), {"w": S((4, 4), jnp.float32)},
     "w: axis 1 of size 4 does not split into 3 heads"),
    (q.BlockPartition(rules={"w": "per_token"}), {"w": S((4, 4), jnp.float32)},
     "w: unknown rule name 'per_token'"),
    # A rule of the wrong type: neither a name, a BlockSpec nor a callable.
    (q.BlockPartition(rules={"w": 3}), {"w": S((4, 4), jnp.float32)},
     "w: a rule must be a name, a BlockSpec or a callable, got 3."),
    (q.BlockPartition(rules={"w": (0,)}), {"w": S((4, 4), jnp.float32)},
     "w: a rule must be a name, a BlockSpec or a callable, got (0,)."),
    (q.BlockPartition(rules=lambda path, shape: 3), {"w": S((4, 4), jnp.float32)},
     "w: a rule must be a name, a BlockSpec or a callable, got 3."),
    # A callable rule returning something else than a BlockSpec.
    (q.BlockPartition(rules={"w": lambda path, shape: (0,)}), {"w": S((4, 4), jnp.float32)},
     "w: a rule returned (0,), not a BlockSpec."),
    (q.BlockPartition(rules={"w": lambda path, shape: None}), {"w": S((4, 4), jnp.float32)},
     "w: a rule returned None, not a BlockSpec."),
    (q.BlockPartition(rules=lambda path, shape: lambda p, s: "whole"),
     {"w": S((4, 4), jnp.float32)},
     "w: a rule returned 'whole', not a BlockSpec."),
    # head_dim that does not divide the axis it splits.
    (q.BlockPartition(head_dim=5), {"attn": {"q_proj": {"kernel": S((16, 16), jnp.float32)}}},
     "attn/q_proj/kernel: query axis 1 of size 16 is not a multiple of head_dim=5 "
     "(shape (16, 16))"),
    (q.BlockPartition(head_dim=3), {"attn": {"qkv": {"kernel": S((16, 32), jnp.float32)}}},
     "attn/qkv/kernel: fused_qkv axis 1 of size 32 is not a multiple of head_dim=3"),
    (q.BlockPartition(rules={"w": q.BlockSpec((1,), (1, 2))}), {"w": S((4, 4), jnp.float32)},
     "w: heads axis 1 is invalid for shape (4, 4) and axes (1,)"),
    (q.BlockPartition(num_heads=2), {"attn": {"q_proj": {"kernel": S((4, 4, 2, 2), jnp.float32)}}},
     "attn/q_proj/kernel: the query rule expects (in, heads*head_dim) or (in, heads, head_dim), "
     "got shape (4, 4, 2, 2)"),
    # out_in (PyTorch) kernels are checked through their (in, out) view: the message says so
    # and gives the leaf's own shape.
    (q.BlockPartition(num_heads=5, kernel_layout="out_in"),
     {"attn": {"q_proj": {"weight": S((16, 8), jnp.float32)}}},
     "attn/q_proj/weight: query axis 1 of size 16 does not split into 5 heads (shape (8, 16)) "
     "(kernel_layout='out_in': axes and shape of its (in, out...) view (8, 16); the leaf's "
     "shape is (16, 8))."),
])
def test_bad_rules_raise_at_init_with_path(partition, params, message):
  with pytest.raises(q.PartitionError, match=re.escape(message)):
    q.adam_mini(1e-3, partition=partition).init(
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params))


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_heads=0), "BlockPartition.num_heads must be a positive int, got 0."),
    (dict(num_kv_heads=-1), "BlockPartition.num_kv_heads must be a positive int, got -1."),
    (dict(head_dim=0), "BlockPartition.head_dim must be a positive int, got 0."),
    (dict(num_heads=4.0), "BlockPartition.num_heads must be a positive int, got 4.0."),
    (dict(num_heads=True), "BlockPartition.num_heads must be a positive int, got True."),
    (dict(kernel_layout="torch"),
     "BlockPartition.kernel_layout must be one of ('in_out', 'out_in'), got 'torch'."),
    (dict(kernel_layout="OUT_IN"),
     "BlockPartition.kernel_layout must be one of ('in_out', 'out_in'), got 'OUT_IN'."),
    (dict(rules="whole"), "BlockPartition.rules must be a mapping from path patterns to rules "
     "or a callable (path, shape) -> rule, got 'whole'."),
    (dict(rules=[("w", "whole")]), "BlockPartition.rules must be a mapping"),
    (dict(layers=["layers"]), "BlockPartition.layers must be a mapping from path patterns to "
     "layer axes, got ['layers']."),
    (dict(layers={"layers": "0"}), "BlockPartition.layers['layers'] must be an int or a tuple "
     "of ints (layer axis positions), got '0'."),
    (dict(layers={"layers": (0, 1.0)}), "BlockPartition.layers['layers'] must be an int"),
])
def test_bad_partition_arguments(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    q.BlockPartition(**kwargs)


def test_warns_when_no_embedding_or_attention_found():
  with pytest.warns(UserWarning, match="found no embedding, output, query, key"):
    q.adam_mini(1e-3).init({"w": jnp.zeros((4, 4))})
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    model = tm.NnxLlama(nnx.Rngs(0))
    q.adam_mini(1e-3, partition=q.BlockPartition(num_heads=4, num_kv_heads=2)).init(
        nnx.state(model, nnx.Param))


def test_block_mean_and_broadcast_match_numpy():
  x = np.random.default_rng(0).normal(size=(6, 12)).astype(np.float32)
  heads = q.BlockSpec((0,), (1, 3))
  want = np.stack([x[:, 4 * h:4 * h + 4].mean() for h in range(3)])[None, :]
  np.testing.assert_allclose(P.block_mean(jnp.asarray(x), heads), want, rtol=1e-6)
  expanded = np.asarray(P.broadcast_block(jnp.asarray(want), heads, x.shape))
  np.testing.assert_array_equal(expanded, np.repeat(want, 4, axis=1).repeat(6, axis=0))
  rows = q.BlockSpec((1,))
  np.testing.assert_allclose(P.block_mean(jnp.asarray(x), rows), x.mean(1, keepdims=True), rtol=1e-6)
  chex.assert_shape(P.block_mean(jnp.asarray(x), q.BlockSpec((0, 1))), (1, 1))


MAXTEXT = {  # MaxText with scan_layers: the layer axis at position 1 (param_scan_axis=1)
    "decoder/layers/self_attention/query/kernel": (64, 3, 4, 16),   # (emb, L, heads, head_dim)
    "decoder/layers/self_attention/key/kernel": (64, 3, 2, 16),
    "decoder/layers/self_attention/value/kernel": (64, 3, 2, 16),
    "decoder/layers/self_attention/out/kernel": (4, 3, 16, 64),     # (heads, L, head_dim, emb)
    "decoder/layers/mlp/wi_0/kernel": (64, 3, 256),
    "decoder/layers/mlp/wo/kernel": (256, 3, 64),
    "decoder/layers/pre_self_attention_layer_norm/scale": (64, 3),
    "decoder/decoder_norm/scale": (64,),
    "token_embedder/embedding": (100, 64),
    "decoder/logits_dense/kernel": (64, 100),
}


def test_maxtext_scanned_tree_keeps_the_layer_axis():
  part = q.BlockPartition(num_heads=4, num_kv_heads=2, layers={"decoder/layers": 1})
  specs = _specs(tm.nest({k: S(s, jnp.float32) for k, s in MAXTEXT.items()}), part)
  v = {k: q.partition.block_shape(specs[k], s) for k, s in MAXTEXT.items()}
  assert v["decoder/layers/self_attention/query/kernel"] == (1, 3, 4, 1)   # per head, per layer
  assert v["decoder/layers/self_attention/key/kernel"] == (1, 3, 2, 1)
  assert v["decoder/layers/mlp/wi_0/kernel"] == (1, 3, 256)               # per output neuron
  assert v["decoder/layers/mlp/wo/kernel"] == (1, 3, 64)
  assert v["decoder/layers/pre_self_attention_layer_norm/scale"] == (1, 3)  # one per layer
  assert v["decoder/decoder_norm/scale"] == (1,)
  assert v["token_embedder/embedding"] == (100, 1)
  assert specs["decoder/layers/mlp/wo/kernel"].layers == (1,)
  assert specs["token_embedder/embedding"].layers == ()


@pytest.mark.parametrize("layers, path, shape, match", [
    (None, "layers/attn/q_proj/kernel", (3, 64, 64), r"contradicts num_heads.*BlockPartition\(layers"),
    (None, "layers/attn/k_proj/kernel", (3, 64, 32), r"contradicts"),
    ({"layers": 2}, "layers/mlp/up_proj/kernel", (3, 64), r"layer axes \(2,\).*do not fit"),
    (None, "layers/mlp/up_proj/kernel", (3, 64, 256), r"mlp kernel is \(in, out\).*layers="),
    (None, "layers/lm_head/kernel", (2, 64, 100), r"output kernel is \(in, out\)"),
    ({"layers": (0, 0)}, "layers/mlp/up_proj/kernel", (3, 64, 256),
     r"^layers/mlp/up_proj/kernel: layer axes \(0, 0\).*do not fit shape \(3, 64, 256\)"),
    ({"layers": -1}, "layers/mlp/up_proj/kernel", (3, 64, 256), r"layer axes \(-1,\).*do not fit"),
])
def test_shapes_that_contradict_the_rules_fail_loudly(layers, path, shape, match):
  part = q.BlockPartition(num_heads=4, num_kv_heads=2, layers=layers)
  with pytest.raises(q.PartitionError, match=match):
    part.spec(path, shape)


def test_default_decay_mask_by_rule_stacked_or_not():
  params = tm.nest({k: jnp.zeros(s) for k, s in {
      "embed/embedding": (100, 16), "layers/attn/q_proj/kernel": (3, 16, 16),
      "layers/attn/q_proj/bias": (3, 16), "layers/attn_norm/scale": (3, 16),
      "layers/ln_1/scale": (3, 16), "final_norm/scale": (16,), "lm_head/kernel": (16, 100)}.items()})
  stacked = q.BlockPartition(num_heads=4, layers={"layers": 0})
  mask = {P.path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(
      q.default_decay_mask(params, stacked))[0]}
  assert mask == {"embed/embedding": True, "layers/attn/q_proj/kernel": True,
                  "layers/attn/q_proj/bias": False, "layers/attn_norm/scale": False,
                  "layers/ln_1/scale": False, "final_norm/scale": False, "lm_head/kernel": True}
  no_embed = q.default_decay_mask(params, stacked, embeddings=False)
  assert not no_embed["embed"]["embedding"] and no_embed["lm_head"]["kernel"]


class _ScannedBlock(nnx.Module):
  def __init__(self, rngs):
    kernel = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
    self.up_proj = nnx.Linear(8, 16, kernel_init=kernel, rngs=rngs)  # bias not annotated
    self.norm = nnx.RMSNorm(8, rngs=rngs)


def test_recorded_layers_from_nnx_scan_metadata():
  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def stack(rngs):
    return _ScannedBlock(rngs)

  with nnx.use_eager_sharding(False):
    state = nnx.state(nnx.Dict(layers=stack(nnx.Rngs(0))), nnx.Param)
  layers = q.recorded_layers(state)
  assert layers == {"layers": (0,)}
  specs = _specs(state, q.BlockPartition(layers=layers))
  assert specs["layers/up_proj/kernel"].axes == (1,)            # per neuron of each layer
  assert specs["layers/norm/scale"] == q.BlockSpec((1,), None, "whole", (0,))  # unannotated


def test_recorded_layers_from_linen_scan_metadata():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      kernel = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
      return nn.Dense(8, kernel_init=kernel, name="up_proj")(x), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.scan(Block, variable_axes={"params": 1}, split_rngs={"params": True}, length=3,
                     metadata_params={nn.PARTITION_NAME: "layers"})(name="layers")(x, None)[0]

  params = Stack().init(jax.random.key(0), jnp.ones((2, 8)))["params"]
  layers = q.recorded_layers(params)
  assert layers == {"layers": (1,)}
  specs = _specs(nn.unbox(params), q.BlockPartition(layers=layers))
  assert specs["layers/up_proj/kernel"] == q.BlockSpec((0,), None, "mlp", (1,))
  assert specs["layers/up_proj/bias"].layers == (1,)


def test_layer_loop_writes_each_layer_over_its_stacked_input():
  """Layer axes 0 and 2 of a (2, 3, 4, 5) stack: every layer (row-major index over
  the layer axes) is computed from its own slices and written back in place."""
  x = jnp.arange(120, dtype=jnp.float32).reshape(2, 3, 4, 5)
  pair = (jnp.ones((2, 3, 4, 5)), jnp.full((4, 7, 2), 2.0))  # a pytree with its own layer axes
  c = jnp.arange(8, dtype=jnp.float32).reshape(2, 1, 4, 1)

  def one(layer, x, pair, c, shared):
    return x * c + shared + layer, (pair[0] * layer, pair[1] + x.sum())

  out, (a, b) = jax.jit(lambda x, pair, c: P.layer_loop(
      one, (2, 4), (x, pair), ((0, 2), ((0, 2), (2, 0))), (c, 10.0), ((0, 2), None)))(x, pair, c)
  xs, cs = np.asarray(x), np.asarray(c)
  for i in range(2):
    for j in range(4):
      layer = i * 4 + j
      np.testing.assert_array_equal(out[i, :, j], xs[i, :, j] * cs[i, 0, j, 0] + 10.0 + layer)
      np.testing.assert_array_equal(a[i, :, j], np.full((3, 5), layer))
      np.testing.assert_array_equal(b[j, :, i], np.full(7, 2.0 + xs[i, :, j].sum()))


def test_layer_loop_copies_no_layer_of_its_loop_state():
  """An Adam-like loop whose parameter write reads the moments' layers: each layer
  is read once into loop state and written in place, never copied (reading the
  next layer of one stack before every write had read this one, XLA copied each
  layer of every stack at every iteration)."""
  def adam_layer(layer, p, m, v, g):
    del layer
    m, v = 0.9 * m + g, 0.99 * v + g * g
    return p - 0.1 * m / jnp.sqrt(v + 1e-8), m, v

  stack = jax.ShapeDtypeStruct((4, 48, 40), jnp.float32)
  step = jax.jit(lambda p, m, v, g: P.layer_loop(adam_layer, (4,), (p, m, v), ((0,),) * 3,
                                                 (g,), ((0,),)), donate_argnums=(0, 1, 2))
  hlo = step.lower(stack, stack, stack, stack).compile().as_text()
  copies = re.findall(r"= f32\[48,40\]\S* copy\(", hlo)
  assert not copies, copies


def test_materialized_returns_its_arrays_bit_for_bit_through_a_conditional():
  """The values (signed zeros, NaN, integers, empty arrays) come back unchanged, and
  XLA keeps the conditional that writes them (its predicate is not a constant to it)."""
  tree = {"a": jnp.array([[-0.0, jnp.nan], [jnp.inf, 1.5]]), "b": jnp.arange(3, dtype=jnp.int8),
          "c": jnp.zeros((0, 2), jnp.bfloat16)}
  materialize = jax.jit(P.materialized)
  out = materialize(tree)
  for k in tree:
    chex.assert_equal_shape((out[k], tree[k]))
    assert out[k].dtype == tree[k].dtype
    np.testing.assert_array_equal(np.asarray(out[k]).view(np.uint8),
                                  np.asarray(tree[k]).view(np.uint8))
  assert " conditional(" in materialize.lower(tree).compile().as_text()


def test_updates_wait_for_lets_a_metric_read_the_gradient_before_the_loop_writes_over_it():
  """A loop that writes each layer's direction over its gradient, beside a norm of
  that gradient: XLA copies the whole stack for the norm unless the loop waits for
  it (``updates_wait_for``); the values are the same either way."""
  def step(g, m, wait):
    norm = jnp.sum(g * g)
    with P.updates_wait_for(norm) if wait else contextlib.nullcontext():
      out, m = P.layer_loop(lambda layer, g, m: (0.5 * (m + g), m + g), (4,), (g, m),
                            ((0,), (0,)))
    return out, m, norm

  g = jax.random.normal(jax.random.key(0), (4, 48, 40))
  m = jax.random.normal(jax.random.key(1), (4, 48, 40))
  results = {}
  for wait in (False, True):
    fn = jax.jit(functools.partial(step, wait=wait), donate_argnums=(0, 1))
    hlo = fn.lower(g, m).compile().as_text()
    results[wait] = (re.findall(r"= f32\[4,48,40\]\S* copy\(", hlo), fn(g + 0, m + 0))
  assert results[False][0], "without waiting, XLA no longer copies the stack: the test shows nothing"
  assert not results[True][0], results[True][0]
  chex.assert_trees_all_equal(results[False][1], results[True][1])
  np.testing.assert_array_equal(results[True][1][0], 0.5 * (m + g))


@pytest.mark.parametrize("flag", [False, True])
def test_read_after_makes_integer_arrays_depend_on_the_arrays_and_keeps_every_value(flag):
  """Codes and token ids come back equal but computed from ``arrays`` (through a
  conditional with a flag); float arrays come back as they are."""
  def fn(codes, x, a, count):
    return P.read_after({"codes": codes, "x": x}, [a], count > 0 if flag else None)
  args = (jnp.arange(-3, 3, dtype=jnp.int8), jnp.array([-0.0, jnp.nan]), jnp.ones(()),
          jnp.array(-5))
  out = jax.jit(fn)(*args)
  np.testing.assert_array_equal(out["codes"], args[0])
  assert out["codes"].dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(out["x"]).view(np.uint32),
                                np.asarray(args[1]).view(np.uint32))
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  codes_out, x_out = jaxpr.outvars
  assert x_out is jaxpr.invars[1]
  (add,) = [e for e in jaxpr.eqns if codes_out in e.outvars]
  assert jaxpr.invars[2] in tm.computed_from(jaxpr, add)
  assert any(e.primitive.name == "cond" for e in jaxpr.eqns) == flag


def test_run_after_runs_fn_once_the_arrays_exist_inside_a_conditional():
  def fn(x, a):
    return P.run_after([a], lambda x: {"y": jnp.cumsum(x), "n": x.size}, x)
  x, a = jnp.arange(5.0), jnp.ones(())
  out = jax.jit(fn)(x, a)
  np.testing.assert_array_equal(out["y"], jnp.cumsum(x))
  assert out["n"] == 5
  jaxpr = jax.make_jaxpr(fn)(x, a).jaxpr
  (cond,) = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
  assert jaxpr.invars[1] in tm.computed_from(jaxpr, cond)
  assert " conditional(" in jax.jit(fn).lower(x, a).compile().as_text()


def test_updates_wait_for_refuses_what_is_not_an_array():
  with pytest.raises(TypeError, match="argument 1 is float"):
    with P.updates_wait_for(jnp.zeros(()), 1.0):
      pass


def test_layer_loop_reads_its_first_layer_after_the_arrays_it_is_given():
  """``after``: the first layer's read (made before the loop) is computed from those
  arrays, so XLA cannot make it at the step's start; without them it is not."""
  for after in (False, True):
    jaxpr = jax.make_jaxpr(lambda s, a: P.layer_loop(
        lambda layer, p: (2 * p,), (3,), (s,), ((0,),), after=(a,) if after else ()))(
            jnp.zeros((3, 8)), jnp.ones(())).jaxpr
    (loop,) = [e for e in jaxpr.eqns if e.primitive.name in ("scan", "while")]
    assert (jaxpr.invars[1] in tm.computed_from(jaxpr, loop)) == after, after
