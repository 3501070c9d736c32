"""Group-wise symmetric INT8 quantization: layout, error bounds, rounding bias."""

import functools
import re

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from qadam_mini_jax import quantize as Q
from qadam_mini_jax.storage import Int8Quantization


@pytest.mark.parametrize("shape, group, columns, split, scales_shape", [
    ((4096,), 256, 0, 0, (16,)),
    ((1000,), 256, 0, 0, (4,)),               # ragged last group
    ((10, 64, 8), 256, 0, 1, (10, 2)),        # rows = trailing axes with >= 256 elements
    ((7, 300), 256, 0, 1, (7, 2)),
    ((3, 5), 256, 0, 0, (1,)),                # whole tensor smaller than a group
    ((600, 7), 256, 1, 1, (3, 7)),            # columns: groups down axis 0, ragged
    ((64, 4, 16), 256, 1, 1, (1, 4, 16)),     # columns shorter than a group
    ((8, 9, 70), 256, 2, 2, (1, 70)),         # columns over two leading axes
    ((8, 9), 256, 2, 0, (1,)),                # every axis reduced: rows
])
def test_group_layout(shape, group, columns, split, scales_shape):
  layout = Q.group_layout(shape, group, columns)
  assert layout.split == split and layout.scales_shape == scales_shape
  assert layout.columns == (0 < columns < len(shape))


def _groups_numpy(x, layout):
  """Independent grouping: explicit loops over the rows or columns of the view."""
  m = x.reshape(layout.a, layout.b)
  g = layout.group_size
  if layout.columns:
    return [m[i:i + g, j] for i in range(0, layout.a, g) for j in range(layout.b)]
  return [m[r, i:i + g] for r in range(layout.a) for i in range(0, layout.b, g)]


def _levels(s):
  """The 255 values a group of max ``s`` can store: s * sign(c) * (c/127)^2."""
  c = np.arange(-127, 128, dtype=np.float64)
  return np.sign(c) * (c / 127) ** 2 * s


def _neighbours(x, s):
  """The two stored levels around each x (equal when x is a level)."""
  levels = _levels(s)
  hi = levels[np.searchsorted(levels, x, side="left").clip(0, 254)]
  lo = levels[(np.searchsorted(levels, x, side="right") - 1).clip(0, 254)]
  return lo, hi


@functools.partial(jax.jit, static_argnums=1)
def _round_trip(x, layout):
  """quantize and dequantize as one program (compiled once per example; run op by op,
  the two compile some 35 operations for each new shape)."""
  qa = Q.quantize(x, layout)
  return qa, Q.dequantize(qa, layout)


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple),
       group=st.sampled_from([4, 16, 64]), columns=st.integers(0, 2),
       seed=st.integers(0, 2**31 - 1))
def test_round_to_nearest_picks_the_nearest_level(shape, group, columns, seed):
  rng = np.random.default_rng(seed)
  # Down to 1e-25: smaller, XLA:CPU's compiled decode flushes a product below float32's
  # normal range to zero, and below a group max of 4.7e-35 127^2/max overflows (README).
  x = (rng.normal(size=shape) * 10.0 ** rng.integers(-25, 5)).astype(np.float32)
  layout = Q.group_layout(shape, group, columns)
  qa, back = _round_trip(jnp.asarray(x), layout)
  assert qa.codes.dtype == jnp.int8 and qa.codes.shape == shape
  assert qa.scales.dtype == jnp.float32 and qa.scales.shape == layout.scales_shape
  back = np.asarray(back, np.float64)
  scales = np.asarray(qa.scales).reshape(-1)
  for k, (gx, gb) in enumerate(zip(_groups_numpy(x, layout), _groups_numpy(back, layout))):
    s = np.abs(gx).max()
    assert scales[k] == s
    lo, hi = _neighbours(gx.astype(np.float64), s)
    nearest = np.minimum(np.abs(gx - lo), np.abs(gx - hi))
    assert np.all(np.abs(gb - gx) <= nearest + 1e-6 * s), (k, gx, gb)


def test_zero_group_same_sign_group_and_tiny_values():
  x = np.zeros((3, 256), np.float32)
  x[1] = np.linspace(1.0, 2.0, 256)                 # all positive: no zero point drift
  x[2] = np.linspace(-3e-30, -1e-30, 256)           # far below the reference's 1e-5 floor
  layout = Q.group_layout(x.shape, 256)
  qa = Q.quantize(jnp.asarray(x), layout)
  back = np.asarray(Q.dequantize(qa, layout))
  np.testing.assert_array_equal(back[0], 0.0)
  np.testing.assert_array_equal(np.asarray(qa.scales)[0], 0.0)
  top_step = 2 / 127  # largest gap between levels, relative to the group max
  assert np.abs(back[1] - x[1]).max() <= 2.0 * top_step / 2 * (1 + 1e-5)
  assert np.abs(back[2] - x[2]).max() <= 3e-30 * top_step / 2 * (1 + 1e-4)
  assert np.all(back[2] < 0)


def test_square_law_keeps_small_values_a_linear_code_zeroes():
  """Values 1000x below their group's max: a linear 8-bit code (step max/127)
  rounds them to 0; the square-law code keeps them within 5%."""
  x = np.full(256, 1e-3, np.float32)
  x[0] = 1.0
  layout = Q.group_layout(x.shape, 256)
  back = np.asarray(Q.dequantize(Q.quantize(jnp.asarray(x), layout), layout))
  assert np.all(np.abs(back[1:] - 1e-3) <= 0.05e-3)
  assert np.all(np.round(x[1:] * 127) == 0)  # what a linear code would store


def test_column_groups_keep_small_columns_apart_from_large_ones():
  """A (in, out) momentum whose columns differ by 1e6 in size (frequent and
  never-seen tokens of an output layer): column groups keep every column's
  values to their own resolution; 8-wide row groups mix columns and zero the
  small ones."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(512, 8)).astype(np.float32)
  x[:, 1::2] *= 1e-6
  cols = Q.group_layout(x.shape, 256, 1)
  back = np.asarray(Q.dequantize(Q.quantize(jnp.asarray(x), cols), cols))
  small = x[:, 1::2]
  assert np.all(np.abs(back[:, 1::2] - small) <= np.abs(small).max() / 127 * 1.0001)
  rows = Q.group_layout(x.shape, 256)  # 8-wide rows: groups of 32 rows x 8 columns
  zeroed = np.asarray(Q.dequantize(Q.quantize(jnp.asarray(x), rows), rows))[:, 1::2]
  assert np.mean(zeroed == 0) > 0.9


def test_stochastic_rounding_picks_neighbours_and_is_unbiased():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(512,)).astype(np.float32)
  layout = Q.group_layout(x.shape, 256)
  n = 4000
  noise = jax.random.uniform(jax.random.key(0), (n, 512))
  q = jax.vmap(lambda u: Q.quantize(jnp.asarray(x), layout, u))(noise)
  back = np.asarray(jax.vmap(lambda c, s: Q.dequantize(Q.QuantizedArray(c, s), layout))(
      q.codes, q.scales), np.float64)
  pairs = [_neighbours(part.astype(np.float64), np.abs(part).max()) for part in x.reshape(2, 256)]
  lo, hi = (np.concatenate(side) for side in zip(*pairs))
  assert np.all(np.isclose(back, lo, rtol=1e-6, atol=0) | np.isclose(back, hi, rtol=1e-6, atol=0))
  err = back.mean(0) - x
  sigma = (hi - lo) / 2 / np.sqrt(n)  # std of one draw <= (hi - lo)/2
  assert np.all(np.abs(err) <= 5 * sigma + 1e-7)
  # round-to-nearest is biased for these values: the mean error is not ~0
  rtn = np.asarray(Q.dequantize(Q.quantize(jnp.asarray(x), layout), layout))
  assert np.abs(rtn - x).mean() > 10 * np.abs(err).mean()


def test_linear_code_rows_hand_computed():
  layout = Q.group_layout((2, 4), 4)  # one group of 4 per row
  x = jnp.array([[-1.27, 0.5, 0.126, 0.004], [0.0, 0.0, 0.0, 0.0]])
  q = Q.quantize(x, layout, linear=True)
  # s = 1.27, 127 x / s = [-127, 50, 12.6, 0.4] -> nearest [-127, 50, 13, 0]; zero row: s = 0.
  np.testing.assert_array_equal(q.codes, [[-127, 50, 13, 0], [0, 0, 0, 0]])
  assert q.codes.dtype == jnp.int8
  np.testing.assert_allclose(q.scales, [[1.27], [0.0]], rtol=1e-7)
  np.testing.assert_allclose(Q.dequantize(q, layout, linear=True),
                             [[-1.27, 0.5, 0.13, 0.0], [0.0] * 4], rtol=1e-6, atol=1e-8)
  # Stochastic rounding: code = floor(12.6 + r) for 0.126, floor(0.4 + r) for 0.004.
  noise = jnp.array([[0.0, 0.0, 0.39, 0.59], [0.5] * 4])
  np.testing.assert_array_equal(Q.quantize(x, layout, noise, linear=True).codes[0], [-127, 50, 12, 0])
  noise = jnp.array([[0.0, 0.0, 0.41, 0.61], [0.5] * 4])
  np.testing.assert_array_equal(Q.quantize(x, layout, noise, linear=True).codes[0], [-127, 50, 13, 1])


def test_linear_code_columns_hand_computed():
  layout = Q.group_layout((3, 2), 2, column_axes=1)  # groups of 2 down each column, ragged
  x = jnp.array([[1.0, -2.0], [0.4, 0.9], [0.3, -0.02]])
  q = Q.quantize(x, layout, linear=True)
  # Column 0: [1, 0.4] (s=1) -> [127, 50.8 -> 51]; [0.3] (s=0.3) -> [127].
  # Column 1: [-2, 0.9] (s=2) -> [-127, 57.15 -> 57]; [-0.02] (s=0.02) -> [-127].
  np.testing.assert_array_equal(q.codes, [[127, -127], [51, 57], [127, -127]])
  np.testing.assert_allclose(q.scales, [[1.0, 2.0], [0.3, 0.02]], rtol=1e-7)
  np.testing.assert_allclose(Q.dequantize(q, layout, linear=True),
                             [[1.0, -2.0], [51 / 127, 2 * 57 / 127], [0.3, -0.02]], rtol=1e-6)


@pytest.mark.parametrize("kwargs", [
    dict(group_size=0), dict(group_size=-256), dict(group_size=2.5), dict(group_size="256"),
    dict(group_size=None), dict(group_size=True), dict(min_size=-1), dict(min_size=4096.0),
])
def test_int8_quantization_refuses_bad_settings(kwargs):
  """At construction, with a message naming the setting and the value given."""
  (name, value), = kwargs.items()
  message = rf"^Int8Quantization\.{name} must be .*, got {re.escape(repr(value))}\.$"
  with pytest.raises(ValueError, match=message):
    Int8Quantization(**kwargs)


def test_int8_quantization_accepts_the_edges():
  """group_size 1 and min_size 0 (every leaf in INT8) are valid, NumPy ints too."""
  quantization = Int8Quantization(group_size=np.int64(1), min_size=np.int32(0))
  assert (quantization.group_size, quantization.min_size) == (1, 0)
  assert Int8Quantization() == Int8Quantization(256, 4096)  # the documented defaults


def _log_neighbours(x, s):
  """The two levels of the logarithmic code around each of ``x`` (float64): the
  values ``s * 2^(k/8)``, ``k = -254..0``, and 0."""
  levels = np.concatenate([[0.0], s * 2.0 ** (np.arange(-254, 1) / 8)])
  hi = levels[np.minimum(np.searchsorted(levels, x, side="left"), levels.size - 1)]
  lo = levels[np.maximum(np.searchsorted(levels, x, side="right") - 1, 0)]
  return lo, hi


def test_log_code_hand_computed():
  """One row group of 8: the max is the top level (code 127); 2^(-1/8) of it is
  code 126; 0 is code -128; the lowest level s * 2^(-254/8) is code -127; a
  value a third of the way from a level to the next rounds down, two thirds up."""
  s = 4.0
  lvl = lambda k: s * 2.0 ** (k / 8)
  x = np.array([s, lvl(-1), 0.0, lvl(-254), lvl(-9) + (lvl(-8) - lvl(-9)) / 3,
                lvl(-9) + 2 * (lvl(-8) - lvl(-9)) / 3, lvl(-254) / 3, lvl(-40)], np.float32)
  layout = Q.group_layout((1, 8), 8)
  q = Q.quantize_log(jnp.asarray(x[None]), layout)
  np.testing.assert_array_equal(q.codes[0], [127, 126, -128, -127, 118, 119, -128, 87])
  np.testing.assert_array_equal(q.scales, [[s]])
  back = np.asarray(Q.dequantize_log(q, layout))[0]
  np.testing.assert_allclose(back, [s, lvl(-1), 0, lvl(-254), lvl(-9), lvl(-8), 0, lvl(-40)],
                             rtol=1e-6)


def test_log_code_stays_within_a_level_and_stochastic_rounding_is_unbiased():
  """Over six decades of values: nearest is one of the two neighbouring levels
  (at most 9.05% off above the lowest level); stochastic draws land on those
  two and average to the value."""
  rng = np.random.default_rng(1)
  x = (10.0 ** rng.uniform(-6, 0, 512)).astype(np.float32)
  layout = Q.group_layout(x.shape, 256)
  pairs = [_log_neighbours(part.astype(np.float64), part.max()) for part in x.reshape(2, 256)]
  lo, hi = (np.concatenate(side) for side in zip(*pairs))
  nearest = np.asarray(Q.dequantize_log(Q.quantize_log(jnp.asarray(x), layout), layout))
  assert np.all(np.isclose(nearest, lo, rtol=1e-6) | np.isclose(nearest, hi, rtol=1e-6))
  assert np.abs(nearest / x - 1).max() <= 2 ** (1 / 8) - 1 + 1e-6
  n = 4000
  noise = jax.random.uniform(jax.random.key(0), (n, 512))
  back = np.asarray(jax.vmap(lambda u: Q.dequantize_log(Q.quantize_log(jnp.asarray(x), layout, u),
                                                        layout))(noise), np.float64)
  assert np.all(np.isclose(back, lo, rtol=1e-6, atol=0) | np.isclose(back, hi, rtol=1e-6, atol=0))
  sigma = (hi - lo) / 2 / np.sqrt(n)
  assert np.all(np.abs(back.mean(0) - x) <= 5 * sigma + 1e-12)
