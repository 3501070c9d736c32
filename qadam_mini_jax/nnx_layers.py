"""Flax NNX ``Linear`` and ``Embed`` whose weights may be stored in INT8.

Drop-in subclasses of ``flax.nnx.Linear`` / ``flax.nnx.Embed`` (same
parameters, initialisers and names): a weight that
:func:`qadam_mini_jax.weights.quantize_params` turned into a
:class:`~qadam_mini_jax.weights.QuantizedParam` is dequantized where the layer
uses it (:func:`~qadam_mini_jax.weights.dequantize`), so under
``nnx.remat``/``jax.checkpoint`` its float value lives only inside the
layer's forward and backward; a float weight is used as it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qadam_mini_jax import weights


class Linear(nnx.Linear):
  """``nnx.Linear`` whose kernel (and bias) may be a ``QuantizedParam``."""

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    kernel = weights.dequantize(self.kernel.get_value())
    bias = None if self.bias is None else weights.dequantize(self.bias.get_value())
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    kwargs = {"out_sharding": out_sharding}
    if self.preferred_element_type is not None:
      kwargs["preferred_element_type"] = self.preferred_element_type
    y = self.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                         precision=self.precision, **kwargs)
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


class Embed(nnx.Embed):
  """``nnx.Embed`` whose table may be a ``QuantizedParam`` (decoded, then rows taken)."""

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    if out_sharding is not None:
      raise NotImplementedError("qadam_mini_jax.nnx_layers.Embed takes no out_sharding.")
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError("Input type must be an integer or unsigned integer.")
    (embedding,) = self.promote_dtype((weights.dequantize(self.embedding.get_value()),),
                                      dtype=self.dtype, inexact=False)
    return jnp.take(embedding, inputs, axis=0)
