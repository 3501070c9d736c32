"""The fused Pallas kernel agrees with the jnp path (interpret mode off GPU).

Bound: the kernel and XLA may contract ``b1*m + (1-b1)*g`` into an FMA
differently, so ``m`` differs by float32 rounding (a few ulp of
``|b1*m| + |(1-b1)*g|``). Hence: directions ``u`` within 1e-6 of the leaf's
largest ``|u|``, scales within 4 ulp, INT8 codes equal except rare +-1 where
``m/scale`` sits on a rounding threshold, and the same trajectory over steps.
The random bits are the same function in both paths, so stochastic rounding
agrees to the same bound. On a GPU the same tests run the Triton kernel.
"""

import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import pallas as pl_package

import qadam_mini_jax as q
from qadam_mini_jax import pallas_update, quantize as Q, transform
from tiny_models import nest

PART = q.BlockPartition(num_heads=8)
INT8 = q.Int8Quantization(min_size=1000)


def _params(dtype=jnp.float32):
  shapes = {
      "embed/embedding": (100, 300),          # per token; rows of 300 -> groups 256 + 44
      "attn/q_proj/kernel": (64, 512),       # per head
      "attn/k_proj/kernel": (64, 128),       # per head, 8 heads of 16
      "attn/value/kernel": (40, 4, 16),       # 3-D, per neuron; a row spans (4, 16)
      "mlp/up_proj/kernel": (300, 100),      # per output neuron: column groups 256 + 44
      "mlp/down_proj/kernel": (33, 1000),    # per output neuron: columns shorter than a group
      "lm_head/kernel": (16, 100),           # whole tensor is one row (1600 elements)
      "norm/scale": (64,),                   # small: float m
      "tiny/kernel": (3, 5),                 # small: float m
      "empty/kernel": (0, 8),                # left alone
      "count": (),                           # int: left alone
  }
  return nest({path: jnp.asarray(3, jnp.int32) if path == "count" else
               jax.random.normal(jax.random.key(len(path)), shape, dtype)
               for path, shape in shapes.items()})


def _grads(params, step):
  return jax.tree.map(
      lambda p: (jax.random.normal(jax.random.key(100 + step), p.shape, p.dtype)
                 if jnp.issubdtype(p.dtype, jnp.floating) else p), params)


def _quantized(tree):
  return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Q.QuantizedArray))


def assert_states_agree(a, b):
  for x, y in zip(_quantized(a.mu), _quantized(b.mu)):
    if isinstance(x, Q.QuantizedArray):
      np.testing.assert_allclose(y.scales, x.scales, rtol=4 * 2**-23, atol=0)
      diff = np.abs(np.asarray(x.codes, np.int32) - np.asarray(y.codes, np.int32))
      assert diff.max(initial=0) <= 1 and diff.mean() < 1e-3
    else:
      np.testing.assert_array_equal(x, y)  # float leaves: the same jnp code
  chex.assert_trees_all_equal(a.nu, b.nu)
  chex.assert_trees_all_equal(a.count, b.count)


def assert_directions_agree(u, v):
  """Within 1e-6 of the leaf's largest |u|, plus one ulp of bf16 outputs (a float32
  difference can land on either side of a bf16 rounding boundary)."""
  for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(v)):
    ulp = 2.0**-7 if x.dtype == jnp.bfloat16 else 0.0  # one bf16 ulp, relative
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    assert np.all(np.abs(x - y) <= 1e-6 * np.abs(x).max(initial=0) + ulp * np.abs(x))


@pytest.mark.parametrize("rounding", ["auto", "all", "none"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_matches_jnp_path_step_by_step(rounding, dtype):
  params = _params(dtype)
  # b1 and eps other than the defaults: the kernel must read them, not assume them
  # (eps = 1e-3 moves u by about 1e-3 of its size here, 1e3 x the bound below).
  make = lambda impl: q.scale_by_adam_mini(
      0.8, 0.95, 1e-3, partition=PART, quantization=INT8, stochastic_rounding=rounding,
      key=7, implementation=impl)
  ref, ker = make("xla"), make("pallas")
  state = ref.init(params)
  ker_state = ker.init(params)
  for step in range(4):
    g = _grads(params, step)
    u_ref, next_state = jax.jit(ref.update)(g, state)
    u_ker, next_ker = jax.jit(ker.update)(g, state)       # from the same state
    assert_directions_agree(u_ref, u_ker)
    assert_states_agree(next_state, next_ker)
    _, ker_state = jax.jit(ker.update)(g, ker_state)       # its own trajectory
    state = next_state
  assert_states_agree(state, ker_state)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_fused_step_matches_chain_and_apply_updates(implementation):
  params = _params()
  sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)
  kw = dict(b2=0.95, weight_decay=0.1, partition=PART, quantization=INT8, key=3)
  chain = q.q_adam_mini(sched, implementation="xla", **kw)
  fused = q.fused_q_adam_mini(sched, implementation=implementation, **kw)
  state, fused_state = chain.init(params), fused.init(params)
  chex.assert_trees_all_equal_structs(state, fused_state)
  p_chain = p_fused = params
  for step in range(4):
    g = _grads(params, step)
    u, next_state = jax.jit(chain.update)(g, state, p_chain)
    next_p = optax.apply_updates(p_chain, u)
    p_one, one_state = jax.jit(fused.step)(g, state, p_chain)     # from the same state
    for a, b in zip(jax.tree.leaves(next_p), jax.tree.leaves(p_one)):
      np.testing.assert_allclose(b, a, rtol=4 * 2**-23, atol=1e-7)
    assert_states_agree(next_state[0], one_state[0])
    chex.assert_trees_all_equal(next_state[1:], one_state[1:])  # decay and schedule counts
    p_fused, fused_state = jax.jit(fused.step)(g, fused_state, p_fused)  # its own trajectory
    state, p_chain = next_state, next_p
  assert int(p_fused["count"]) == 3 and p_fused["empty"]["kernel"].shape == (0, 8)
  # A rare +-1 code difference moves one element by lr * scale: close, not equal.
  for a, b in zip(jax.tree.leaves(p_chain), jax.tree.leaves(p_fused)):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)


def test_fused_step_bf16_params_within_bf16_rounding():
  """The chain rounds the direction to bf16 before decay and learning rate; the
  fused step rounds once at the end. So they differ by at most one bf16 ulp of
  the parameter (<= 2^-7 relative) plus one of the step taken."""
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16) if p.dtype == jnp.float32 else p,
                        _params())
  kw = dict(b2=0.95, weight_decay=0.1, partition=PART, quantization=INT8)
  chain, fused = q.q_adam_mini(1e-2, **kw), q.fused_q_adam_mini(1e-2, implementation="pallas", **kw)
  g = _grads(params, 0)
  u, _ = jax.jit(chain.update)(g, chain.init(params), params)  # op by op: 30 s of compiles
  want = optax.apply_updates(params, u)
  got, _ = jax.jit(fused.step)(g, fused.init(params), params)
  for p, a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want), jax.tree.leaves(got)):
    assert a.dtype == b.dtype
    if a.dtype == jnp.bfloat16:
      p, a, b = (np.asarray(x, np.float32) for x in (p, a, b))
      assert np.all(np.abs(b - a) <= 2**-7 * (np.abs(a) + np.abs(a - p)) + 1e-7)


@pytest.mark.parametrize("columns", [True, False])
def test_kernel_on_one_shard_uses_whole_leaf_indices(columns):
  """A block of a leaf, given its offset and the leaf's row length, gets the leaf's bits.

  This is what lets each device of a ``shard_map`` round stochastically exactly
  as one device would (tests/multidevice checks the whole sharded step).
  """
  shape, group = (64, 48), 16
  spec = q.BlockSpec((0,) if columns else (1,))
  layout = transform.layout_for(spec, shape, q.Int8Quantization(group, min_size=1))
  assert layout.columns == columns
  rng = np.random.default_rng(1)
  g = jnp.asarray(rng.normal(size=shape), jnp.float32)
  m0 = Q.quantize(jnp.asarray(rng.normal(size=shape), jnp.float32), layout)
  factor = jnp.ones((1, 1), jnp.float32)
  hyper = jnp.asarray([0.9, 0.1, 0, 0, 0, 0, 0, 0], jnp.float32)
  run = lambda g, m, lay, seeds, stride=None: pallas_update.fused_leaf_update(
      g, g, m, factor, hyper, jnp.asarray(seeds, jnp.uint32), layout=lay, stochastic=True,
      fuse_step=False, a_varies=False, b_varies=False, backend="interpret", stride=stride)
  _, whole = run(g, m0, layout, [5, 6, 0, 0])
  rows, cols = (slice(32, 64), slice(16, 32))  # a block of whole groups
  local = layout._replace(shape=(32, 16))
  scales = (m0.scales[2:4, cols] if columns else m0.scales[rows, 1:2])
  _, part = run(g[rows, cols], Q.QuantizedArray(m0.codes[rows, cols], scales), local,
                [5, 6, 32, 16], stride=shape[1])
  np.testing.assert_array_equal(part.codes, whole.codes[rows, cols])
  _, unshifted = run(g[rows, cols], Q.QuantizedArray(m0.codes[rows, cols], scales), local,
                     [5, 6, 0, 0])
  assert (np.asarray(unshifted.codes) != np.asarray(whole.codes[rows, cols])).any()


def test_injected_hyperparameters_reach_the_kernel_without_recompiling():
  """lr, b1, b2, eps and weight decay changed at run time: the kernel reads each of
  them (it agrees with the jnp path given the same values) and compiles once."""
  params = _params()
  make = lambda impl: optax.inject_hyperparams(q.q_adam_mini)(
      learning_rate=1e-2, b1=0.9, b2=0.95, weight_decay=0.1, partition=PART,
      quantization=INT8, stochastic_rounding="all", key=3, implementation=impl)
  runs = {}
  for impl in ("xla", "pallas"):
    tx = make(impl)
    update, state = jax.jit(tx.update), tx.init(params)
    _, state = update(_grads(params, 0), state, params)
    for name, value in dict(learning_rate=3e-3, b1=0.7, b2=0.8, eps=1e-2,
                            weight_decay=0.3).items():
      state.hyperparams[name] = jnp.asarray(value, jnp.float32)
    u, state = update(_grads(params, 1), state, params)
    assert update._cache_size() == 1
    runs[impl] = u, state.inner_state[0]
  (u_ref, s_ref), (u_ker, s_ker) = runs["xla"], runs["pallas"]
  assert_directions_agree(u_ref, u_ker)
  assert_states_agree(s_ref, s_ker)


def test_bad_implementation_backend_and_group_size():
  with pytest.raises(ValueError, match="implementation must be one of"):
    q.q_adam_mini(1e-3, implementation="cuda")
  with pytest.raises(ValueError, match=r"Unknown Pallas backend 'mosaic'; expected one of"):
    pallas_update.pallas_call_options("mosaic")
  with pytest.raises(ValueError, match="power-of-two group size"):
    q.q_adam_mini(1e-3, quantization=q.Int8Quantization(group_size=100), implementation="pallas")
  q.q_adam_mini(1e-3, quantization=q.Int8Quantization(group_size=100), implementation="auto")


@pytest.mark.parametrize("shape, spec", [
    ((33, 1000), q.BlockSpec((0,))),    # columns layout, factors per column
    ((100, 300), q.BlockSpec((1,))),    # rows layout, factors per row
])
@pytest.mark.parametrize("stochastic, fuse_step", [(False, False), (True, True)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_lowers_to_triton(shape, spec, stochastic, fuse_step, dtype):
  """Pallas's Triton lowering accepts the kernel (checked without a GPU).

  ``jax.export`` lowers for CUDA on any host; this runs the Pallas-to-Triton
  lowering (power-of-two blocks, supported primitives), not the Triton compiler.
  """
  layout = transform.layout_for(spec, shape, q.Int8Quantization())
  axes = pallas_update.factor_axes(spec, layout)
  s = jax.ShapeDtypeStruct
  factor = (layout.a if axes["a_varies"] else 1, layout.b if axes["b_varies"] else 1)
  args = (s(shape, dtype), s(shape, dtype),
          Q.QuantizedArray(s(shape, jnp.int8), s(layout.scales_shape, jnp.float32)),
          s(factor, jnp.float32), s((8,), jnp.float32), s((4,), jnp.uint32))
  fn = lambda *a: pallas_update.fused_leaf_update(
      *a, layout=layout, stochastic=stochastic, fuse_step=fuse_step, backend="triton", **axes)
  exported = jax.export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
  assert "__gpu$xla.gpu.triton" in exported.mlir_module()


def test_auto_takes_the_xla_path_until_the_kernel_is_measured_on_a_gpu(monkeypatch):
  int8 = q.Int8Quantization()
  assert transform.resolve_implementation("auto", int8) is None  # this CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert transform.AUTO_KERNELS_ON_GPU == ()
  assert transform.resolve_implementation("auto", int8) is None
  monkeypatch.setattr(transform, "PALLAS_TRITON_DEPRECATED", True)  # jax >= 0.11
  with pytest.warns(FutureWarning, match="jax 0.11 deprecated.*implementation='triton'"):
    assert transform.resolve_implementation("pallas", int8) == "triton"
  monkeypatch.setattr(transform, "PALLAS_TRITON_DEPRECATED", False)
  monkeypatch.setattr(transform, "AUTO_KERNELS_ON_GPU", ("pallas",))
  assert transform.resolve_implementation("auto", int8) == "triton"
  assert transform.resolve_implementation("auto", q.Int8Quantization(group_size=100)) is None


def test_without_the_triton_backend_auto_warns_and_pallas_raises(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(transform, "AUTO_KERNELS_ON_GPU", ("pallas",))
  monkeypatch.delattr(pl_package, "triton", raising=False)  # as if JAX shipped no such module
  monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)
  with pytest.warns(UserWarning, match="no Pallas Triton backend.*passes over the 'pallas'"):
    assert transform.resolve_implementation("auto", q.Int8Quantization()) is None
  with pytest.raises(pallas_update.TritonBackendMissing, match="implementation='xla'"):
    q.q_adam_mini(1e-3, implementation="pallas")


@pytest.mark.parametrize("weight_rounding", [False, True], ids=["nearest", "stochastic"])
def test_int8_weights_kernel_matches_jnp_path_over_steps(weight_rounding):
  """One kernel reads weight codes + scales, g and m codes and writes both: as the jnp path.

  Ragged column and row groups, a 3-D leaf, a stacked (scanned) leaf, float leaves beside.
  """
  params = _params()
  params["layers"] = {"o_proj": {"kernel": jax.random.normal(jax.random.key(7), (2, 300, 24))}}
  stacked = q.BlockPartition(num_heads=8, layers={"layers": 0})
  qp = q.weights.quantize_params(params, stacked, INT8, stochastic=weight_rounding)
  assert sum(isinstance(x, q.QuantizedParam) for x in jax.tree.leaves(
      qp, is_leaf=lambda x: isinstance(x, q.QuantizedParam))) == 8
  runs = {}
  for implementation in ("xla", "pallas"):
    opt = q.fused_q_adam_mini(1e-2, weight_decay=0.1, partition=stacked, quantization=INT8,
                              stochastic_rounding="all", key=5, implementation=implementation)
    p, state, step = qp, opt.init(qp), jax.jit(opt.step)
    for t in range(3):
      p, state = step(_grads(q.weights.float_like(params), t), state, p)
    runs[implementation] = p, state
  (p_x, s_x), (p_k, s_k) = runs["xla"], runs["pallas"]
  assert_states_agree(s_x[0], s_k[0])
  for x, y in zip(*(jax.tree.leaves(p, is_leaf=lambda x: isinstance(x, q.QuantizedParam))
                    for p in (p_x, p_k))):
    if isinstance(x, q.QuantizedParam):
      np.testing.assert_allclose(y.scales, x.scales, rtol=4 * 2**-23, atol=0)
      diff = np.abs(np.asarray(x.codes, np.int32) - np.asarray(y.codes, np.int32))
      assert diff.max(initial=0) <= 1 and diff.mean() < 1e-3
    else:
      np.testing.assert_array_equal(x, y)


def test_int8_weights_are_written_by_the_fused_step_only():
  layout = Q.group_layout((64, 64), 256, 1)
  codes = Q.QuantizedArray(jnp.zeros((64, 64), jnp.int8), jnp.zeros(layout.scales_shape))
  with pytest.raises(ValueError, match="fused step only"):
    pallas_update.fused_leaf_update(
        codes, jnp.zeros((64, 64)), codes, jnp.ones((1, 64)), jnp.zeros(8),
        jnp.zeros(6, jnp.uint32), layout=layout, stochastic=False, fuse_step=False,
        a_varies=False, b_varies=True, backend="interpret", params_stochastic=True)


def test_int8_weights_grouped_unlike_m_are_refused_by_the_kernel_by_name():
  params = {"mlp": {"up_proj": {"kernel": jnp.ones((300, 100))}}}
  qp = q.quantize_params(params, PART, q.Int8Quantization(group_size=128, min_size=1000))
  opt = q.fused_q_adam_mini(1e-2, partition=PART, quantization=INT8, implementation="pallas")
  with pytest.raises(ValueError, match="mlp/up_proj/kernel: the fused kernel needs the INT8 "
                                       "weight grouped as its m"):
    opt.step(jax.tree.map(jnp.ones_like, params), opt.init(qp), qp)
