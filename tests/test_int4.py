"""INT4 projector storage: the round-trip bound, same-sign groups, packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qadam_mini_jax import int4


def np_int4(x, group_size):
  """Round trip of the code in ``int4``'s docstring, in NumPy, per group of the flattened matrix."""
  flat = np.asarray(x, np.float64).reshape(x.shape[:-2] + (-1,))
  n = flat.shape[-1]
  groups = -(-n // group_size)
  g = np.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, groups * group_size - n)])
  g = g.reshape(flat.shape[:-1] + (groups, group_size))
  lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
  s = (hi - lo) / 15
  inv = np.where(s > 0, 1 / np.where(s > 0, s, 1), 0)
  z = np.clip(np.round(-lo * inv), 0, 15)
  q = np.clip(np.round(g * inv[..., None]) + z[..., None], 0, 15)
  out = ((q - z[..., None]) * s[..., None]).reshape(flat.shape[:-1] + (-1,))[..., :n]
  return out.reshape(x.shape), np.repeat(s, group_size, -1).reshape(flat.shape[:-1] + (-1,))[..., :n]


@pytest.mark.parametrize("shape, group_size", [((3, 40, 7), 32), ((16, 32), 128), ((5, 3), 4)])
def test_round_trip_within_half_a_step(shape, group_size):
  x = jax.random.normal(jax.random.key(0), shape)
  # A group of positive values away from zero, one of negative values (the
  # reference clipped both) and an all-zero group, then mixed signs.
  flat = x.reshape(shape[:-2] + (-1,))
  flat = flat.at[..., :group_size].set(jnp.abs(flat[..., :group_size]) + 1.0)
  flat = flat.at[..., group_size:2 * group_size].set(-jnp.abs(flat[..., group_size:2 * group_size]))
  x = flat.at[..., 2 * group_size:3 * group_size].set(0.0).reshape(shape)
  storage = int4.Int4Storage(group_size)
  a = storage.store(x)
  back = storage.load(a, shape)
  expected, step = np_int4(np.asarray(x), group_size)
  np.testing.assert_allclose(back, expected, rtol=1e-6, atol=1e-6)
  err = np.abs(np.asarray(back) - np.asarray(x)).reshape(step.shape)
  assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-7)
  np.testing.assert_array_equal(
      np.asarray(back).reshape(shape[:-2] + (-1,))[..., 2 * group_size:3 * group_size], 0.0)
  # Two codes per byte.
  assert a.packed.dtype == jnp.uint8
  assert a.packed.shape[-1] == storage.groups(shape[-2:]) * group_size // 2


def test_packing_order():
  storage = int4.Int4Storage(4)
  a = storage.store(jnp.asarray([[0.0, 1.0], [2.0, 3.0]]))  # range [0, 3]: codes 0, 5, 10, 15
  np.testing.assert_array_equal(a.packed, [0 | 5 << 4, 10 | 15 << 4])
  np.testing.assert_array_equal(a.zero, [0])


def test_min_max_codes_by_hand():
  """MicroAdam's error feedback: a bucket [lo, hi] has levels lo + c (hi - lo)/15."""
  storage = int4.MinMaxInt4Storage(4)
  x = jnp.asarray([-1.0, 0.55, 2.0, 0.95,  # range [-1, 2]: u = 0.2
                   3.0, 3.0, 3.0, 3.0,     # hi = lo: codes 0, values exact
                   7.0, 1.0, 4.1])         # a ragged bucket of 3: range [1, 7], u = 0.4
  a = storage.store(x)
  # (x - lo)/u + 1/2: 0.5, 8.25, 15.5, 10.25 -> 0, 8, 15, 10; 15.5, 0.5, 8.25 -> 15, 0, 8.
  codes = [0, 8, 15, 10, 0, 0, 0, 0, 15, 0, 8, 8]  # the padding repeats the last element
  np.testing.assert_array_equal(a.packed, [c0 | c1 << 4 for c0, c1 in zip(codes[::2], codes[1::2])])
  np.testing.assert_array_equal(np.asarray(a.lo, np.float32), [-1, 3, 1])
  np.testing.assert_array_equal(np.asarray(a.hi, np.float32), [2, 3, 7])
  np.testing.assert_allclose(storage.load(a, 11), [-1, 0.6, 2, 1, 3, 3, 3, 3, 7, 1, 4.2],
                             rtol=1e-6)


def test_min_max_round_trip_within_half_a_step():
  storage = int4.MinMaxInt4Storage(64)
  x = jax.random.normal(jax.random.key(1), (4, 1000)) * jnp.asarray([[1e-3], [1.0], [50.0], [0.1]])
  x = x.at[3].add(100.0)  # far from zero: bfloat16 rounds the ends by more than a step
  a = storage.store(x)
  back = storage.load(a, 1000)
  lo, hi = np.asarray(a.lo, np.float32), np.asarray(a.hi, np.float32)
  b = np.pad(np.asarray(x), [(0, 0), (0, 24)], mode="edge").reshape(4, 16, 64)
  assert np.all(lo <= b.min(-1)) and np.all(hi >= b.max(-1))  # the ends rounded outward
  step = np.repeat((hi - lo) / 15, 64, -1)[:, :1000]
  assert np.all(np.abs(np.asarray(back) - np.asarray(x)) <= step / 2 * (1 + 1e-5))
  assert a.packed.shape == (4, 16 * 32)
