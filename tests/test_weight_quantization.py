"""benchmarks/weight_quantization.py: SR re-quantization is unbiased with both codes, RTN stalls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import weight_quantization as wq  # benchmarks/, on sys.path through conftest.py
from qadam_mini_jax import quantize as Q


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
