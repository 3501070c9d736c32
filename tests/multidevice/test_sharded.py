"""q_adam_mini and adam_mini on 8 devices: same results as one device, state sharded like params.

Run by ``tests/test_sharding.py`` in a subprocess with 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import qadam_mini_jax as q
from qadam_mini_jax import projection
import tiny_models as tm

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")

D, V, F, HEADS, KV_HEADS = 64, 128, 128, 4, 2
HEAD_DIM = D // HEADS
SHAPES = {
    "embed/embedding": (V, D),
    "layers/0/attn/q_proj/kernel": (D, D),
    "layers/0/attn/k_proj/kernel": (D, KV_HEADS * HEAD_DIM),
    "layers/0/attn/v_proj/kernel": (D, KV_HEADS * HEAD_DIM),
    "layers/0/attn/o_proj/kernel": (D, D),
    "layers/0/mlp/up_proj/kernel": (D, F),
    "layers/0/mlp/down_proj/kernel": (F, D),
    "layers/0/attn_norm/scale": (D,),
    "lm_head/kernel": (D, V),
}
PART = q.BlockPartition(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
INT8 = q.Int8Quantization(group_size=8, min_size=64)  # every matrix in INT8, norms in float
STEPS = 5


def mesh(**axes):
  return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(AxisType.Auto,) * len(axes))


def fsdp_axis0(m, path, shape):
  return P("fsdp") if len(shape) == 2 else P()


def fsdp_axis1(m, path, shape):
  return P(None, "fsdp") if len(shape) == 2 else P()


def tensor_parallel(m, path, shape):
  """Megatron: q/k/v/up and the output layer split by output (heads, vocab), o/down
  by input, the embedding by vocab; norms replicated."""
  if any(n in path for n in ("q_proj", "k_proj", "v_proj", "up_proj", "lm_head")):
    return P(None, "tensor")
  if any(n in path for n in ("o_proj", "down_proj", "embed")):
    return P("tensor", None)
  return P()


def data_parallel(m, path, shape):
  return P()


LAYOUTS = {  # name: (mesh axes, param spec rule, ways params split)
    "data_parallel": ({"data": 8}, data_parallel, 1),
    "fsdp_axis0": ({"data": 2, "fsdp": 4}, fsdp_axis0, 4),
    "fsdp_axis1": ({"data": 2, "fsdp": 4}, fsdp_axis1, 4),
    "tensor_parallel": ({"data": 2, "tensor": 4}, tensor_parallel, 4),
}


def params_and_grads():
  keys = jax.random.split(jax.random.key(0), len(SHAPES) * (STEPS + 1))
  params = tm.nest({p: 0.1 * jax.random.normal(keys[i], s) for i, (p, s) in enumerate(SHAPES.items())})
  grads = [tm.nest({p: jax.random.normal(keys[(t + 1) * len(SHAPES) + i], s)
                    for i, (p, s) in enumerate(SHAPES.items())}) for t in range(STEPS)]
  return params, grads


def shardings_for(m, rule):
  return tm.nest({p: NamedSharding(m, rule(m, p, s)) for p, s in SHAPES.items()})


def optimizer(name, shardings=None, implementation="xla"):
  if name == "adam_mini":
    return q.adam_mini(1e-2, weight_decay=0.1, partition=PART, shardings=shardings)
  return q.q_adam_mini(1e-2, weight_decay=0.1, partition=PART, quantization=INT8,
                       stochastic_rounding="all", key=7, implementation=implementation,
                       shardings=shardings)


def train(tx, params, grads, shardings=None, jit_init=True):
  state = jax.jit(tx.init)(params) if jit_init else tx.init(params)

  @jax.jit
  def step(g, state, params):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  for g in grads:
    params, state = step(g if shardings is None else jax.device_put(g, shardings), state, params)
  return params, state


@functools.cache
def single_device(name, steps=STEPS):
  """``train`` of ``optimizer(name)`` on one device over the first ``steps`` gradients:
  the reference of most tests here, computed once."""
  params, grads = params_and_grads()
  return train(optimizer(name), params, grads[:steps])


def assert_close(a, b, rtol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    scale = max(float(jnp.max(jnp.abs(y))), 1e-30)
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=rtol * scale)


def assert_state_close(a, b):
  """Float leaves close; INT8 codes equal except for rare +-1 (float summation order)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if x.dtype == jnp.int8:
      diff = np.abs(np.asarray(x, np.int32) - np.asarray(y, np.int32))
      assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    else:
      assert_close(x, y)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", ["q_adam_mini", "adam_mini"])
def test_sharded_run_equals_single_device(layout, name):
  axes, rule, ways = LAYOUTS[layout]
  m = mesh(**axes)
  shardings = shardings_for(m, rule)
  params, grads = params_and_grads()
  want_params, want_state = single_device(name)
  got_params, got_state = train(optimizer(name, shardings), jax.device_put(params, shardings),
                                grads, shardings)
  assert_close(got_params, want_params)
  assert_state_close(got_state, want_state)

  # Every state leaf has the sharding the helper derives; the arrays agree.
  expected = q.state_shardings(got_state, params, shardings)
  for x, s in zip(jax.tree.leaves(got_state), jax.tree.leaves(expected)):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding.spec, s.spec)
  # Per-device bytes: about 1/ways of the whole (v, norms, counts replicated).
  total = q.tree_nbytes(got_state)
  held = q.tree_nbytes_per_device(got_state)
  assert len(held) == 8
  assert max(held.values()) <= total / ways * 1.15, (max(held.values()), total, ways)


def test_expected_state_shardings_by_hand():
  """Hand-derived specs for FSDP on the input axis and tensor parallelism."""
  params, _ = params_and_grads()
  m = mesh(data=2, fsdp=4)
  state = jax.eval_shape(optimizer("q_adam_mini").init, params)
  got = q.state_shardings(state, params, shardings_for(m, fsdp_axis0))[0]
  up = got.mu["layers"]["0"]["mlp"]["up_proj"]["kernel"]
  assert up.codes.spec == P("fsdp", None)  # (64, 128): 16 rows a shard
  assert up.scales.spec == P("fsdp", None)  # (8 groups, 128): 2 whole groups a shard
  assert got.nu["layers"]["0"]["mlp"]["up_proj"]["kernel"].spec == P(None, None)  # (1, 128)
  assert got.mu["embed"]["embedding"].scales.spec == P("fsdp", None)  # (128 tokens, 8 groups)
  assert got.nu["embed"]["embedding"].spec == P("fsdp", None)  # one v per token
  assert got.count.spec == P() and got.key.spec == P()

  m = mesh(data=2, tensor=4)
  got = q.state_shardings(state, params, shardings_for(m, tensor_parallel))[0]
  attn = got.nu["layers"]["0"]["attn"]
  assert attn["q_proj"]["kernel"].spec == P(None, "tensor")  # 4 heads over 4 shards
  assert attn["k_proj"]["kernel"].spec == P(None, None)  # 2 kv heads cannot split 4 ways
  assert got.mu["layers"]["0"]["attn"]["o_proj"]["kernel"].scales.spec == P("tensor", None)


def test_groups_cut_by_shards_are_an_error():
  params, _ = params_and_grads()
  m = mesh(fsdp=8)  # 64 rows / 8 = 8 a shard, but groups of 16 would straddle
  tx = q.q_adam_mini(1e-2, partition=PART, quantization=q.Int8Quantization(16, min_size=64))
  state = jax.eval_shape(tx.init, params)
  with pytest.raises(q.ShardingError, match="layers/0/attn/k_proj/kernel"):
    q.state_shardings(state, params, shardings_for(m, fsdp_axis0))


@pytest.mark.parametrize("layout", ["fsdp_axis0", "fsdp_axis1", "tensor_parallel"])
def test_update_gathers_no_parameter_or_gradient(layout):
  """Compiled sharded update: collectives move block sums only, never whole leaves."""
  axes, rule, ways = LAYOUTS[layout]
  m = mesh(**axes)
  shardings = shardings_for(m, rule)
  params, _ = params_and_grads()
  tx = optimizer("q_adam_mini", shardings)
  state = jax.eval_shape(tx.init, params)
  state_sh = q.state_shardings(state, params, shardings)
  compiled = jax.jit(tx.update, in_shardings=(shardings, state_sh, shardings),
                     out_shardings=(shardings, state_sh)).lower(params, state, params).compile()
  text = compiled.as_text()
  max_blocks = max(math.prod(x.shape) for x in jax.tree.leaves(state[0].nu))
  for shape in re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", text):
    assert math.prod(int(d) for d in shape.split(",") if d) <= max_blocks, shape
  # The compiled step's arguments per device are about 1/ways of the unsharded step's.
  whole = jax.jit(optimizer("q_adam_mini").update).lower(params, state, params).compile()
  ratio = (compiled.memory_analysis().argument_size_in_bytes
           / whole.memory_analysis().argument_size_in_bytes)
  assert ratio <= 1.15 / ways, ratio


@pytest.mark.parametrize("layout", ["fsdp_axis0", "fsdp_axis1", "tensor_parallel"])
def test_kernel_runs_per_shard(layout):
  """The Pallas kernel (interpret mode) under shard_map equals the jnp path on one device.
  The jax-triton kernel runs per shard through the same ``sharded_leaf_update``; its
  shards' offsets are test_triton_update's shard cases, its launch per shard on a GPU
  test_pallas_gpu's."""
  axes, rule, _ = LAYOUTS[layout]
  shardings = shardings_for(mesh(**axes), rule)
  params, grads = params_and_grads()
  want_params, want_state = single_device("q_adam_mini", 2)
  tx = optimizer("q_adam_mini", shardings, implementation="pallas")
  got_params, got_state = train(tx, jax.device_put(params, shardings), grads[:2], shardings)
  assert_close(got_params, want_params)
  assert_state_close(got_state, want_state)
  text = jax.jit(tx.update).lower(grads[0], got_state, got_params).as_text()
  assert "shard_map" in text or "manual" in text


def test_nnx_optimizer_with_sharded_model():
  m = mesh(data=2, fsdp=4)
  model = tm.Llama(tm.LlamaConfig(vocab=V, dim=D, ffn_dim=F, num_layers=1, num_heads=HEADS,
                                  num_kv_heads=KV_HEADS, head_dim=HEAD_DIM), nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  shardings = jax.tree.map(lambda x: NamedSharding(m, P(None, "fsdp") if x.ndim == 2 else P()), pure)
  nnx.replace_by_pure_dict(state, jax.device_put(pure, shardings))
  nnx.update(model, state)
  tx = q.q_adam_mini(1e-2, partition=PART, quantization=INT8, shardings=shardings)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  toks = jax.random.randint(jax.random.key(1), (8, 16), 0, V)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(lambda mod: tm.next_token_loss(mod(toks), toks))(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(5)]
  assert losses[-1] < losses[0]
  opt_state = nnx.as_pure(opt.opt_state)
  expected = q.state_shardings(opt_state, nnx.to_pure_dict(nnx.state(model, nnx.Param)), shardings)
  for x, s in zip(jax.tree.leaves(opt_state), jax.tree.leaves(expected)):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding.spec, s.spec)
  codes = opt_state[0].mu["lm_head"]["kernel"]["codes"]
  assert codes.sharding.spec == P(None, "fsdp")


def test_orbax_checkpoint_restores_onto_another_mesh(tmp_path):
  """Save on (data=2, fsdp=4) with FSDP on axis 1; restore on (fsdp=8) on axis 0; continue."""
  params, grads = params_and_grads()
  mesh_a, mesh_b = mesh(data=2, fsdp=4), mesh(fsdp=8)
  sh_a, sh_b = shardings_for(mesh_a, fsdp_axis1), shardings_for(mesh_b, fsdp_axis0)
  tx_a, tx_b = optimizer("q_adam_mini", sh_a), optimizer("q_adam_mini", sh_b)
  want_params, want_state = single_device("q_adam_mini")

  p_a, s_a = train(tx_a, jax.device_put(params, sh_a), grads[:3], sh_a)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", {"params": p_a, "opt_state": s_a})
  ckpt.wait_until_finished()

  shapes = {"params": params, "opt_state": jax.eval_shape(tx_b.init, params)}
  target_sh = {"params": sh_b, "opt_state": q.state_shardings(shapes["opt_state"], params, sh_b)}
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, target_sh)
  restored = ckpt.restore(tmp_path / "ckpt", target)
  for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(target_sh)):
    assert x.sharding.is_equivalent_to(s, x.ndim)

  state, p_b = restored["opt_state"], restored["params"]
  step = jax.jit(lambda g, s, p: (lambda u, s: (optax.apply_updates(p, u), s))(*tx_b.update(g, s, p)))
  for g in grads[3:]:
    p_b, state = step(jax.device_put(g, sh_b), state, p_b)
  assert_close(p_b, want_params)
  assert_state_close(state, want_state)


# Trainable masks (prefixes of the params): a frozen embedding, a frozen transformer block.
FROZEN = {"embedding": {"embed": False, "layers": True, "lm_head": True},
          "block": {"embed": True, "layers": {"0": False}, "lm_head": True}}


@pytest.mark.filterwarnings("ignore:Adam-mini partition found no")  # layers/0 frozen whole
@pytest.mark.parametrize("frozen", list(FROZEN))
@pytest.mark.parametrize("wrapper", ["masked", "multi_transform"])
def test_masked_and_multi_transform_with_shardings(frozen, wrapper):
  """shardings= like the whole params, inside optax.masked / multi_transform (the
  frozen part set to zero): same run as one device, state sharded like the params."""
  shardings = shardings_for(mesh(data=2, fsdp=4), fsdp_axis1)
  params, grads = params_and_grads()

  def wrap(inner):
    if wrapper == "masked":
      return optax.masked(inner, FROZEN[frozen])
    labels = jax.tree.map(lambda t: "opt" if t else "frozen", FROZEN[frozen])
    return optax.multi_transform({"opt": inner, "frozen": optax.set_to_zero()}, labels)

  want_params, want_state = train(wrap(optimizer("q_adam_mini")), params, grads[:3])
  got_params, got_state = train(wrap(optimizer("q_adam_mini", shardings)),
                                jax.device_put(params, shardings), grads[:3], shardings)
  assert_close(got_params, want_params)
  assert_state_close(got_state, want_state)
  expected = q.state_shardings(got_state, params, shardings)
  for x, s in zip(jax.tree.leaves(got_state), jax.tree.leaves(expected)):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding.spec, s.spec)
  inner = got_state.inner_state if wrapper == "masked" else got_state.inner_states["opt"].inner_state
  assert inner[0].mu["lm_head"]["kernel"].codes.sharding.spec == P(None, "fsdp")


def explicit_run(tx, params, grads, shardings):
  """``train`` on the Explicit-axis mesh of ``shardings`` (jax.make_mesh's default)."""
  with jax.set_mesh(jax.tree.leaves(shardings)[0].mesh):
    return train(tx, jax.device_put(params, shardings), grads, shardings)


@pytest.mark.parametrize("layout", ["fsdp_axis0", "fsdp_axis1", "tensor_parallel"])
def test_explicit_axis_mesh(layout):
  """jax.make_mesh's Explicit axes: no shardings=, the state's shardings come from the
  parameters' types; init + 3 steps equal one device."""
  axes, rule, _ = LAYOUTS[layout]
  explicit = jax.make_mesh(tuple(axes.values()), tuple(axes))
  assert all(t == AxisType.Explicit for t in explicit.axis_types)
  shardings = shardings_for(explicit, rule)
  params, grads = params_and_grads()
  want_params, want_state = single_device("q_adam_mini", 3)
  got_params, got_state = explicit_run(optimizer("q_adam_mini"), params, grads[:3], shardings)
  assert_close(got_params, want_params)
  assert_state_close(got_state, want_state)
  expected = q.state_shardings(got_state, params, shardings)
  for x, s in zip(jax.tree.leaves(got_state), jax.tree.leaves(expected)):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding.spec, s.spec)
    typed = jax.typeof(x).sharding.spec  # the types say it too
    assert tuple(typed) + (None,) * (x.ndim - len(typed)) == tuple(s.spec) + (None,) * (
        x.ndim - len(s.spec)), (x.shape, typed, s.spec)
  for x, s in zip(jax.tree.leaves(got_params), jax.tree.leaves(shardings)):
    assert x.sharding.is_equivalent_to(s, x.ndim)


def test_explicit_axis_mesh_fused_kernel():
  """The fused step with the Pallas kernel (interpret mode) runs per shard on Explicit axes."""
  shardings = shardings_for(jax.make_mesh((2, 4), ("data", "fsdp")), fsdp_axis1)
  params, grads = params_and_grads()
  want_params, want_state = single_device("q_adam_mini", 2)
  tx = q.fused_q_adam_mini(1e-2, weight_decay=0.1, partition=PART, quantization=INT8,
                           stochastic_rounding="all", key=7, implementation="pallas")
  with jax.set_mesh(jax.tree.leaves(shardings)[0].mesh):
    p, state = jax.device_put(params, shardings), jax.jit(tx.init)(jax.device_put(params, shardings))
    for g in grads[:2]:
      p, state = jax.jit(tx.step)(jax.device_put(g, shardings), state, p)
    text = jax.jit(tx.step).lower(jax.device_put(grads[0], shardings), state, p).as_text()
  assert_close(p, want_params)
  assert_state_close(state, want_state)
  assert "shard_map" in text or "manual" in text


def test_auto_axis_mesh_without_shardings():
  """No shardings=: tx.init of arrays on Auto axes follows them; jax.jit(tx.init)
  cannot see them and says what to pass."""
  shardings = shardings_for(mesh(data=2, fsdp=4), fsdp_axis1)
  params = jax.device_put(params_and_grads()[0], shardings)
  for name in ("q_adam_mini", "adam_mini"):
    state = optimizer(name).init(params)
    expected = q.state_shardings(state, params, shardings)
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
      assert x.sharding.is_equivalent_to(s, x.ndim), (name, x.shape, x.sharding.spec, s.spec)
    with pytest.raises(q.ShardingError,
                       match=r"embed/embedding: .*pass shardings=jax.tree.map\(lambda p: p.sharding"):
      jax.jit(optimizer(name).init)(params)
  assert state[0].mu["lm_head"]["kernel"].sharding.spec == P(None, "fsdp")


@pytest.mark.parametrize("layout", ["fsdp_axis1", "tensor_parallel"])
def test_int8_weights_sharded_run_equals_single_device(layout):
  """INT8 weights placed by weight_shardings; the fused step with shardings= on 8 devices."""
  axes, rule, ways = LAYOUTS[layout]
  m = mesh(**axes)
  shardings = shardings_for(m, rule)
  params, grads = params_and_grads()
  qparams = q.quantize_params(params, PART, INT8)
  placed = q.weight_shardings(qparams, shardings)
  kernel = placed["lm_head"]["kernel"]
  assert isinstance(kernel, q.QuantizedParam)
  assert kernel.codes == shardings["lm_head"]["kernel"]

  def run(p, shardings=None):
    opt = q.fused_q_adam_mini(1e-2, weight_decay=0.1, partition=PART, quantization=INT8,
                              stochastic_rounding="all", key=7, shardings=shardings)
    state, step = jax.jit(opt.init)(p), jax.jit(opt.step)
    for g in grads:
      p, state = step(g if shardings is None else jax.device_put(g, shardings), state, p)
    return p, state

  want_params, want_state = run(qparams)
  got_params, got_state = run(jax.device_put(qparams, placed), shardings)
  assert_state_close(got_state, want_state)
  assert_state_close(got_params, want_params)  # weight codes within one step, scales close
  for x, s in zip(jax.tree.leaves(got_params), jax.tree.leaves(placed)):
    assert x.sharding.is_equivalent_to(s, x.ndim)
  codes = got_params["lm_head"]["kernel"].codes
  assert max(q.tree_nbytes_per_device(codes).values()) * ways == codes.size


@pytest.mark.parametrize("layout", ["fsdp_axis0", "fsdp_axis1"])
def test_q_galore_sharded_run_equals_single_device(layout):
  """Q-GaLore (INT4 projectors refreshed at steps 0 and 2, 8-bit m and v) on FSDP
  params: the single-device run. The SVD runs on the whole matrix on every
  device (the partitioner gathers its operand; compiled HLO: one all-gather of
  each refreshed gradient before its SVD), so the projectors are the same bits."""
  tx = q.q_galore(1e-2, rank=4, update_proj_gap=2, weight_decay=0.1, partition=PART,
                  quantization=INT8, v_quantization=INT8, stochastic_rounding="all",
                  int4_group_size=8, key=7)
  axes, rule, _ = LAYOUTS[layout]
  shardings = shardings_for(mesh(**axes), rule)
  params, grads = params_and_grads()
  want_params, want_state = train(tx, params, grads[:3])
  # init outside jit: q_galore takes no shardings (its state on R does not follow
  # the parameters'), and on Auto axes jit(init) cannot see them.
  got_params, got_state = train(tx, jax.device_put(params, shardings), grads[:3], shardings,
                                jit_init=False)
  assert_close(got_params, want_params, rtol=1e-4)
  projectors = lambda state: [p.matrix for p in jax.tree.leaves(
      state[0].projectors, is_leaf=lambda x: isinstance(x, projection.ProjectorState))]
  for a, b in zip(projectors(got_state), projectors(want_state)):
    np.testing.assert_array_equal(a.packed, b.packed)
    np.testing.assert_array_equal(a.zero, b.zero)
    np.testing.assert_allclose(a.scale, b.scale, rtol=1e-6)
  assert_state_close(got_state[0].inner, want_state[0].inner)


def micro_adam(shardings=None):
  # Blocks of 64 keeping 7 and error buckets of 32: every FSDP shard of these
  # shapes (at least 16 x 32 elements) holds whole blocks and buckets.
  return q.micro_adam(1e-2, weight_decay=0.1, window=2, density=0.1, block_size=64,
                      error_bucket=32, shardings=shardings)


def test_micro_adam_fsdp_equals_single_device_with_its_state_split_like_the_params():
  """MicroAdam on FSDP (each matrix split along axis 0 in 4): the single-device
  run (the ring wraps around), with every matrix's ring and error feedback split
  along their blocks in the same 4 (a device keeps its own rows' state)."""
  axes, rule, ways = LAYOUTS["fsdp_axis0"]
  shardings = shardings_for(mesh(**axes), rule)
  params, grads = params_and_grads()
  want_params, want_state = train(micro_adam(), params, grads)
  got_params, got_state = train(micro_adam(shardings), jax.device_put(params, shardings), grads,
                                shardings)
  assert_close(got_params, want_params, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
    np.testing.assert_array_equal(a, b)
  micro = got_state[0]
  for part in (micro.indices, micro.values, micro.error):
    for path, x in jax.tree_util.tree_flatten_with_path(part)[0]:
      name = q.partition.path_str(path)
      if "norm" in name:
        assert x.sharding.is_fully_replicated, name
      else:  # (m, kept) split along kept; packed codes and bucket ends along their buckets
        assert x.sharding.spec[x.ndim - 1] == "fsdp", name
        assert x.addressable_shards[0].data.shape[-1] == x.shape[-1] // ways, name


def test_micro_adam_refuses_a_split_that_cuts_its_blocks():
  m = mesh(**LAYOUTS["fsdp_axis1"][0])
  params, _ = params_and_grads()
  with pytest.raises(q.ShardingError, match=r"embed/embedding: .* only the first axis"):
    micro_adam(shardings_for(m, fsdp_axis1)).init(params)
  eight = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  cut = q.micro_adam(1e-2, shardings=shardings_for(eight, fsdp_axis0))
  with pytest.raises(q.ShardingError, match=r"layers/0/attn/k_proj/kernel: .* 8 shards of 256 "
                                            r"elements, not a whole number of top-k blocks \(1024\)"):
    cut.init(params)
