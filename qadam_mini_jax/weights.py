"""INT8 weights with no float master copy (Q-Adam-mini's ``--weight_quant``, after Q-GaLore).

A weight matrix is stored as :class:`QuantizedParam`: int8 codes in its shape
and one float32 scale per group of 256, the groups placed as the INT8 first
moment's (:func:`.storage.layout_for`: inside one Adam-mini block, never
mixing output neurons). The code is linear, ``s * c/127`` with ``c`` in
``[-127, 127]`` (:func:`.quantize.encode` with ``linear=True``), not the
momentum's square-law code: on trained weights, whose groups are near-Gaussian
(max/rms about 2.3-3.2), it has 2-11% lower round-trip error and
re-quantization drift (``benchmarks/weight_quantization.py``); each group's
scale is ``max|w|`` rounded up to a coarse grid (3 mantissa bits, at most 1/8
above: :data:`.quantize.WEIGHT_SCALE_BITS`), so re-quantizing after a small
update moves only what the update moved.
Vectors (norms, biases) and leaves under ``min_size`` elements stay in float.

Training: the model dequantizes each weight where it uses it
(:func:`dequantize`; ``qadam_mini_jax.nnx_layers`` for Flax NNX), so under
``jax.checkpoint`` no float copy of all weights is kept; :func:`value_and_grad`
gives float gradients with the weights' shapes, and
:func:`~qadam_mini_jax.fused_q_adam_mini` adds the update and re-quantizes,
``w <- Q(w + delta)``, with stochastic rounding from the counter-based bits of
:mod:`.random_bits` (a stream apart from ``m``'s). Updates far below half a
quantization step are kept on average by stochastic rounding; round-to-nearest
drops them (the stall seen in Q-Adam-mini's logs: loss 5.49 against 3.84).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import quantize as quantize_lib
from qadam_mini_jax import storage as storage_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedParam:
  """A weight stored in group-wise INT8.

  Attributes:
    codes: int8 codes in the weight's shape.
    scales: float32 ``max|w|`` per group (one layer's scales, with the layer
      axes of a stacked leaf inserted as in :func:`.storage.stacked_shape`).
    layout: one layer's grouping (static).
    layers: the weight's layer axes (stacked layers), as its ``BlockSpec``'s (static).
    dtype: dtype of the dequantized weight and of its gradient (static).
    stochastic: whether the optimizer re-quantizes with stochastic rounding (static).
    carrier: ``None``, except inside :func:`value_and_grad`, where it receives
      the weight's gradient.
  """

  codes: jax.Array
  scales: jax.Array
  layout: quantize_lib.GroupLayout = dataclasses.field(metadata={"static": True})
  layers: tuple[int, ...] = dataclasses.field(metadata={"static": True})
  dtype: Any = dataclasses.field(metadata={"static": True})
  stochastic: bool = dataclasses.field(default=True, metadata={"static": True})
  carrier: jax.Array | None = None

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape)

  @property
  def stacked(self) -> bool:
    """Whether this holds several layers (``nnx.scan`` hands the body one)."""
    return self.codes.ndim > len(self.layout.shape)


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedParam)


def _layer_axes(q: QuantizedParam) -> QuantizedParam:
  """``q`` with its arrays replaced by the positions of their layer axes."""
  spec = partition_lib.BlockSpec(axes=(), layers=q.layers)
  return dataclasses.replace(
      q, codes=q.layers,
      scales=storage_lib.stacked_axes(spec, len(q.layout.scales_shape)), carrier=None)


def _values(q: QuantizedParam) -> jax.Array:
  def one(q):
    return quantize_lib.dequantize(quantize_lib.QuantizedArray(q.codes, q.scales), q.layout,
                                   linear=True)
  if q.stacked:
    one = partition_lib.per_layer(one, (_layer_axes(q),), q.layers)
  return one(q).astype(q.dtype)


@jax.custom_vjp
def _dequantize_with_carrier(q: QuantizedParam, carrier: jax.Array) -> jax.Array:
  del carrier
  return _values(q)


def _forward(q, carrier):
  del carrier
  return _values(q), q


def _backward(q, cotangent):
  """The weight's gradient goes to the carrier (of the value's dtype), none to its codes."""
  zero_codes = np.zeros(q.codes.shape, jax.dtypes.float0)
  return dataclasses.replace(q, codes=zero_codes, scales=jnp.zeros_like(q.scales)), cotangent


_dequantize_with_carrier.defvjp(_forward, _backward)


def dequantize(x: Any) -> jax.Array:
  """The float value of a weight: ``x`` itself, or a :class:`QuantizedParam` decoded.

  Inside :func:`value_and_grad` the weight's gradient flows to its carrier.
  """
  if not is_quantized(x):
    return x
  if x.carrier is None:
    return _values(x)
  return _dequantize_with_carrier(dataclasses.replace(x, carrier=None), x.carrier)


def _with_carriers(params: Any) -> tuple[Any, Callable[[Any], Any]]:
  """``(slots, fill)``: ``params`` with each INT8 weight as a zero carrier of its
  value's shape, and ``fill(slots)``, the weights again with those carriers."""
  slots = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype) if is_quantized(x) else x,
                       params, is_leaf=is_quantized)

  def fill(slots):
    return jax.tree.map(lambda x, s: dataclasses.replace(x, carrier=s) if is_quantized(x) else s,
                        params, slots, is_leaf=is_quantized)
  return slots, fill


def value_and_grad(fn: Callable[..., Any], has_aux: bool = False) -> Callable[..., Any]:
  """``jax.value_and_grad`` of ``fn(params, *args)`` for params holding INT8 weights.

  The gradient tree has a float array (the weight's ``dtype`` and shape) where
  ``params`` has a :class:`QuantizedParam`; ``fn`` must read weights through
  :func:`dequantize`. The carriers are zeros that the forward pass never
  reads, so under ``jax.jit`` no float copy of the weights is made.
  """
  def wrapped(params, *args, **kwargs):
    slots, fill = _with_carriers(params)
    return jax.value_and_grad(lambda s: fn(fill(s), *args, **kwargs), has_aux=has_aux)(slots)
  return wrapped


def vjp(fn: Callable[..., Any], params: Any, *args: Any) -> tuple[Any, Callable[..., Any]]:
  """``jax.vjp`` of ``fn(params, *args)`` for params holding INT8 weights.

  As :func:`value_and_grad`: the cotangent of ``params`` has a float array
  where ``params`` has a :class:`QuantizedParam`.
  """
  slots, fill = _with_carriers(params)
  return jax.vjp(lambda s, *a: fn(fill(s), *a), slots, *args)


def float_like(params: Any) -> Any:
  """``params`` with each :class:`QuantizedParam` as a ``jax.ShapeDtypeStruct`` of its value."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x,
                      params, is_leaf=is_quantized)


def check_float(params: Any, why: str) -> None:
  """TypeError naming the first :class:`QuantizedParam` in ``params``, with ``why``."""
  for path, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
    if is_quantized(x):
      raise TypeError(f"{partition_lib.path_str(path)} is an INT8 weight (QuantizedParam): {why}.")


def codes_of(params: Any) -> Any:
  """``params`` with each :class:`QuantizedParam` as its codes (which carry its sharding)."""
  return jax.tree.map(lambda x: x.codes if is_quantized(x) else x, params, is_leaf=is_quantized)


class WeightStorage:
  """The :mod:`.storage` interface of an INT8 weight (one layer at a time)."""

  def __init__(self, like: QuantizedParam):
    self.like = dataclasses.replace(like, codes=None, scales=None, carrier=None)

  @property
  def stochastic(self) -> bool:
    return self.like.stochastic

  def load(self, q: QuantizedParam) -> jax.Array:
    return quantize_lib.dequantize(quantize_lib.QuantizedArray(q.codes, q.scales),
                                   self.like.layout, linear=True)

  def store(self, value: jax.Array, noise: jax.Array | None) -> QuantizedParam:
    return self.wrap(quantize_lib.quantize(value, self.like.layout, noise,
                                             quantize_lib.WEIGHT_SCALE_BITS, linear=True))

  def wrap(self, q: quantize_lib.QuantizedArray) -> QuantizedParam:
    """The weight of codes and scales ``q`` (from ``quantize`` or the fused kernel)."""
    return dataclasses.replace(self.like, codes=q.codes, scales=q.scales)

  def layer_axes(self, spec: partition_lib.BlockSpec) -> QuantizedParam:
    del spec  # checked equal to the weight's own layer axes (storage_of)
    return _layer_axes(self.like)


def storage_of(p: Any, path: str, spec: partition_lib.BlockSpec,
               shape: tuple[int, ...]) -> WeightStorage | None:
  """The storage of an INT8 parameter ``p`` (``None`` for a float one).

  Raises:
    ValueError: naming ``path``, when ``p`` does not fit the gradient's shape
      or its layer axes are not the partition's.
  """
  if not is_quantized(p):
    return None
  if p.shape != shape or p.layers != spec.layers or p.stacked != bool(spec.layers):
    raise ValueError(
        f"{path}: the INT8 weight of shape {p.shape} (layer axes {p.layers}) does not fit the "
        f"gradient of shape {shape} with layer axes {spec.layers}; quantize_params must be "
        "given the optimizer's partition.")
  return WeightStorage(p)


def quantize_params(params: Any, partition: partition_lib.BlockPartition | None = None,
                    quantization: storage_lib.Int8Quantization = storage_lib.Int8Quantization(),
                    *, stochastic: bool = True) -> Any:
  """``params`` with every weight matrix stored as a :class:`QuantizedParam`.

  Leaves whose layers have rank < 2 (norms, biases), fewer than
  ``quantization.min_size`` elements, or no float dtype stay as they are.
  Groups follow the Adam-mini blocks of ``partition`` (pass the optimizer's).
  Quantized with round-to-nearest; ``stochastic`` sets how the optimizer
  re-quantizes them after each step.
  """
  partition = partition_lib.BlockPartition() if partition is None else partition
  specs = partition_lib.block_specs(params, partition)

  def convert(spec, x):
    if spec is None:
      return x
    _, layer_shape = partition_lib.layer_slice(spec, tuple(x.shape))
    if len(layer_shape) < 2 or not storage_lib.quantizes(spec, tuple(x.shape), quantization):
      return x
    like = QuantizedParam(None, None, storage_lib.layout_for(spec, tuple(x.shape), quantization),
                          spec.layers, jnp.dtype(x.dtype), stochastic)
    store = WeightStorage(like).store
    if not spec.layers:
      return store(x.astype(jnp.float32), None)
    return partition_lib.per_layer(lambda w: store(w, None), (spec.layers,),
                                     _layer_axes(like))(x.astype(jnp.float32))
  return jax.tree.map(convert, specs, params,
                      is_leaf=lambda s: s is None or isinstance(s, partition_lib.BlockSpec))


def dequantize_params(params: Any) -> Any:
  """``params`` with every :class:`QuantizedParam` as its float value."""
  return jax.tree.map(dequantize, params, is_leaf=is_quantized)
