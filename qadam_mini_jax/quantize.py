"""Group-wise symmetric INT8 storage of the first moment (Q-Adam-mini).

Scheme (chosen to avoid the reference implementation's flaws):

* Groups are ``group_size`` consecutive row-major elements inside a "row". A
  row is the flattening of the shortest suffix of trailing axes holding at
  least ``group_size`` elements (the whole tensor if none does). The last group
  of a row may be shorter (ragged), so no shape has to divide by the group size,
  and a group never spans two rows.
* Symmetric absmax scaling: ``scale = max|m| / 127`` per group in float32 and
  ``code = clip(floor(m / scale + r), -127, 127)`` in int8, where ``r = 1/2``
  for round-to-nearest and ``r ~ U[0, 1)`` for stochastic rounding. Zero is
  exact, a group whose values share one sign keeps its full resolution (no
  zero point clamped to [0, 255] pulling it toward zero), and there is no
  range floor: an all-zero group stores ``scale = 0``.
* Cost: 1 byte per element plus 4 bytes per group, 1.0156 B/param for
  groups of 256.

``floor(x + r)`` is used instead of ``round`` because the Triton lowering has
no ``round``; the GPU kernel performs the same arithmetic.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

QMAX = 127


class QuantizedArray(NamedTuple):
  """INT8 codes in the parameter's shape and one float32 scale per group.

  ``scales`` has shape ``row_shape + (groups_per_row,)`` (see
  :func:`group_layout`); dequantized value = ``code * scale``.
  """

  codes: jax.Array
  scales: jax.Array


def group_layout(shape: tuple[int, ...], group_size: int) -> tuple[tuple[int, ...], int, int]:
  """``(row_shape, row_length, groups_per_row)`` of the grouping of ``shape``."""
  split = len(shape)
  row_length = 1
  while split > 0 and row_length < group_size:
    split -= 1
    row_length *= shape[split]
  return tuple(shape[:split]), row_length, -(-row_length // group_size)


def _grouped(x: jax.Array, group_size: int) -> jax.Array:
  """View ``x`` as ``row_shape + (groups_per_row, group_size)``, zero padded."""
  rows, length, groups = group_layout(x.shape, group_size)
  x = x.reshape(rows + (length,))
  pad = groups * group_size - length
  if pad:
    x = jnp.pad(x, [(0, 0)] * len(rows) + [(0, pad)])
  return x.reshape(rows + (groups, group_size))


def _ungrouped(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  rows, length, _ = group_layout(shape, x.shape[-1])
  return x.reshape(rows + (-1,))[..., :length].reshape(shape)


def quantize(x: jax.Array, group_size: int, noise: jax.Array | None = None) -> QuantizedArray:
  """Quantize ``x`` group-wise to int8.

  Args:
    x: float array (computed in float32).
    group_size: elements per group.
    noise: uniform [0, 1) float32 array of ``x``'s shape for stochastic
      rounding, or ``None`` for round-to-nearest.
  """
  x = x.astype(jnp.float32)
  g = _grouped(x, group_size)
  scales = jnp.max(jnp.abs(g), axis=-1) / np.float32(QMAX)
  s = scales[..., None]
  y = jnp.where(s > 0, g / jnp.where(s > 0, s, 1.0), 0.0)
  r = np.float32(0.5) if noise is None else _grouped(noise, group_size)
  codes = jnp.clip(jnp.floor(y + r), -QMAX, QMAX).astype(jnp.int8)
  return QuantizedArray(_ungrouped(codes, x.shape), scales)


def dequantize(q: QuantizedArray, group_size: int) -> jax.Array:
  """float32 values ``code * scale`` of a :func:`quantize` result."""
  codes = _grouped(q.codes.astype(jnp.float32), group_size)
  return _ungrouped(codes * q.scales[..., None], q.codes.shape)
