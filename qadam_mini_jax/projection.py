"""GaLore's low-rank gradient projection, refreshed lazily, layer by layer.

GaLore (Zhao et al. 2024, arXiv:2403.03507, Algorithm 2) keeps a weight
matrix's optimizer state in a rank-``r`` subspace of its gradient ``G``
(``m x n``): every ``gap`` steps the projector ``P`` is taken from the SVD of
``G``, the optimizer runs on ``R = P^T G`` (``P``: the first ``r`` left
singular vectors) or ``R = G P`` (right ones), and its output ``N`` comes
back as ``P N`` or ``N P^T``. Q-GaLore (Zhang et al. 2024, arXiv:2407.08296,
Sec. 3.2) refreshes lazily, per layer: each SVD compares the new first
singular vector with the previous one, and once the last ``queue`` cosines
average at least ``cos_threshold`` the layer's gap is multiplied by
``gap_growth`` (at every later refresh too, while they do).

As in Q-GaLore's code (``q-galore-torch`` 1.0) the smaller side of the
matrix is projected (the input side of a square one), so ``R`` is
``r x max(m, n)``, and a layer refreshes at the steps that are multiples of
its current gap, from step 0. Where this module departs from that code, on
purpose: each singular vector gets a fixed sign (its largest-magnitude entry
positive; an SVD's sign is arbitrary, and a flip turned the inner optimizer's
moments against the new basis and counted as cosine -1); the cosine is
``|cos|``; an SVD that is not finite keeps the previous projector; and the
gap and cosines are state, so a restored checkpoint resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qadam_mini_jax import int4
from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import random_bits
from qadam_mini_jax import storage as storage_lib

#: Rules (:class:`~.partition.BlockPartition`) whose matrices are projected by
#: default: attention and MLP. Embedding, output layer, norms and biases are not.
PROJECTED_RULES = (partition_lib.QUERY, partition_lib.KEY, partition_lib.VALUE,
                   partition_lib.QKV, partition_lib.ATTN_OUT, partition_lib.MLP)

#: No gap grows beyond this (int32 steps).
_MAX_GAP = 1 << 29
#: The stream of :class:`RandomizedRange`'s sketches (one per step and layer).
_SKETCH_STREAM = random_bits.path_stream("qadam_mini_jax/projection/sketch")


class Float32Storage(NamedTuple):
  """Projectors kept in float32 (GaLore); :class:`.int4.Int4Storage` is Q-GaLore's."""

  def init(self, shape: tuple[int, ...]) -> jax.Array:
    return jnp.zeros(shape, jnp.float32)

  def store(self, x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)

  def load(self, a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    del shape
    return a


class RandomizedRange(NamedTuple):
  """The projected side's first singular vectors from a random sketch instead of
  a full SVD (Halko, Martinsson & Tropp 2011, arXiv:0909.4061, Algorithms 4.4
  and 5.1): ``Q`` spans ``(A A^T)^q A Omega`` (``Omega``: ``n x (rank +
  oversample)``, uniform in ``[-1, 1)`` from a counter-based stream of the
  step and layer; re-orthonormalized after each product), then the SVD of the
  small ``Q^T A`` gives ``U = Q U_B``. Quality and time against the full SVD:
  ``benchmarks/svd_cost.py``.

  Attributes:
    oversample: sketch columns beyond the rank.
    power_iterations: ``q``; more sharpen the sketch where the spectrum decays slowly.
  """

  oversample: int = 8
  power_iterations: int = 2


class ProjectionPlan(NamedTuple):
  """How one leaf is projected (static).

  Attributes:
    layers: the leaf's layer axes (stacked layers); each layer is projected alone.
    split: one layer's array is the matrix ``(prod(shape[:split]), prod(shape[split:]))``.
    rows: project the rows (``R = P^T G``, ``P`` from ``U``), else the columns
      (``R = G P``, ``P`` from ``V``).
    rank: ``r``.
    storage: how ``P`` is stored (:class:`Float32Storage`, :class:`.int4.Int4Storage`).
    finder: ``None`` for the full SVD, or a :class:`RandomizedRange`.
  """

  layers: tuple[int, ...]
  split: int
  rows: bool
  rank: int
  storage: Float32Storage | int4.Int4Storage = Float32Storage()
  finder: RandomizedRange | None = None


class ProjectorState(NamedTuple):
  """One leaf's projector state; leading axes: the leaf's layer axes, in order.

  Attributes:
    matrix: ``P`` (``(..., d, r)``; ``d`` the projected side) in the plan's storage.
    first: the first singular vector of the last refresh (zeros before any).
    gap: steps between refreshes (int32).
    cosines: the last ``queue`` cosines between successive first singular
      vectors, latest last.
    filled: how many of ``cosines`` have been set (int32).
  """

  matrix: jax.Array
  first: jax.Array
  gap: jax.Array
  cosines: jax.Array
  filled: jax.Array


def plan_for(path: str, shape: tuple[int, ...], partition: partition_lib.BlockPartition,
             rank: int, projected: Callable[[str, tuple[int, ...]], bool] | None = None,
             storage: Float32Storage | int4.Int4Storage = Float32Storage(),
             finder: RandomizedRange | None = None) -> ProjectionPlan | None:
  """The plan of the parameter at ``path``, or ``None`` if it is not projected.

  ``projected(path, layer_shape)`` chooses the leaves (default: the rules in
  :data:`PROJECTED_RULES`); a matrix whose smaller side is at most ``rank``
  is not projected (its full gradient is no larger than ``R``).

  Raises:
    PartitionError: naming ``path``, for a chosen leaf whose layers are not matrices.
  """
  layers = partition.layer_axes(path, shape)
  inner = tuple(n for i, n in enumerate(shape) if i not in layers)
  rule = partition.rule_for(path, inner)
  chosen = projected(path, inner) if projected is not None else rule in PROJECTED_RULES
  if not chosen:
    return None
  if len(inner) < 2:
    raise partition_lib.PartitionError(
        f"{path}: shape {shape} (layer axes {layers}) is not a matrix; GaLore projects "
        "matrices only.")
  # The input axes form the rows of a Flax (in, out) kernel (the attention output
  # kernel (heads, head_dim, out) too) and the columns of an (out, in) one.
  in_rows = partition.kernel_layout == "in_out"
  split = (len(inner) - 1 if rule == partition_lib.ATTN_OUT else 1) if in_rows else (
      1 if rule == partition_lib.ATTN_OUT else len(inner) - 1)
  m, n = math.prod(inner[:split]), math.prod(inner[split:])
  if rank >= min(m, n):
    return None
  return ProjectionPlan(layers, split, m < n or (m == n and in_rows), rank, storage, finder)


def _matrix_dims(plan: ProjectionPlan, shape: tuple[int, ...]):
  """``(layer sizes, inner shape, m, n)``."""
  lead = tuple(shape[a] for a in plan.layers)
  inner = tuple(n for i, n in enumerate(shape) if i not in plan.layers)
  return lead, inner, math.prod(inner[:plan.split]), math.prod(inner[plan.split:])


def as_matrices(plan: ProjectionPlan, x: jax.Array) -> jax.Array:
  """``x`` as its layers' matrices: ``(*layer sizes, m, n)``."""
  lead, _, m, n = _matrix_dims(plan, x.shape)
  x = jnp.moveaxis(x, plan.layers, tuple(range(len(lead))))
  return x.reshape(lead + (m, n))


def from_matrices(plan: ProjectionPlan, y: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The inverse of :func:`as_matrices` for a leaf of ``shape``."""
  lead, inner, _, _ = _matrix_dims(plan, shape)
  y = y.reshape(lead + inner)
  return jnp.moveaxis(y, tuple(range(len(lead))), plan.layers)


def _r_layers(plan: ProjectionPlan) -> tuple[int, ...]:
  """Where ``R`` (rank 2 per layer) holds the layer axes: the leaf's positions, or last."""
  return storage_lib.stacked_axes(partition_lib.BlockSpec((), layers=plan.layers), 2)


def projected_shape(plan: ProjectionPlan, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of ``R``: ``(r, n)`` (rows) or ``(m, r)`` per layer, with the
  leaf's layer axes where the leaf has them (so rules that find layer axes by
  path find them in ``R`` too)."""
  _, _, m, n = _matrix_dims(plan, shape)
  return storage_lib.stacked_shape(partition_lib.BlockSpec((), layers=plan.layers), shape,
                                   (plan.rank, n) if plan.rows else (m, plan.rank))


def init(plan: ProjectionPlan, shape: tuple[int, ...], gap: jax.Array,
         queue: int) -> ProjectorState:
  """Zero projector (refreshed at step 0), every layer's gap ``gap``."""
  lead, _, m, n = _matrix_dims(plan, shape)
  d = m if plan.rows else n
  return ProjectorState(
      matrix=plan.storage.init(lead + (d, plan.rank)),
      first=jnp.zeros(lead + (d,), jnp.float32),
      gap=jnp.full(lead, gap, jnp.int32),
      cosines=jnp.zeros(lead + (queue,), jnp.float32),
      filled=jnp.zeros(lead, jnp.int32))


def singular_vectors(plan: ProjectionPlan, g: jax.Array,
                     seeds: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """The first ``rank`` singular vectors of one layer's matrix ``g`` on the
  projected side, as columns ``(d, rank)``, each with its largest-magnitude
  entry positive (float32; a full SVD, or :attr:`ProjectionPlan.finder`'s
  sketch drawn from the stream ``seeds``)."""
  g = g.astype(jnp.float32)
  if plan.finder is not None:
    vectors = _randomized_left(g if plan.rows else g.T, plan.rank, plan.finder, seeds)
  else:
    u, _, vh = jnp.linalg.svd(g, full_matrices=False)
    vectors = u[:, :plan.rank] if plan.rows else vh[:plan.rank].T
  pivot = jnp.take_along_axis(vectors, jnp.argmax(jnp.abs(vectors), axis=0)[None], axis=0)
  return vectors * jnp.where(pivot < 0, -1.0, 1.0)


def _randomized_left(a: jax.Array, rank: int, finder: RandomizedRange,
                     seeds: tuple[jax.Array, jax.Array]) -> jax.Array:
  """:class:`RandomizedRange`'s first ``rank`` left singular vectors of ``a``."""
  m, n = a.shape
  width = min(rank + finder.oversample, m, n)
  omega = 2.0 * random_bits.uniform((n, width), *seeds) - 1.0
  q, _ = jnp.linalg.qr(a @ omega)
  for _ in range(finder.power_iterations):
    q, _ = jnp.linalg.qr(a.T @ q)
    q, _ = jnp.linalg.qr(a @ q)
  u, _, _ = jnp.linalg.svd(q.T @ a, full_matrices=False)
  return q @ u[:, :rank]


def adapted(plan: ProjectionPlan, state: ProjectorState, vectors: jax.Array,
            cos_threshold: jax.Array | None, gap_growth: int) -> ProjectorState:
  """One layer's state after a refresh that found ``vectors`` (Q-GaLore's lazy gap).

  From the second refresh on, ``|cos|`` of the old and new first singular
  vectors joins the queue; when the queue is full and its mean is at least
  ``cos_threshold`` (``None``: never), the gap grows by ``gap_growth``.
  Vectors that are not all finite leave the state as it was.
  """
  first = vectors[:, 0]
  seen = jnp.any(state.first != 0)  # a unit vector after any refresh
  cos = jnp.abs(jnp.dot(state.first, first))
  cosines = jnp.where(seen, jnp.roll(state.cosines, -1).at[-1].set(cos), state.cosines)
  filled = jnp.where(seen, jnp.minimum(state.filled + 1, state.cosines.shape[-1]), state.filled)
  gap = state.gap
  if cos_threshold is not None:
    grow = ((filled == state.cosines.shape[-1]) & (jnp.mean(cosines) >= cos_threshold)
            & (gap <= _MAX_GAP // gap_growth))
    gap = jnp.where(grow, gap * gap_growth, gap)
  new = ProjectorState(plan.storage.store(vectors), first, gap, cosines, filled)
  finite = jnp.all(jnp.isfinite(vectors))
  return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)


def refresh(plan: ProjectionPlan, state: ProjectorState, g: jax.Array, count: jax.Array,
            cos_threshold: jax.Array | None, gap_growth: int) -> ProjectorState:
  """``state`` with each layer whose gap divides ``count`` refreshed from its
  gradient's SVD; the SVD runs for those layers only (``lax.map`` over the
  layers, ``lax.cond`` in each)."""
  mats = as_matrices(plan, g)
  lead = mats.shape[:-2]
  flat = lambda x: x.reshape((-1,) + x.shape[len(lead):])
  sketch = random_bits.stream_seeds(jnp.zeros(2, jnp.uint32), count, _SKETCH_STREAM)

  def one(args):
    g, layer, index = args
    seeds = random_bits.layer_seeds(*sketch, index)
    return jax.lax.cond(
        count % layer.gap == 0,
        lambda: adapted(plan, layer, singular_vectors(plan, g, seeds), cos_threshold,
                        gap_growth),
        lambda: layer)
  new = jax.lax.map(one, (flat(mats), jax.tree.map(flat, state),
                          jnp.arange(math.prod(lead), dtype=jnp.uint32)))
  return jax.tree.map(lambda x, like: x.reshape(like.shape), new, state)


def _projector(plan: ProjectionPlan, state: ProjectorState, shape: tuple[int, ...]) -> jax.Array:
  """``P`` in float32: ``(*layer sizes, d, r)``."""
  lead, _, m, n = _matrix_dims(plan, shape)
  return plan.storage.load(state.matrix, lead + (m if plan.rows else n, plan.rank))


def project(plan: ProjectionPlan, state: ProjectorState, g: jax.Array) -> jax.Array:
  """``R`` (float32, :func:`projected_shape`) of the gradient ``g``."""
  p = _projector(plan, state, g.shape)
  g = as_matrices(plan, g).astype(jnp.float32)
  r = (jnp.einsum("...dr,...dn->...rn", p, g) if plan.rows
       else jnp.einsum("...md,...dr->...mr", g, p))
  return jnp.moveaxis(r, tuple(range(len(plan.layers))), _r_layers(plan))


def back(plan: ProjectionPlan, state: ProjectorState, n: jax.Array,
         shape: tuple[int, ...]) -> jax.Array:
  """``P N`` or ``N P^T`` as an array of the leaf's ``shape`` (float32)."""
  p = _projector(plan, state, shape)
  n = jnp.moveaxis(n, _r_layers(plan), tuple(range(len(plan.layers))))
  full = (jnp.einsum("...dr,...rn->...dn", p, n) if plan.rows
          else jnp.einsum("...mr,...dr->...md", n, p))
  return from_matrices(plan, full, shape)
