"""benchmarks/weight_quantization.py: its linear INT8 code and unbiased SR re-quantization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import weight_quantization as wq  # benchmarks/, on sys.path through conftest.py
from qadam_mini_jax import quantize as Q


def test_linear_code_rows_hand_computed():
  layout = Q.group_layout((2, 4), 4)  # one group of 4 per row
  x = jnp.array([[-1.27, 0.5, 0.126, 0.004], [0.0, 0.0, 0.0, 0.0]])
  q = wq.linear_quantize(x, layout)
  # s = 1.27, 127 x / s = [-127, 50, 12.6, 0.4] -> nearest [-127, 50, 13, 0]; zero row: s = 0.
  np.testing.assert_array_equal(q.codes, [[-127, 50, 13, 0], [0, 0, 0, 0]])
  assert q.codes.dtype == jnp.int8
  np.testing.assert_allclose(q.scales, [[1.27], [0.0]], rtol=1e-7)
  np.testing.assert_allclose(wq.linear_dequantize(q, layout),
                             [[-1.27, 0.5, 0.13, 0.0], [0.0] * 4], rtol=1e-6, atol=1e-8)
  # Stochastic rounding: code = floor(12.6 + r) for 0.126, floor(0.4 + r) for 0.004.
  noise = jnp.array([[0.0, 0.0, 0.39, 0.59], [0.5] * 4])
  np.testing.assert_array_equal(wq.linear_quantize(x, layout, noise).codes[0], [-127, 50, 12, 0])
  noise = jnp.array([[0.0, 0.0, 0.41, 0.61], [0.5] * 4])
  np.testing.assert_array_equal(wq.linear_quantize(x, layout, noise).codes[0], [-127, 50, 13, 1])


def test_linear_code_columns_hand_computed():
  layout = Q.group_layout((3, 2), 2, column_axes=1)  # groups of 2 down each column, ragged
  x = jnp.array([[1.0, -2.0], [0.4, 0.9], [0.3, -0.02]])
  q = wq.linear_quantize(x, layout)
  # Column 0: [1, 0.4] (s=1) -> [127, 50.8 -> 51]; [0.3] (s=0.3) -> [127].
  # Column 1: [-2, 0.9] (s=2) -> [-127, 57.15 -> 57]; [-0.02] (s=0.02) -> [-127].
  np.testing.assert_array_equal(q.codes, [[127, -127], [51, 57], [127, -127]])
  np.testing.assert_allclose(q.scales, [[1.0, 2.0], [0.3, 0.02]], rtol=1e-7)
  np.testing.assert_allclose(wq.linear_dequantize(q, layout),
                             [[1.0, -2.0], [51 / 127, 2 * 57 / 127], [0.3, -0.02]], rtol=1e-6)


@pytest.mark.parametrize("code", wq.CODES)
def test_sr_requantization_is_unbiased_and_rtn_stalls(code):
  """``T`` steps of ``w <- Q(w + delta)`` with updates ~0.1-0.2 of a level step.

  SR: the mean over ``N`` independent noise draws of ``W_T - (Q0 + T delta)``,
  taken along ``sign(delta)`` and pooled over the elements, is within 4
  standard errors (estimated from the draws) of 0 and below 1% of
  ``mean |T delta|``. RTN (same updates) keeps under a quarter of the update.
  """
  steps, draws = 16, 256
  layout = Q.group_layout((256, 8), 256, column_axes=1)  # a kernel: groups down `in`
  keys = jax.random.split(jax.random.key(0), 3)
  w = 0.02 * jax.random.normal(keys[0], (256, 8))
  q0 = wq.roundtrip(code, w, layout)
  delta = 5e-5 * jax.random.rademacher(keys[1], w.shape, jnp.float32)  # levels ~3e-4..5e-4

  def trajectory(key, rounding):
    def body(t, x):
      noise = jax.random.uniform(jax.random.fold_in(key, t), x.shape)
      return wq.requantize(code, x, delta, layout, noise if rounding == "SR" else None)
    return jax.lax.fori_loop(0, steps, body, q0)

  target = q0 + steps * delta
  along = jax.jit(jax.vmap(lambda k: (trajectory(k, "SR") - target) * jnp.sign(delta)))(
      jax.random.split(keys[2], draws))
  mean_update = float(jnp.mean(jnp.abs(steps * delta)))
  per_element = jnp.mean(along, axis=0)  # mean over draws
  bias = float(jnp.mean(per_element))
  stderr = float(jnp.std(per_element) / np.sqrt(per_element.size))
  assert abs(bias) < 4 * stderr, (bias, stderr)
  assert abs(bias) < 0.01 * mean_update, (bias, mean_update)

  rtn = jax.jit(lambda: trajectory(keys[2], "RTN"))()
  realized = float(jnp.mean((rtn - q0) * jnp.sign(delta))) / mean_update
  assert realized < 0.25, realized
