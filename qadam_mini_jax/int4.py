"""4-bit storage, two codes per byte: Q-GaLore's projectors and MicroAdam's error feedback.

Both codes are affine over groups of consecutive elements, packed by
:func:`pack` (element ``2i`` in the low nibble of byte ``i``).

:class:`Int4Storage`: Q-GaLore (Zhang et al. 2024, arXiv:2407.08296, Sec. 3.1) stores each
projector in groups of ``group_size`` consecutive elements (row-major), each
with a scale and a zero point: value = ``(c - z) * s``, codes ``c`` in
``0..15``, rounded to nearest. Unlike its code (``q-galore-torch`` 1.0),
which keeps one code per byte and clamps the zero point, so that a group
whose values share one sign is clipped (``[1, 2]`` comes back as ``[1, 1]``),
here the range of every group is widened to hold zero (``lo = min(x, 0)``,
``hi = max(x, 0)``, ``s = (hi - lo) / 15``, ``z = round(-lo / s)``): every
value lies within ``s / 2`` of its level, and codes are packed two per byte
(0.5 B per element plus 5 B per group).

:class:`MinMaxInt4Storage`: MicroAdam's error feedback (Modoranu et al.
2024, NeurIPS, Algorithm 1; ``ista-daslab-optimizers`` 1.1.15): buckets of
consecutive elements, each with its min and max in bfloat16 and codes
``floor((x - lo)/u + 1/2)`` for ``u = (hi - lo)/15`` (0.5 B per element plus
4 B per bucket). Unlike the reference, a bucket whose values are all equal
(``hi = lo``) stores codes 0 (its value) instead of dividing by zero, and
min and max are rounded outward to bfloat16.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_LEVELS = 15


def pack(codes: jax.Array) -> jax.Array:
  """uint8 codes in ``0..15`` (last axis even) two per byte: ``(..., n) -> (..., n/2)``."""
  pairs = codes.reshape(codes.shape[:-1] + (codes.shape[-1] // 2, 2))
  return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack(packed: jax.Array) -> jax.Array:
  """The uint8 codes of :func:`pack`: ``(..., n/2) -> (..., n)``."""
  return jnp.stack([packed & 15, packed >> 4], axis=-1).reshape(
      packed.shape[:-1] + (2 * packed.shape[-1],))


def _buckets(flat: jax.Array, size: int) -> jax.Array:
  """``flat`` ``(..., n)`` as ``(..., ceil(n/size), size)``, the last bucket padded
  with its last element (which leaves its min and max as they are)."""
  n = flat.shape[-1]
  count = -(-n // size)
  flat = jnp.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, count * size - n)], mode="edge")
  return flat.reshape(flat.shape[:-1] + (count, size))


class Int4Array(NamedTuple):
  """Packed INT4 groups of arrays of one shape, over their last two axes.

  Attributes:
    packed: uint8 ``(..., groups * group_size / 2)``: element ``2i`` in the
      low nibble of byte ``i``, ``2i + 1`` in the high one.
    scale: float32 ``(..., groups)``.
    zero: uint8 ``(..., groups)``, the zero point in ``0..15``.
  """

  packed: jax.Array
  scale: jax.Array
  zero: jax.Array


class Int4Storage(NamedTuple):
  """INT4 storage of matrices of shape ``(..., d, r)``: groups of ``group_size``
  consecutive elements of each matrix (an even number)."""

  group_size: int = 256

  def groups(self, matrix_shape: tuple[int, ...]) -> int:
    return -(-math.prod(matrix_shape) // self.group_size)

  def init(self, shape: tuple[int, ...]) -> Int4Array:
    """All zeros: ``shape`` is ``(*lead, d, r)``."""
    lead, groups = shape[:-2], self.groups(shape[-2:])
    return Int4Array(jnp.zeros(lead + (groups * self.group_size // 2,), jnp.uint8),
                     jnp.zeros(lead + (groups,), jnp.float32),
                     jnp.zeros(lead + (groups,), jnp.uint8))

  def store(self, x: jax.Array) -> Int4Array:
    """``x`` (float, ``(*lead, d, r)``) quantized, rounding to nearest."""
    lead, n = x.shape[:-2], math.prod(x.shape[-2:])
    groups = self.groups(x.shape[-2:])
    flat = x.astype(jnp.float32).reshape(lead + (n,))
    # Zero padding changes no group's range: every range holds zero.
    flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, groups * self.group_size - n)])
    g = flat.reshape(lead + (groups, self.group_size))
    lo, hi = jnp.minimum(g.min(-1), 0.0), jnp.maximum(g.max(-1), 0.0)
    scale = (hi - lo) / _LEVELS
    inv = jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)
    zero = jnp.clip(jnp.round(-lo * inv), 0, _LEVELS)
    codes = jnp.clip(jnp.round(g * inv[..., None]) + zero[..., None], 0, _LEVELS)
    packed = pack(codes.astype(jnp.uint8).reshape(lead + (groups * self.group_size,)))
    return Int4Array(packed, scale, zero.astype(jnp.uint8))

  def load(self, a: Int4Array, shape: tuple[int, ...]) -> jax.Array:
    """The float32 values of ``a``, an array of ``shape``."""
    lead, n, groups = shape[:-2], math.prod(shape[-2:]), self.groups(shape[-2:])
    codes = unpack(a.packed).astype(jnp.float32).reshape(lead + (groups, self.group_size))
    values = (codes - a.zero[..., None].astype(jnp.float32)) * a.scale[..., None]
    return values.reshape(lead + (groups * self.group_size,))[..., :n].reshape(shape)


class MinMaxInt4(NamedTuple):
  """MicroAdam's 4-bit buckets of a flat array.

  Attributes:
    packed: uint8 ``(..., buckets * bucket / 2)``, :func:`pack`'s layout.
    lo, hi: bfloat16 ``(..., buckets)``, each bucket's min and max.
  """

  packed: jax.Array
  lo: jax.Array
  hi: jax.Array


class MinMaxInt4Storage(NamedTuple):
  """4-bit storage of flat arrays ``(..., n)`` in buckets of ``bucket``
  consecutive elements (an even number; an array shorter than a bucket is one
  bucket of its length, rounded up to even).

  A bucket's ``lo`` and ``hi`` are its min and max rounded outward to
  bfloat16 (so they hold every value of the bucket; rounded to nearest, a
  bucket far from zero could lose more than a step to the rounding), and its
  codes come from them as stored, so what :meth:`load` gives is what
  :meth:`store` chose: ``lo + c*u`` with ``u = (hi - lo)/15`` in float32 and
  ``c = clip(floor((x - lo)/u + 1/2), 0, 15)`` (``(x - lo)/u`` computed as
  ``(x - lo) * (1/u)``). Every value lies within ``u/2`` of its level.
  """

  bucket: int = 1024

  def size(self, n: int) -> int:
    """The bucket length for arrays of ``n`` elements."""
    return min(self.bucket, n + n % 2)

  def init(self, n: int, lead: tuple[int, ...] = ()) -> MinMaxInt4:
    """All zeros for arrays ``(*lead, n)``."""
    size = self.size(n)
    count = -(-n // size)
    return MinMaxInt4(jnp.zeros(lead + (count * size // 2,), jnp.uint8),
                      jnp.zeros(lead + (count,), jnp.bfloat16),
                      jnp.zeros(lead + (count,), jnp.bfloat16))

  def store(self, x: jax.Array) -> MinMaxInt4:
    """``x`` (float, ``(..., n)``) quantized to the nearest level."""
    b = _buckets(x.astype(jnp.float32), self.size(x.shape[-1]))
    lo, hi = _bfloat16_outward(b.min(-1), b.max(-1))
    low, step = _levels(lo, hi)
    inv = jnp.where(step > 0, 1.0 / jnp.where(step > 0, step, 1.0), 0.0)
    codes = jnp.clip(jnp.floor((b - low) * inv + 0.5), 0, _LEVELS).astype(jnp.uint8)
    return MinMaxInt4(pack(codes.reshape(codes.shape[:-2] + (-1,))), lo, hi)

  def load(self, a: MinMaxInt4, n: int) -> jax.Array:
    """The float32 values ``(..., n)`` of ``a``."""
    low, step = _levels(a.lo, a.hi)
    codes = unpack(a.packed).astype(jnp.float32)
    codes = codes.reshape(codes.shape[:-1] + (a.lo.shape[-1], -1))
    return (low + codes * step).reshape(codes.shape[:-2] + (-1,))[..., :n]


def _bfloat16_outward(lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
  """float32 ``lo <= hi`` as bfloat16 rounded outward (down, up): the range they
  span holds ``[lo, hi]``."""
  lo_b, hi_b = lo.astype(jnp.bfloat16), hi.astype(jnp.bfloat16)
  lo_b = jnp.where(lo_b.astype(jnp.float32) > lo, jnp.nextafter(lo_b, jnp.bfloat16(-jnp.inf)), lo_b)
  hi_b = jnp.where(hi_b.astype(jnp.float32) < hi, jnp.nextafter(hi_b, jnp.bfloat16(jnp.inf)), hi_b)
  return lo_b, hi_b


def _levels(lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A bucket's lowest level and step ``(hi - lo)/15`` in float32, broadcastable
  against its elements."""
  lo, hi = lo.astype(jnp.float32)[..., None], hi.astype(jnp.float32)[..., None]
  return lo, (hi - lo) * np.float32(1.0 / _LEVELS)
