"""nnx_layers.Linear / Embed: nnx's layers with float weights, dequantized values with INT8 ones."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import qadam_mini_jax as q
from qadam_mini_jax import nnx_layers

QUANT = q.Int8Quantization(min_size=256)


def _pair(ours, theirs, *args, **kwargs):
  return ours(*args, rngs=nnx.Rngs(0), **kwargs), theirs(*args, rngs=nnx.Rngs(0), **kwargs)


def test_float_weights_compute_what_nnx_computes():
  x = jax.random.normal(jax.random.key(1), (3, 5, 32))
  ours, theirs = _pair(nnx_layers.Linear, nnx.Linear, 32, 48)
  np.testing.assert_array_equal(ours(x), theirs(x))
  ours, theirs = _pair(nnx_layers.Linear, nnx.Linear, 32, 48, dtype=jnp.bfloat16)
  assert ours(x).dtype == jnp.bfloat16
  np.testing.assert_array_equal(ours(x), theirs(x))
  tokens = jnp.asarray([[0, 5, 99], [3, 3, 1]])
  ours, theirs = _pair(nnx_layers.Embed, nnx.Embed, 100, 32)
  np.testing.assert_array_equal(ours(tokens), theirs(tokens))


def test_int8_weights_are_used_as_their_dequantized_values():
  linear = nnx_layers.Linear(64, 48, rngs=nnx.Rngs(0))
  embed = nnx_layers.Embed(100, 32, rngs=nnx.Rngs(0))
  x, tokens = jax.random.normal(jax.random.key(1), (4, 64)), jnp.asarray([0, 7, 99, 7])
  for module, inputs, name in ((linear, x, "kernel"), (embed, tokens, "embedding")):
    params = nnx.state(module, nnx.Param)
    pure = nnx.to_pure_dict(params)
    quantized = q.quantize_params({"lm_head" if name == "kernel" else "embed": pure},
                                  quantization=QUANT)
    value = next(iter(quantized.values()))
    assert isinstance(value[name], q.QuantizedParam)
    want = jnp.asarray(q.weights.dequantize(value[name]))
    nnx.replace_by_pure_dict(params, value)
    nnx.update(module, params)
    got = jax.jit(lambda m, i: m(i))(module, inputs)
    expected = x @ want if name == "kernel" else want[tokens]
    np.testing.assert_allclose(got, expected + (linear.bias.get_value() if name == "kernel" else 0),
                               rtol=1e-6, atol=1e-6)  # matmul summation order
