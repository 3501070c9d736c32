"""How an optimizer step stores an array between steps: in float, or group-wise INT8.

A storage turns the stored form into float32 values (``load``) and float32
values back into the stored form (``store``, with uniform ``noise`` for
stochastic rounding or ``None`` for round-to-nearest). The first moment uses
:class:`FloatStorage` or :class:`Int8Storage` (Q-Adam-mini's INT8 ``m``);
INT8 weights use :class:`qadam_mini_jax.weights.WeightStorage`, which has the
same three methods. For a leaf that stacks layers, ``load``/``store`` see one
layer and :meth:`layer_axes` says where the layer axes sit in the stored form.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import quantize as quantize_lib


class FloatStorage(NamedTuple):
  """A float array of ``dtype``, cast from float32 (no rounding noise)."""

  dtype: Any

  quantized = False

  def init(self, spec: partition_lib.BlockSpec, shape: tuple[int, ...]) -> jax.Array:
    del spec
    return jnp.zeros(shape, self.dtype)

  def load(self, stored: jax.Array) -> jax.Array:
    return stored.astype(jnp.float32)

  def store(self, value: jax.Array, noise: jax.Array | None) -> jax.Array:
    del noise
    return value.astype(self.dtype)

  def layer_axes(self, spec: partition_lib.BlockSpec) -> tuple[int, ...]:
    return spec.layers


def stacked_axes(spec: partition_lib.BlockSpec, layer_rank: int) -> tuple[int, ...]:
  """Where the layer axes of a stacked leaf sit in an array built per layer
  with ``layer_rank`` axes (INT8 scales): the leaf's own positions, or last."""
  out, rank = [], layer_rank
  for axis in spec.layers:
    out.append(min(axis, rank))
    rank += 1
  return tuple(out)


def stacked_shape(spec: partition_lib.BlockSpec, shape: tuple[int, ...],
                  layer_shape: tuple[int, ...]) -> tuple[int, ...]:
  """``layer_shape`` (one layer's array) with the leaf's layer axes inserted."""
  out = list(layer_shape)
  for axis, at in zip(spec.layers, stacked_axes(spec, len(out))):
    out.insert(at, shape[axis])
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Int8Quantization:
  """INT8 first-moment storage (Q-Adam-mini).

  Attributes:
    group_size: consecutive elements sharing one float32 scale (they run
      inside one Adam-mini block where the layout allows, see
      :func:`layout_for`).
    min_size: leaves with fewer elements keep ``m`` in float (4 B/element;
      they are a negligible share of a large model).
  """

  group_size: int = 256
  min_size: int = 4096

  def __post_init__(self):
    for name in ("group_size", "min_size"):
      value = getattr(self, name)
      least = 1 if name == "group_size" else 0
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
        raise ValueError(f"Int8Quantization.{name} must be an int >= {least}, got {value!r}.")


def layout_for(spec: partition_lib.BlockSpec, shape: tuple[int, ...],
               quantization: Int8Quantization) -> quantize_lib.GroupLayout:
  """INT8 groups of a leaf (of one layer, if it stacks layers): down the columns
  over its leading reduced axes.

  A Flax ``(in, out)`` kernel with a block per output neuron gets groups over
  ``in`` inside each neuron; leaves whose blocks do not reduce axis 0
  (embedding rows, biases) or reduce every axis get row groups.
  """
  spec, shape = partition_lib.layer_slice(spec, shape)
  leading = 0
  while leading < len(shape) and leading in spec.axes:
    leading += 1
  return quantize_lib.group_layout(shape, quantization.group_size, leading)


def quantizes(spec: partition_lib.BlockSpec, shape: tuple[int, ...],
              quantization: Int8Quantization | None) -> bool:
  """Whether a leaf is stored in INT8: its layers hold at least ``min_size`` elements."""
  return quantization is not None and (
      math.prod(partition_lib.layer_slice(spec, shape)[1]) >= quantization.min_size)


class Int8Storage(NamedTuple):
  """Q-Adam-mini's group-wise INT8 ``m`` (:mod:`.quantize`): a :class:`~.quantize.QuantizedArray`.

  ``layout`` is one layer's grouping; a stacked leaf's scales carry the layer
  axes at :func:`stacked_axes`. ``log``: the logarithmic code of
  :func:`.quantize.quantize_log`, for non-negative values (Adam's ``v``).
  """

  layout: quantize_lib.GroupLayout
  log: bool = False

  quantized = True

  def init(self, spec: partition_lib.BlockSpec, shape: tuple[int, ...]) -> quantize_lib.QuantizedArray:
    """``quantize(zeros)``, built directly (no reduction to fold)."""
    return quantize_lib.QuantizedArray(
        jnp.zeros(shape, jnp.int8),
        jnp.zeros(stacked_shape(spec, shape, self.layout.scales_shape), jnp.float32))

  def load(self, stored: Any) -> jax.Array:
    # flax.nnx hands a QuantizedArray back as a State: rebuild it.
    stored = quantize_lib.QuantizedArray(stored.codes, stored.scales)
    if self.log:
      return quantize_lib.dequantize_log(stored, self.layout)
    return quantize_lib.dequantize(stored, self.layout)

  def store(self, value: jax.Array, noise: jax.Array | None) -> quantize_lib.QuantizedArray:
    if self.log:
      return quantize_lib.quantize_log(value, self.layout, noise)
    return quantize_lib.quantize(value, self.layout, noise)

  def layer_axes(self, spec: partition_lib.BlockSpec) -> quantize_lib.QuantizedArray:
    return quantize_lib.QuantizedArray(
        spec.layers, stacked_axes(spec, len(self.layout.scales_shape)))


