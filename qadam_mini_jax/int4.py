"""Q-GaLore's INT4 storage of projection matrices, two codes per byte.

Q-GaLore (Zhang et al. 2024, arXiv:2407.08296, Sec. 3.1) stores each
projector in groups of ``group_size`` consecutive elements (row-major), each
with a scale and a zero point: value = ``(c - z) * s``, codes ``c`` in
``0..15``, rounded to nearest. Unlike its code (``q-galore-torch`` 1.0),
which keeps one code per byte and clamps the zero point, so that a group
whose values share one sign is clipped (``[1, 2]`` comes back as ``[1, 1]``),
here the range of every group is widened to hold zero (``lo = min(x, 0)``,
``hi = max(x, 0)``, ``s = (hi - lo) / 15``, ``z = round(-lo / s)``): every
value lies within ``s / 2`` of its level, and codes are packed two per byte
(0.5 B per element plus 5 B per group).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_LEVELS = 15


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
    codes = codes.astype(jnp.uint8).reshape(lead + (groups * self.group_size // 2, 2))
    packed = codes[..., 0] | (codes[..., 1] << 4)
    return Int4Array(packed, scale, zero.astype(jnp.uint8))

  def load(self, a: Int4Array, shape: tuple[int, ...]) -> jax.Array:
    """The float32 values of ``a``, an array of ``shape``."""
    lead, n, groups = shape[:-2], math.prod(shape[-2:]), self.groups(shape[-2:])
    codes = jnp.stack([a.packed & 15, a.packed >> 4], axis=-1).astype(jnp.float32)
    codes = codes.reshape(lead + (groups, self.group_size))
    values = (codes - a.zero[..., None].astype(jnp.float32)) * a.scale[..., None]
    return values.reshape(lead + (groups * self.group_size,))[..., :n].reshape(shape)
