"""Sharding of optimizer state (qadam_mini_jax.sharding).

Spec derivation is checked here on abstract meshes; training on 8 simulated
devices runs ``tests/multidevice`` in a process of its own
(``tests/test_multiprocess.py::test_multidevice_suite``), so this process keeps
its single device.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

import qadam_mini_jax as q
import tiny_models as tm
from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import sharding

MESH = AbstractMesh((2, 4), ("data", "fsdp"))


@pytest.mark.parametrize("shape, spec, reduced, want, cut", [
    # v of an (in, out) kernel, one block per output neuron (spanning the 4 shards of `in`)
    ((64, 128), P("fsdp"), (1, 128), P(None, None), [0]),
    ((64, 128), P(None, "fsdp"), (1, 128), P(None, "fsdp"), []),
    # 4 heads over 4 shards; 2 kv heads cannot split 4 ways (replicated, not an error for v)
    ((64, 64), P(None, "fsdp"), (1, 4), P(None, "fsdp"), []),
    ((64, 32), P(None, "fsdp"), (1, 2), P(None, None), [1]),
    # column groups (8 of 8 rows): 16 rows a shard hold 2 whole groups
    ((64, 128), P("fsdp"), (8, 128), P("fsdp", None), []),
    # 5 ragged groups of 16 over 4 shards: cut
    ((72, 128), P("fsdp"), (5, 128), P(None, None), [0]),
    # a tuple of mesh axes splits 8 ways
    ((64, 128), P(("data", "fsdp")), (8, 128), P(("data", "fsdp"), None), []),
    # rows layout merging trailing axes (embedding with a short dim): groups over 64*32
    ((64, 32), P("fsdp"), (8,), P("fsdp"), []),
    ((64, 32), P(None, "fsdp"), (8,), P(None), [1]),
    # columns layout merging leading axes (in, heads, head_dim) -> (groups, heads, head_dim)
    ((8, 4, 16), P("fsdp"), (1, 4, 16), P(None, None, None), [0]),
])
def test_reduced_spec(shape, spec, reduced, want, cut):
  got, got_cut = sharding.reduced_spec(shape, spec, MESH, reduced)
  assert tuple(got) == tuple(want)
  assert got_cut == cut


def test_unrelated_shape_is_an_error():
  with pytest.raises(q.ShardingError, match="does not derive"):
    sharding.reduced_spec((64, 128), P("fsdp"), MESH, (3, 5, 7))


def test_param_shardings_must_match_params():
  params = {"a": jax.ShapeDtypeStruct((8, 8), "float32"), "b": jax.ShapeDtypeStruct((8,), "float32")}
  with pytest.raises(q.ShardingError, match="b: param_shardings has no entry"):
    sharding.per_parameter(params, {"a": P()}, MESH)
  with pytest.raises(q.ShardingError, match="entry for 'c', which is not a parameter path"):
    sharding.per_parameter(params, {"a": P(), "b": P(), "c": P()}, MESH)
  with pytest.raises(q.ShardingError, match="b: param_shardings holds PartitionSpecs"):
    sharding.per_parameter(params, {"a": NamedSharding(MESH, P()), "b": P()})
  with pytest.raises(q.ShardingError, match="a pytree container"):
    q.state_shardings({}, params["a"], P(), mesh=MESH)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with pytest.raises(q.ShardingError, match="^a: expected a NamedSharding or PartitionSpec, got "
                     "SingleDeviceSharding"):
    sharding.per_parameter(params, {"a": device, "b": P()}, MESH)
  # A spec that does not fit its parameter or the mesh names the parameter.
  with pytest.raises(q.ShardingError, match=re.escape(
      "b: its PartitionSpec P(None, 'fsdp') has more entries than its shape (8,) has axes.")):
    q.state_shardings(params, params, {"a": P(), "b": P(None, "fsdp")}, mesh=MESH)
  with pytest.raises(q.ShardingError, match=r"^a: .*tensor.*not found in mesh"):
    q.state_shardings(params, params, {"a": P("tensor"), "b": P()}, mesh=MESH)


def test_weight_shardings_refuse_cut_int8_weight_groups():
  """An INT8 weight's scales follow its codes, and a sharding that cuts its groups
  (here 64 rows in groups of 32, split 4 ways) is an error naming the weight."""
  quantization = q.Int8Quantization(group_size=32, min_size=64)
  part = q.BlockPartition(rules={"w": "mlp"})
  qp = jax.eval_shape(lambda: q.quantize_params(
      {"w": jax.numpy.ones((64, 32)), "b": jax.numpy.ones((32,))}, part, quantization))
  assert q.weights.is_quantized(qp["w"]) and qp["w"].scales.shape == (2, 32)
  got = q.weight_shardings(qp, {"w": P(None, "fsdp"), "b": P()}, mesh=MESH)
  assert got["w"].codes.spec == P(None, "fsdp") and got["w"].scales.spec == P(None, "fsdp")
  assert got["b"].spec == P(None)
  with pytest.raises(q.ShardingError, match=re.escape(
      "w: its sharding P('fsdp',) splits axes [0] of shape (64, 32) into shards that cut INT8 "
      "quantization groups (scales of shape (2, 32))")):
    q.weight_shardings(qp, {"w": P("fsdp"), "b": P()}, mesh=MESH)


KERNEL_INT8 = q.Int8Quantization(group_size=8, min_size=64)


def _kernel_step(shapes, spec, partition, *, implementation="pallas", int8_weights=False):
  """Output shapes of one step with every leaf sharded ``spec`` on MESH, by
  ``jax.eval_shape`` (the Pallas kernel is traced in interpret mode, never compiled)."""
  params = tm.nest({p: jax.ShapeDtypeStruct(s, "float32") for p, s in shapes.items()})
  shardings = jax.tree.map(lambda _: NamedSharding(MESH, spec), params)
  kw = dict(partition=partition, quantization=KERNEL_INT8, implementation=implementation,
            shardings=shardings)
  if int8_weights:
    weights = jax.eval_shape(lambda p: q.quantize_params(p, partition, KERNEL_INT8), params)
    is_int8 = q.weights.is_quantized
    assert all(map(is_int8, jax.tree.leaves(weights, is_leaf=is_int8)))
    opt = q.fused_q_adam_mini(1e-3, **kw)
    return jax.eval_shape(lambda g, p: opt.step(g, opt.init(p), p)[0], params, weights)
  tx = q.q_adam_mini(1e-3, **kw)
  return jax.eval_shape(lambda g: tx.update(g, tx.init(g), g)[0], params)


STACKED = q.BlockPartition(rules={"w": "mlp"}, layers={"layers": 0})
# name: (shapes, partition, INT8 weights?, the spec refused, a spec the kernel runs, message)
KERNEL_SHARDING_ERRORS = {
    "stacked_layers": (
        {"layers/w": (2, 64, 32)}, STACKED, False, P(None, None, "fsdp"), P(),
        "layers/w: the fused kernel does not run per shard on stacked layers (layer axes (0,)); "
        "use implementation='xla' for this model."),
    "int8_weights": (
        {"w": (64, 32)}, q.BlockPartition(rules={"w": "mlp"}), True, P(None, "fsdp"), P(),
        "w: the fused kernel does not update sharded INT8 weights yet; use implementation='xla'."),
    "second_axis_of_a_side": (  # value (in, heads, head_dim): view (in) x (heads, head_dim)
        {"w": (8, 4, 16)}, q.BlockPartition(rules={"w": "value"}), False, P(None, None, "fsdp"),
        P(None, "fsdp"),
        "w: the fused kernel can split only the first axis of each side of its 1+2 axis view of "
        "shape (8, 4, 16), got P(None, None, 'fsdp'); use implementation='xla' for this sharding."),
    "uneven_split": (  # 30 columns over 4 shards
        {"w": (64, 30)}, q.BlockPartition(rules={"w": "mlp"}), False, P(None, "fsdp"), P("fsdp"),
        "w: shape (64, 30) does not split evenly under P(None, 'fsdp') (mesh {'data': 2, "
        "'fsdp': 4}), which the per-shard kernel needs."),
}


@pytest.mark.filterwarnings("ignore:Adam-mini partition found no")
@pytest.mark.parametrize("case", list(KERNEL_SHARDING_ERRORS))
def test_kernel_refuses_shardings_it_cannot_run_per_shard(case):
  """implementation="pallas" raises a ShardingError naming the parameter while tracing
  the step (before any compile) for shardings the per-shard kernel does not support;
  the XLA path takes the same sharding, and the kernel a supported one of the same leaf."""
  shapes, partition, int8_weights, bad, good, message = KERNEL_SHARDING_ERRORS[case]
  step = lambda spec, **kw: _kernel_step(shapes, spec, partition, int8_weights=int8_weights, **kw)
  with pytest.raises(q.ShardingError, match="^" + re.escape(message)):
    step(bad)
  (path, shape), = shapes.items()
  for out in (step(bad, implementation="xla"), step(good)):
    (got_path, leaf), = jax.tree_util.tree_flatten_with_path(out, is_leaf=q.weights.is_quantized)[0]
    assert partition_lib.path_str(got_path) == path and leaf.shape == shape
    assert q.weights.is_quantized(leaf) == int8_weights


@pytest.mark.filterwarnings("ignore:Adam-mini partition found no")
def test_partition_specs_with_mesh_and_replicated_counters():
  params = {"mlp": {"kernel": jax.ShapeDtypeStruct((64, 128), "float32")},
            "embed": {"embedding": jax.ShapeDtypeStruct((64, 8), "float32")}}
  tx = q.q_adam_mini(1e-3, quantization=q.Int8Quantization(group_size=8, min_size=64))
  state = jax.eval_shape(tx.init, params)
  got = q.state_shardings(state, params, {"mlp": {"kernel": P("fsdp")}, "embed": {"embedding": P()}},
                          mesh=MESH)
  assert got[0].mu["mlp"]["kernel"].codes.spec == P("fsdp", None)
  assert got[0].nu["mlp"]["kernel"].spec == P(None, None)  # one v per output neuron
  assert got[0].count.spec == P() and got[0].key.spec == P()


@pytest.mark.filterwarnings("ignore:Adam-mini partition found no")
def test_explicit_axes_without_a_mesh_set_are_refused_naming_the_parameter():
  mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,))
  params = {"mlp": {"kernel": jax.device_put(jnp.ones((64, 8)),
                                             NamedSharding(mesh, P(None, "fsdp")))}}
  tx = q.q_adam_mini(1e-3, quantization=q.Int8Quantization(group_size=8, min_size=0))
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(params)
    jax.jit(tx.update)(params, state, params)  # runs with the mesh set
  with pytest.raises(q.ShardingError, match=r"mlp/kernel: sharded on Explicit mesh axes "
                     r"\(P\(None, 'fsdp'\)\) but no mesh is set; run the step under jax.set_mesh"):
    jax.jit(tx.update)(params, state, params)


def test_nnx_partitioning_metadata():
  """PartitionSpecs from ``nnx.with_partitioning`` metadata (``nnx.get_partition_spec``)."""
  from flax import nnx

  class Mlp(nnx.Module):
    def __init__(self, rngs):
      init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "fsdp"))
      self.up_proj = nnx.Linear(64, 128, use_bias=False, kernel_init=init, rngs=rngs)
      self.norm = nnx.RMSNorm(64, rngs=rngs)

  with nnx.use_eager_sharding(False):  # metadata only; no mesh needed to build shapes
    model = nnx.eval_shape(lambda: Mlp(nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  specs = nnx.get_partition_spec(params)
  tx = q.q_adam_mini(1e-3, quantization=q.Int8Quantization(group_size=8, min_size=64))
  with pytest.warns(UserWarning, match="partition found no"):
    state = jax.eval_shape(tx.init, params)
  got = q.state_shardings(state, params, specs, mesh=MESH)[0]
  flat = jax.tree_util.tree_flatten_with_path(got)[0]
  spec = {partition_lib.path_str(p): s.spec for p, s in flat}
  assert spec["mu/up_proj/kernel/value/codes"] == P(None, "fsdp")
  assert spec["mu/up_proj/kernel/value/scales"] == P(None, "fsdp")  # (8 groups, 128)
  assert spec["nu/up_proj/kernel"] == P(None, "fsdp")  # one v per output neuron
  assert spec["nu/norm/scale"] == P()  # one v for the whole norm
  assert spec["mu/norm/scale/value/codes"] == P(None)  # 64 elements: INT8 too, replicated


# Two blocks, so one can be frozen with the embedding, output and attention still trained.
MASKED_SHAPES = {
    "embed/embedding": (32, 16),
    **{f"layers/{i}/{name}/kernel": shape for i in range(2) for name, shape in (
        ("attn/q_proj", (16, 16)), ("attn/k_proj", (16, 16)), ("mlp/up_proj", (16, 32)))},
    "layers/1/norm/scale": (16,),
    "lm_head/kernel": (16, 32),
}
# Trainable masks (prefixes of the params, as optax.masked allows): the frozen part is False.
FROZEN = {"embedding": {"embed": False, "layers": True, "lm_head": True},
          "block": {"embed": True, "layers": {"0": False, "1": True}, "lm_head": True}}


def flat(tree):
  return {partition_lib.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.filterwarnings("ignore:Adam-mini partition found no")  # the reference
@pytest.mark.parametrize("frozen", list(FROZEN))
@pytest.mark.parametrize("wrapper", ["masked", "multi_transform"])
def test_masked_and_multi_transform_by_path(frozen, wrapper):
  """An SR mask like the whole params, inside optax.masked / multi_transform with a
  frozen part (set_to_zero), matches the same optimizer run on the trained part alone;
  no "found no embedding" warning when the embedding is the frozen part."""
  keys = jax.random.split(jax.random.key(0), 3 * len(MASKED_SHAPES))
  params, *grads = [tm.nest({p: jax.random.normal(keys[t * len(MASKED_SHAPES) + i], s)
                             for i, (p, s) in enumerate(MASKED_SHAPES.items())}) for t in range(3)]
  trainable = flat(FROZEN[frozen])
  is_trained = lambda p: trainable.get(p.split("/")[0], trainable.get("/".join(p.split("/")[:2])))
  trained = lambda tree: tm.nest({p: x for p, x in flat(tree).items() if is_trained(p)})
  # Stochastic rounding on one leaf after the frozen part: a leaf-count shift would move it.
  rounding = tm.nest({p: p == "layers/1/mlp/up_proj/kernel" for p in MASKED_SHAPES})
  opt = lambda mask: q.q_adam_mini(
      1e-2, partition=q.BlockPartition(num_heads=2), stochastic_rounding=mask, key=3,
      quantization=q.Int8Quantization(group_size=8, min_size=64))
  if wrapper == "masked":
    tx = optax.masked(opt(rounding), FROZEN[frozen])
  else:
    labels = jax.tree.map(lambda t: "opt" if t else "frozen", FROZEN[frozen])
    tx = optax.multi_transform({"opt": opt(rounding), "frozen": optax.set_to_zero()}, labels)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    state = tx.init(params)
  ref = opt(trained(rounding))
  ref_state = ref.init(trained(params))
  for g in grads:
    updates, state = tx.update(g, state, params)
    want, ref_state = ref.update(trained(g), ref_state, trained(params))
    got, want, g = flat(updates), flat(want), flat(g)
    for p in MASKED_SHAPES:
      frozen_update = g[p] if wrapper == "masked" else np.zeros_like(g[p])
      np.testing.assert_array_equal(got[p], want[p] if is_trained(p) else frozen_update, p)
  inner = state.inner_state if wrapper == "masked" else state.inner_states["opt"].inner_state
  for x, y in zip(jax.tree.leaves(inner), jax.tree.leaves(ref_state)):
    np.testing.assert_array_equal(x, y)


def test_masked_warning_counts_the_masked_out_names():
  """Inside optax.masked, kinds missing from the trained part are not reported when a
  masked-out path names them, and still are when nothing names them anywhere."""
  ones = jax.numpy.ones((8, 8))
  with pytest.warns(UserWarning, match="found no embedding, output, query, key"):
    optax.masked(q.adam_mini(1e-3), {"a": True, "b": False}).init({"a": ones, "b": ones})
  params = {"q_proj": {"kernel": ones}, "k_proj": {"kernel": ones},
            "embed": {"embedding": ones}, "lm_head": {"kernel": ones}}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    optax.masked(q.adam_mini(1e-3, partition=q.BlockPartition(num_heads=2)),
                 {"q_proj": True, "k_proj": True, "embed": False, "lm_head": True}).init(params)


def test_rounding_mask_must_match_params_by_path():
  params = {"a": jax.numpy.ones((64, 8)), "b": jax.numpy.ones((64, 8))}
  tx = q.q_adam_mini(1e-3, stochastic_rounding={"a": True, "c": False},
                     quantization=q.Int8Quantization(group_size=8, min_size=64))
  with pytest.warns(UserWarning, match="partition found no"):
    state = tx.init(params)
  with pytest.raises(ValueError, match="entry for 'c', which is not a parameter path"):
    tx.update(params, state, params)
