"""The compiled kernels on a CUDA GPU (skipped elsewhere; ``bash benchmarks/gpu_check.sh``).

Both kernels: Pallas's (its Triton lowering) and the ``@triton.jit`` one through
jax-triton (``implementation="triton"``, skipped without the ``gpu`` extra). On
aligned and ragged leaves of both layouts, fp32 and bf16, round-to-nearest
and stochastic, direction and fused step: the compiled kernel agrees with the
Pallas kernel in interpret mode and with the jnp path (the specification) to the
bound of ``test_pallas_update.py``; the per-shard launch under ``shard_map``
equals the whole-leaf one; and nothing is written past any output buffer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qadam_mini_jax as q
from qadam_mini_jax import pallas_update, quantize as Q, random_bits, transform, triton_update
from test_pallas_update import assert_directions_agree

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (Triton)")

COLUMNS, ROWS = q.BlockSpec((0,)), q.BlockSpec((1,))
SHAPES = [
    ((2048, 1024), COLUMNS),   # aligned (in, out) kernel, one v per output neuron
    ((1000, 300), COLUMNS),    # ragged on both axes
    ((768, 50257), COLUMNS),   # GPT-2 output layer: odd row length
    ((512, 4096), ROWS),       # aligned embedding, one v per token
    ((50257, 768), ROWS),      # GPT-2 embedding: ragged rows
    ((100, 300), ROWS),        # ragged on both axes
]
FLAGS = [(False, False, jnp.float32), (True, True, jnp.float32),
         (True, False, jnp.bfloat16), (False, True, jnp.bfloat16)]


def _leaf(shape, spec, dtype, seed=0):
  """Parameter, gradient, stored m, keep-dims block factor and kernel arguments of a leaf."""
  layout = transform.layout_for(spec, shape, q.Int8Quantization())
  rng = np.random.default_rng(seed)
  p = jnp.asarray(rng.normal(size=shape), dtype)
  g = jnp.asarray(rng.normal(size=shape), dtype)
  m0 = Q.quantize(jnp.asarray(rng.normal(size=shape) * 1e-2, jnp.float32), layout)
  factor = jnp.asarray(rng.uniform(1, 2, size=q.partition.block_shape(spec, shape)), jnp.float32)
  hyper = jnp.asarray([0.9, 0.1, -1e-3, 0.1, 0, 0, 0, 0], jnp.float32)
  seeds = jnp.asarray([12345, 678, 0, 0], jnp.uint32)
  return layout, p, g, m0, factor, hyper, seeds


#: kernel -> (its fused_leaf_update, its compiled backend)
KERNELS = {"pallas": (pallas_update.fused_leaf_update, "triton"),
           "triton": (triton_update.fused_leaf_update, "jax_triton")}


def _compiled(kernel):
  """The kernel's update function and GPU backend (skips the test without jax-triton)."""
  if kernel == "triton":
    pytest.importorskip("jax_triton", reason="the gpu extra (jax-triton) is not installed")
  return KERNELS[kernel]


def _kernel(layout, spec, p, g, m0, factor, hyper, seeds, *, stochastic, fuse_step, backend,
            update=pallas_update.fused_leaf_update):
  return update(
      p, g, m0, pallas_update.factors_2d(factor, spec, layout), hyper, seeds, layout=layout,
      stochastic=stochastic, fuse_step=fuse_step, backend=backend,
      **pallas_update.factor_axes(spec, layout))


def _jnp_path(layout, spec, p, g, m0, factor, hyper, seeds, *, stochastic, fuse_step):
  """The specification: the library's quantize/dequantize and block broadcast."""
  m = hyper[0] * Q.dequantize(m0, layout) + hyper[1] * g.astype(jnp.float32)
  u = m * q.partition.broadcast_block(factor, spec, g.shape)
  if fuse_step:
    p32 = p.astype(jnp.float32)
    u = p32 + hyper[2] * (u + hyper[3] * p32)
  noise = random_bits.uniform(g.shape, seeds[0], seeds[1]) if stochastic else None
  return u.astype(p.dtype if fuse_step else g.dtype), Q.quantize(m, layout, noise)


def _assert_moments_agree(a, b):
  np.testing.assert_allclose(a.scales, b.scales, rtol=4 * 2**-23, atol=0)
  diff = np.abs(np.asarray(a.codes, np.int32) - np.asarray(b.codes, np.int32))
  assert diff.max() <= 1 and diff.mean() < 1e-3


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("stochastic, fuse_step, dtype", FLAGS)
@pytest.mark.parametrize("shape, spec", SHAPES)
def test_compiled_kernel_matches_interpret_mode_and_jnp_path(shape, spec, stochastic, fuse_step,
                                                            dtype, kernel):
  update, backend = _compiled(kernel)
  layout, *args = _leaf(shape, spec, dtype)
  flags = dict(stochastic=stochastic, fuse_step=fuse_step)
  u_t, m_t = jax.jit(lambda *a: _kernel(layout, spec, *a, backend=backend, update=update,
                                        **flags))(*args)
  u_i, m_i = jax.jit(lambda *a: _kernel(layout, spec, *a, backend="interpret", **flags))(*args)
  u_x, m_x = jax.jit(lambda *a: _jnp_path(layout, spec, *a, **flags))(*args)
  for u, m in ((u_i, m_i), (u_x, m_x)):
    assert u_t.dtype == u.dtype and u_t.shape == shape
    assert_directions_agree(u, u_t)
    _assert_moments_agree(m, m_t)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape, spec", [((1024, 768), COLUMNS), ((100, 300), ROWS)])
def test_per_shard_launch_under_shard_map_equals_whole_leaf(shape, spec, kernel):
  update, backend = _compiled(kernel)
  layout, p, g, m0, factor, hyper, seeds = _leaf(shape, spec, jnp.float32)
  mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  kernel_args = dict(stochastic=True, fuse_step=True, backend=backend,
                     **pallas_update.factor_axes(spec, layout))
  factor2d = pallas_update.factors_2d(factor, spec, layout)
  whole = jax.jit(lambda *a: update(*a, layout=layout, **kernel_args))(
      p, g, m0, factor2d, hyper, seeds)
  shard = jax.jit(lambda *a: pallas_update.sharded_leaf_update(
      *a, layout=layout, sharding=sharding, path="leaf", kernel=update, **kernel_args))(
          p, g, m0, factor2d, hyper, seeds)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(shard)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


CANARY = 4096  # bytes of a sentinel buffer allocated right after each output's buffer


def _followed_by_canary(x):
  """``x`` on the device, with a sentinel buffer that starts at most 1 KiB past its end."""
  for _ in range(8):
    buf = jax.device_put(np.asarray(x))  # a fresh allocation, not ``x``'s own buffer
    canary = jax.device_put(np.full(CANARY, 0x5A, np.uint8))
    gap = canary.unsafe_buffer_pointer() - (buf.unsafe_buffer_pointer() + buf.nbytes)
    if 0 <= gap <= 1024:
      return buf, canary
  pytest.fail("the allocator never placed a sentinel right after a buffer")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape, spec", [((1000, 300), COLUMNS), ((768, 50257), COLUMNS),
                                         ((100, 300), ROWS), ((50257, 768), ROWS)])
def test_nothing_is_written_past_any_output(shape, spec, kernel):
  """Outputs alias the donated parameter, codes and scales, each followed by a sentinel."""
  update, backend = _compiled(kernel)
  layout, p, g, m0, factor, hyper, seeds = _leaf(shape, spec, jnp.float32)
  (p, c_p), (codes, c_c), (scales, c_s) = map(_followed_by_canary, (p, m0.codes, m0.scales))
  pointers = [x.unsafe_buffer_pointer() for x in (p, codes, scales)]
  step = jax.jit(lambda p, codes, scales, g: _kernel(
      layout, spec, p, g, Q.QuantizedArray(codes, scales), factor, hyper, seeds,
      stochastic=True, fuse_step=True, backend=backend, update=update), donate_argnums=(0, 1, 2))
  new_p, new_m = step(p, codes, scales, g)
  jax.block_until_ready((new_p, new_m))
  assert [x.unsafe_buffer_pointer() for x in (new_p, new_m.codes, new_m.scales)] == pointers
  for canary in (c_p, c_c, c_s):
    np.testing.assert_array_equal(np.asarray(canary), 0x5A)
