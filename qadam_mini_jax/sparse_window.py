"""MicroAdam's window: the last ``m`` sparse gradients, and Adam's moments rebuilt from them.

MicroAdam (Modoranu et al. 2024, NeurIPS, Algorithm 1 and Sec. 3): each step
keeps the ``k`` entries of largest magnitude in every block of ``B``
consecutive elements of a (flattened) array, as one row of a ring of ``m``
rows: the indices within the block (int16) and the values (bfloat16). Adam's
moments at step ``t`` are sums over the ring,

    m_hat = c1 * sum_rows b1^age V,   v_hat = c2 * sum_rows b2^age V^2,

scattered to the rows' indices, with ``age = (t - 1 - row) mod m`` over the
rows written so far and ``c = (1 - b)/(1 - b^t)``: with every entry kept and
``m >= t`` this is Adam's bias-corrected ``m`` and ``v``. An entry in no row
has ``m_hat = v_hat = 0``.
"""

from __future__ import annotations

import fractions
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

#: The largest block: indices within a block are stored in int16.
MAX_BLOCK = 2**15


class WindowLayout(NamedTuple):
  """How a flat array of ``size`` elements is cut into top-k blocks.

  Full blocks of ``block`` elements keep ``k`` entries each; the rest (the
  tail, ``size mod block`` elements) keeps ``tail_k``.
  """

  size: int
  block: int
  k: int
  tail_k: int

  @property
  def full_blocks(self) -> int:
    return self.size // self.block

  @property
  def kept(self) -> int:
    """Entries one ring row holds."""
    return self.full_blocks * self.k + self.tail_k


def kept_count(elements: int, density: float) -> int:
  """``ceil(elements * density)``, with ``density`` as the decimal it is written as
  (``100 * 0.07`` keeps 7, where float arithmetic gives 7.000000000000001)."""
  return math.ceil(fractions.Fraction(repr(float(density))) * elements)


def window_layout(size: int, block_size: int, density: float) -> WindowLayout:
  """Blocks of ``block_size`` (or one block of the whole array if shorter),
  each keeping ``ceil(block * density)``; the tail keeps ``ceil(tail * density)``."""
  block = min(block_size, size)
  return WindowLayout(size, block, kept_count(block, density),
                      kept_count(size % block, density))


def block_starts(layout: WindowLayout) -> jax.Array:
  """int32 ``(kept,)``: the first flat index of the block each kept entry is in."""
  return jax.lax.iota(jnp.int32, layout.kept) // layout.k * layout.block


def select(a: jax.Array, layout: WindowLayout) -> tuple[jax.Array, jax.Array]:
  """The kept entries of flat ``a``: int32 indices within their blocks and flat indices.

  Exact top-k of ``|a|`` per block (``jax.lax.top_k``: ties go to the lower
  index), the block's entries in decreasing magnitude.
  """
  full = layout.full_blocks * layout.block
  parts = []
  if layout.full_blocks:
    blocks = jnp.abs(a[:full]).reshape(layout.full_blocks, layout.block)
    parts.append(jax.lax.top_k(blocks, layout.k)[1].reshape(-1))
  if layout.tail_k:
    parts.append(jax.lax.top_k(jnp.abs(a[full:]), layout.tail_k)[1])
  within = jnp.concatenate(parts).astype(jnp.int32)
  return within, within + block_starts(layout)


def moments(indices: jax.Array, values: jax.Array, count: jax.Array, b1: jax.Array,
            b2: jax.Array, layout: WindowLayout) -> tuple[jax.Array, jax.Array]:
  """``(m_hat, v_hat)``, float32 ``(size,)``, from the ring after step ``count``.

  ``indices`` (int16) and ``values`` (bfloat16) are ``(m, kept)``; row
  ``(count - 1) mod m`` is the newest.
  """
  rows = indices.shape[0]
  row = jnp.arange(rows)
  age = (count - 1 - row) % rows
  written = row < jnp.minimum(count, rows)
  w1 = jnp.where(written, jnp.power(b1, age.astype(jnp.float32)), 0.0)
  w2 = jnp.where(written, jnp.power(b2, age.astype(jnp.float32)), 0.0)
  flat = (indices.astype(jnp.int32) + block_starts(layout)).reshape(-1)
  v = values.astype(jnp.float32)
  m_sum = jnp.zeros(layout.size, jnp.float32).at[flat].add((w1[:, None] * v).reshape(-1))
  v_sum = jnp.zeros(layout.size, jnp.float32).at[flat].add((w2[:, None] * v * v).reshape(-1))
  t = count.astype(jnp.float32)
  return (m_sum * ((1.0 - b1) / (1.0 - jnp.power(b1, t))),
          v_sum * ((1.0 - b2) / (1.0 - jnp.power(b2, t))))
