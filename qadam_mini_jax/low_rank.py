"""``scale_by_galore``: an inner optimizer run on low-rank projections of the gradients (GaLore).

GaLore (Zhao et al. 2024, arXiv:2403.03507, Algorithm 2) with Q-GaLore's
lazy, layer-adaptive refresh of the projectors (Zhang et al. 2024,
arXiv:2407.08296, Sec. 3.2): see :mod:`.projection`. The chosen matrices
(attention and MLP by default) give their inner optimizer ``R``, the others
their full gradient; each projected result comes back as ``scale * P N``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from qadam_mini_jax import int4
from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import projection
from qadam_mini_jax import transform
from qadam_mini_jax import weights


class ScaleByGaLoreState(NamedTuple):
  """State of :func:`scale_by_galore`.

  Attributes:
    count: steps taken (int32).
    projectors: per leaf, its :class:`~.projection.ProjectorState`, or
      ``optax.MaskedNode()`` for a leaf not projected.
    inner: the inner transformation's state, over the projected gradients
      (``R`` where a leaf is projected, its gradient elsewhere).
  """

  count: jax.Array
  projectors: Any
  inner: Any


def scale_by_galore(
    rank: int = 128,
    update_proj_gap: chex.Numeric = 200,
    scale: chex.Numeric = 0.25,
    *,
    inner: optax.GradientTransformation | None = None,
    partition: partition_lib.BlockPartition | None = None,
    projected: Callable[[str, tuple[int, ...]], bool] | None = None,
    cos_threshold: chex.Numeric | None = None,
    gap_growth: chex.Numeric = 2,
    queue: int = 5,
    int4_group_size: int | None = None,
    range_finder: projection.RandomizedRange | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Run ``inner`` on rank-``rank`` projections of the chosen matrices' gradients.

  Args:
    rank: ``r``, the rank of the projections (static). A matrix whose smaller
      side is at most ``rank`` is not projected.
    update_proj_gap: steps between projector refreshes (each layer's gap at
      the start; an int >= 1).
    scale: ``alpha``, the factor on the back-projected result (0.25 in the
      GaLore and Q-GaLore LLaMA runs).
    inner: a transformation that reads only its updates (``optax.scale_by_adam()``
      by default); it sees ``R`` for projected leaves and keeps its state for
      them in the rank-``r`` shapes, untouched when the projector changes.
    partition: parameter rules (:class:`~.partition.BlockPartition`): their
      ``layers`` make each layer of a stacked leaf a matrix of its own, their
      ``kernel_layout`` says which side is the input, and their rule names
      choose the projected leaves (:data:`.projection.PROJECTED_RULES`).
    projected: instead, ``projected(path, layer_shape) -> bool`` chooses them.
    cos_threshold: Q-GaLore's lazy refresh: a layer's gap grows by
      ``gap_growth`` once the mean of the last ``queue`` cosines between
      successive first singular vectors is at least this (Q-GaLore: 0.4);
      ``None`` keeps every gap (GaLore).
    gap_growth: an int >= 1 (Q-GaLore: 2).
    queue: a static int (Q-GaLore: 5).
    int4_group_size: store the projectors in INT4, in groups of this many
      elements (Q-GaLore: 256; :mod:`.int4`); ``None`` keeps them in float32.
    range_finder: a :class:`~.projection.RandomizedRange` to find each
      projector from a random sketch instead of a full SVD; ``None``: the SVD.
  """
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
    raise ValueError(f"rank must be a positive int, got {rank!r}.")
  if not isinstance(queue, int) or isinstance(queue, bool) or queue < 1:
    raise ValueError(f"queue must be a positive int, got {queue!r}.")
  transform.check_hyperparameters(update_proj_gap=update_proj_gap, scale=scale,
                                  gap_growth=gap_growth)
  if cos_threshold is not None:
    transform.check_hyperparameters(cos_threshold=cos_threshold)
  if int4_group_size is not None and (not isinstance(int4_group_size, int) or isinstance(
      int4_group_size, bool) or int4_group_size < 2 or int4_group_size % 2):
    raise ValueError(f"int4_group_size must be an even int >= 2, got {int4_group_size!r}.")
  storage = (projection.Float32Storage() if int4_group_size is None
             else int4.Int4Storage(int4_group_size))
  if range_finder is not None and not isinstance(range_finder, projection.RandomizedRange):
    raise TypeError(f"range_finder must be a projection.RandomizedRange or None, got "
                    f"{type(range_finder).__name__}.")
  inner = optax.scale_by_adam() if inner is None else inner
  partition = partition_lib.BlockPartition() if partition is None else partition

  def plans(tree):
    return [None if not partition_lib.is_trainable(x) else projection.plan_for(
        partition_lib.path_str(path), tuple(x.shape), partition, rank, projected, storage,
        range_finder)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]

  def _plan_of_projected(path, shape):
    plan = projection.plan_for(path, shape, partition, rank, projected, storage, range_finder)
    if plan is None:
      raise ValueError(
          f"{path}: the state holds a projector for it, but a gradient of shape {shape} is not "
          "projected (in_backward.per_leaf empties axis 0 of unstacked parameters: GaLore "
          "inside the backward pass projects stacked matrices only).")
    return plan

  def init_fn(params):
    params = weights.float_like(params)  # INT8 weights: their values' shapes
    leaves, treedef = jax.tree.flatten(params)
    leaf_plans = plans(params)
    shapes = [x if plan is None else
              jnp.zeros(projection.projected_shape(plan, x.shape), jnp.float32)
              for x, plan in zip(leaves, leaf_plans)]
    projectors = [optax.MaskedNode() if plan is None else
                  projection.init(plan, x.shape, update_proj_gap, queue)
                  for x, plan in zip(leaves, leaf_plans)]
    return ScaleByGaLoreState(count=jnp.zeros([], jnp.int32),
                              projectors=treedef.unflatten(projectors),
                              inner=inner.init(treedef.unflatten(shapes)))

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    projectors = treedef.flatten_up_to(state.projectors)
    # A leaf with a projector is projected, even with no element (the part of a
    # stacked leaf that in_backward.per_leaf leaves out has zero layers).
    leaf_plans = [None if isinstance(p, optax.MaskedNode) else _plan_of_projected(
        partition_lib.path_str(path), tuple(g.shape)) for (path, g), p in zip(
            jax.tree_util.tree_flatten_with_path(updates)[0], projectors)]
    low = []
    for k, (g, plan) in enumerate(zip(leaves, leaf_plans)):
      if plan is None:
        low.append(g)
        continue
      projectors[k] = projection.refresh(plan, projectors[k], g, state.count, cos_threshold,
                                         gap_growth)
      low.append(projection.project(plan, projectors[k], g))
    directions, inner_state = inner.update(treedef.unflatten(low), state.inner)
    out = [n if plan is None else
           (scale * projection.back(plan, p, n, g.shape)).astype(g.dtype)
           for g, n, plan, p in zip(leaves, treedef.flatten_up_to(directions), leaf_plans,
                                    projectors)]
    return treedef.unflatten(out), ScaleByGaLoreState(
        count=optax.safe_increment(state.count), projectors=treedef.unflatten(projectors),
        inner=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def inner_partition(partition: partition_lib.BlockPartition | None) -> partition_lib.BlockPartition:
  """Rules that make :func:`~.transform.scale_by_adam_mini` Adam (one block
  per element) on :func:`scale_by_galore`'s inner tree: ``partition``'s layer
  axes (``R`` keeps them), each spec named by ``partition``'s rule for its
  path (so ``stochastic_rounding="auto"`` still finds the embedding and
  output layer)."""
  partition = partition_lib.BlockPartition() if partition is None else partition

  def per_element(path, shape):
    rule = partition.rule_for(path, shape)
    return partition_lib.BlockSpec((), rule=rule if isinstance(rule, str) else "custom")
  return partition_lib.BlockPartition(layers=partition.layers, rules=per_element)
