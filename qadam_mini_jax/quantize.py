"""Group-wise 8-bit storage of the first moment with a square-law code (Q-Adam-mini).

(And of non-negative values, Adam's ``v``, with a logarithmic code:
:func:`quantize_log`.)

Scheme (chosen to avoid the reference implementation's flaws, and measured in
``benchmarks/quantization_error.py``):

* A leaf is viewed as a matrix ``(a, b)`` by splitting its axes in two, and
  groups are ``group_size`` consecutive elements of one column (``columns``
  layout: the first ``split`` axes form ``a``) or of one row (``rows`` layout).
  The last group of a column or row may be shorter (ragged), so no shape has
  to divide by the group size.
* Groups follow the Adam-mini blocks: a Flax ``(in, out)`` kernel has one block
  per output neuron, a column, so its groups run down the columns (over
  ``in``) and never mix neurons, whose momenta can differ by orders of
  magnitude (frequent and never-seen tokens of an output layer). Leaves whose
  blocks do not start with a reduced leading axis (embedding rows, biases,
  whole-tensor blocks) use the rows layout, where a row is the shortest suffix
  of trailing axes holding at least ``group_size`` elements.
* Square-law code, symmetric: each group stores ``s = max|m|`` (float32) and
  codes ``c`` in ``[-127, 127]`` with value ``s * sign(c) * (c/127)^2``. Levels
  are dense near zero (the smallest is ``s/16129``, against ``s/254`` for a
  linear code) where most momentum values of a group lie, so far fewer
  elements round to zero; the top step is ``2s/127``. Zero is exact, a group
  whose values share one sign keeps its full resolution (no zero point clamped
  to [0, 255] pulling it toward zero), and there is no range floor: an
  all-zero group stores ``s = 0``.
* Rounding picks one of the two neighbouring levels ``lo <= |m| <= hi``:
  ``k + floor(f + r)`` with ``f = (|m| - lo)/(hi - lo)``, ``r = 1/2`` for
  round-to-nearest and ``r ~ U[0, 1)`` for stochastic rounding, which is then
  unbiased in value: ``E[value] = m``. It is computed as a comparison
  (:func:`encode`), with one reciprocal per group and none per element.
* Cost: 1 byte per element plus 4 bytes per group, 1.0156 B/param for
  groups of 256.

``floor(x + r)`` is used instead of ``round`` because the Triton lowering has
no ``round``; :func:`encode` and :func:`decode` are elementwise and are called
by the GPU kernel too, so both paths do the same arithmetic.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

QMAX = 127
#: Mantissa bits of INT8 weights' group scales (:func:`coarse_scale`, :mod:`.weights`).
WEIGHT_SCALE_BITS = 3


class QuantizedArray(NamedTuple):
  """INT8 codes in the parameter's shape and each group's float32 ``max|m|``.

  ``scales`` has shape :attr:`GroupLayout.scales_shape`; dequantized value =
  :func:`decode` ``(code, scale)``.
  """

  codes: jax.Array
  scales: jax.Array


class GroupLayout(NamedTuple):
  """How a leaf of ``shape`` is cut into groups.

  The leaf is the matrix ``(a, b)`` = (product of ``shape[:split]``, product
  of the rest). With ``columns`` the groups run down each column (scales
  ``(groups, b)``), else along each row (scales ``(a, groups)``).
  """

  shape: tuple[int, ...]
  split: int
  columns: bool
  group_size: int

  @property
  def a(self) -> int:
    return math.prod(self.shape[:self.split])

  @property
  def b(self) -> int:
    return math.prod(self.shape[self.split:])

  @property
  def groups(self) -> int:
    """Groups per column (``columns``) or per row."""
    return -(-(self.a if self.columns else self.b) // self.group_size)

  @property
  def scales_shape(self) -> tuple[int, ...]:
    if self.columns:
      return (self.groups,) + self.shape[self.split:]
    return self.shape[:self.split] + (self.groups,)


def group_layout(shape: tuple[int, ...], group_size: int, column_axes: int = 0) -> GroupLayout:
  """Columns layout over the first ``column_axes`` axes, or rows if 0 or all."""
  shape = tuple(shape)
  if 0 < column_axes < len(shape):
    return GroupLayout(shape, column_axes, True, group_size)
  split, row_length = len(shape), 1
  while split > 0 and row_length < group_size:
    split -= 1
    row_length *= shape[split]
  return GroupLayout(shape, split, False, group_size)


def _grouped(x: jax.Array, layout: GroupLayout) -> jax.Array:
  """``x`` as ``(a, groups, group_size)`` (rows) or ``(groups, group_size, b)``."""
  g = layout.group_size
  x = x.reshape(layout.a, layout.b)
  if layout.columns:
    x = jnp.pad(x, [(0, layout.groups * g - layout.a), (0, 0)])
    return x.reshape(layout.groups, g, layout.b)
  x = jnp.pad(x, [(0, 0), (0, layout.groups * g - layout.b)])
  return x.reshape(layout.a, layout.groups, g)


def _ungrouped(x: jax.Array, layout: GroupLayout) -> jax.Array:
  if layout.columns:
    x = x.reshape(-1, layout.b)[:layout.a]
  else:
    x = x.reshape(layout.a, -1)[:, :layout.b]
  return x.reshape(layout.shape)


def _group_axis(layout: GroupLayout) -> int:
  return 1 if layout.columns else 2


_LEVELS = QMAX * QMAX
_INV_LEVELS = np.float32(1.0 / _LEVELS)
_INV_QMAX = np.float32(1.0 / QMAX)


def encode(m: jax.Array, scale: jax.Array, r: jax.Array | float, linear: bool = False) -> jax.Array:
  """int8 codes of ``m`` (float32) in groups of max ``scale`` (broadcastable).

  ``r = 0.5`` rounds to the nearest level, ``r ~ U[0, 1)`` stochastically.
  Square-law: in level units ``y = 127^2 |m| / s`` the levels are the squares
  ``k^2``; the code is ``k = floor(sqrt(y))`` plus one when
  ``y - k^2 >= (1 - r)(2k + 1)``, which is ``k + floor(f + r)`` for
  ``f = (y - k^2)/((k+1)^2 - k^2)`` without a division per element: the one
  division, ``127^2 / s``, is per group. ``linear``: ``y = 127 |m| / s``,
  levels ``k``, plus one when ``y - k >= 1 - r``.
  """
  levels = QMAX if linear else _LEVELS
  inv_scale = jnp.where(scale > 0, np.float32(levels) / jnp.where(scale > 0, scale, 1.0), 0.0)
  y = jnp.abs(m) * inv_scale
  if linear:
    k = jnp.floor(y)
    up = y - k >= 1.0 - r
  else:
    k = jnp.floor(jnp.sqrt(y))
    up = y - k * k >= (1.0 - r) * (2.0 * k + 1.0)
  code = jnp.minimum(jnp.where(up, k + 1.0, k), np.float32(QMAX))
  return jnp.where(m < 0, -code, code).astype(jnp.int8)


def decode(codes: jax.Array, scale: jax.Array, linear: bool = False) -> jax.Array:
  """float32 values ``scale * sign(c) * (c/127)^2`` of int8 ``codes`` (``linear``: ``scale * c/127``)."""
  c = codes.astype(jnp.float32)
  if linear:
    return c * _INV_QMAX * scale
  return c * jnp.abs(c) * _INV_LEVELS * scale


def coarse_scale(scale: jax.Array, mantissa_bits: int) -> jax.Array:
  """The smallest float32 ``>= scale`` with ``mantissa_bits`` mantissa bits (bitwise, exact).

  INT8 weights take their group scales from this grid (:mod:`.weights`): a
  scale then moves only when the group's range crosses a grid point (steps
  of at most ``2^-mantissa_bits``), so re-quantizing after a small update
  leaves every other element exactly where it was instead of re-rounding
  the whole group to follow its largest element.
  """
  drop = 23 - mantissa_bits
  bits = jax.lax.bitcast_convert_type(scale, jnp.uint32) + np.uint32((1 << drop) - 1)
  return jax.lax.bitcast_convert_type(bits & np.uint32(0xFFFFFFFF ^ ((1 << drop) - 1)), jnp.float32)


def quantize(x: jax.Array, layout: GroupLayout, noise: jax.Array | None = None,
             scale_bits: int | None = None, linear: bool = False) -> QuantizedArray:
  """Quantize ``x`` group-wise to int8.

  Args:
    x: float array of ``layout.shape`` (computed in float32).
    layout: the grouping (:func:`group_layout`).
    noise: uniform [0, 1) float32 array of ``x``'s shape for stochastic
      rounding, or ``None`` for round-to-nearest.
    scale_bits: scales on the grid of :func:`coarse_scale` with these
      mantissa bits; ``None``: each group's exact ``max|x|``.
    linear: the linear code ``s * c/127`` instead of the square-law one
      (INT8 weights, :mod:`.weights`).
  """
  g = _grouped(x.astype(jnp.float32), layout)
  scales = jnp.max(jnp.abs(g), axis=_group_axis(layout), keepdims=True)
  if scale_bits is not None:
    scales = coarse_scale(scales, scale_bits)
  r = np.float32(0.5) if noise is None else _grouped(noise, layout)
  return QuantizedArray(_ungrouped(encode(g, scales, r, linear), layout),
                        scales.reshape(layout.scales_shape))


def _group_scales(q: QuantizedArray, layout: GroupLayout) -> jax.Array:
  """``q``'s scales, broadcastable against its grouped codes."""
  return jnp.expand_dims(q.scales.reshape(
      (layout.groups, layout.b) if layout.columns else (layout.a, layout.groups)),
      _group_axis(layout))


def dequantize(q: QuantizedArray, layout: GroupLayout, linear: bool = False) -> jax.Array:
  """float32 values of a :func:`quantize` result (of the same ``linear``)."""
  return _ungrouped(decode(_grouped(q.codes, layout), _group_scales(q, layout), linear), layout)


#: Levels per octave of the logarithmic code (:func:`quantize_log`).
LOG_PER_OCTAVE = 8
_LOG_ZERO = -(2 * QMAX + 1)  # level index of 0: below the lowest, s * 2^(-254/8)


def _log_level(k: jax.Array, scale: jax.Array) -> jax.Array:
  """The value of level ``k`` (``<= 0``) of a group of max ``scale``."""
  return jnp.where(k <= _LOG_ZERO, 0.0, scale * jnp.exp2(k * np.float32(1.0 / LOG_PER_OCTAVE)))


def encode_log(x: jax.Array, scale: jax.Array, r: jax.Array | float) -> jax.Array:
  """int8 codes of non-negative ``x`` (float32) in the logarithmic code of groups of max ``scale``.

  Code ``c`` in ``[-127, 127]`` stands for ``scale * 2^((c - 127)/8)`` (255
  levels over 32 octaves, each 9.05% above the one below; the top one is the
  group's max) and ``-128`` for 0. ``x`` rounds to one of its two
  neighbouring levels ``lo <= x <= hi``: up when ``x - lo >= (1 - r)(hi -
  lo)``, so ``r ~ U[0, 1)`` is unbiased in value (``E[value] = x``) and
  ``r = 0.5`` is the nearest. Below the lowest level the neighbours are 0
  and that level.
  """
  ratio = jnp.where((x > 0) & (scale > 0), x / jnp.where(scale > 0, scale, 1.0), 0.0)
  k = jnp.clip(jnp.floor(jnp.log2(ratio) * np.float32(LOG_PER_OCTAVE)), _LOG_ZERO, 0.0)
  lo, hi = _log_level(k, scale), _log_level(jnp.minimum(k + 1.0, 0.0), scale)
  k = jnp.minimum(jnp.where(x - lo >= (1.0 - r) * (hi - lo), k + 1.0, k), 0.0)
  return (k + np.float32(QMAX)).astype(jnp.int8)


def decode_log(codes: jax.Array, scale: jax.Array) -> jax.Array:
  """float32 values of :func:`encode_log`'s ``codes``."""
  return _log_level(codes.astype(jnp.float32) - np.float32(QMAX), scale)


def quantize_log(x: jax.Array, layout: GroupLayout, noise: jax.Array | None = None) -> QuantizedArray:
  """Non-negative ``x`` (Adam's ``v``) group-wise in the logarithmic code of
  :func:`encode_log`, with each group's max as its scale. Measured against
  linear and square-law codes on ``v`` and on ``sqrt(v)`` over a run:
  ``benchmarks/second_moment_code.py``."""
  g = _grouped(x.astype(jnp.float32), layout)
  scales = jnp.max(g, axis=_group_axis(layout), keepdims=True)
  r = np.float32(0.5) if noise is None else _grouped(noise, layout)
  return QuantizedArray(_ungrouped(encode_log(g, scales, r), layout),
                        scales.reshape(layout.scales_shape))


def dequantize_log(q: QuantizedArray, layout: GroupLayout) -> jax.Array:
  """float32 values of a :func:`quantize_log` result."""
  return _ungrouped(decode_log(_grouped(q.codes, layout), _group_scales(q, layout)), layout)
