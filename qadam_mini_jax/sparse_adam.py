"""``scale_by_micro_adam``: Adam rebuilt from a window of sparse gradients, with 4-bit error feedback.

MicroAdam (Modoranu et al. 2024, NeurIPS, Algorithm 1; reference code
``ista-daslab-optimizers`` 1.1.15) keeps no moments. Per array, flattened,
at step ``t``:

1. ``a = g + Q^-1(e)``: the gradient plus the error feedback (:mod:`.int4`,
   :class:`~.int4.MinMaxInt4Storage`);
2. the top ``k`` of ``|a|`` in each block (:mod:`.sparse_window`) become ring
   row ``(t - 1) mod m``;
3. ``e = Q(a)`` with the kept entries set to 0;
4. ``u = m_hat / (sqrt(v_hat) + eps)`` from the ring (:func:`.sparse_window.moments`).

A layer of a stacked leaf is an array of its own (blocks never cross layers)
and is updated one layer at a time. Sharded (``shardings=``), a layer may be
split along its first axis (FSDP), into shards that hold whole blocks and
error buckets; the ring and the error feedback are split the same way, so
each device keeps the state of its own part. Differences from the reference: the step
count is part of the state (a resumed run goes on where it stopped), a
bucket whose values are all equal does not divide by zero, parameters may be
float32 or bfloat16.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from jax.sharding import NamedSharding, PartitionSpec

from qadam_mini_jax import int4
from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import sharding as sharding_lib
from qadam_mini_jax import sparse_window
from qadam_mini_jax import transform


class ScaleByMicroAdamState(NamedTuple):
  """State of :func:`scale_by_micro_adam`.

  Attributes:
    count: steps taken (int32).
    indices: per leaf, int16 ``(*layers, m, kept)``: the ring's indices within
      their blocks (``optax.MaskedNode()`` for leaves left alone).
    values: per leaf, bfloat16 ``(*layers, m, kept)``: the ring's values.
    error: per leaf, the 4-bit error feedback (:class:`~.int4.MinMaxInt4`,
      ``(*layers, ...)``).
  """

  count: jax.Array
  indices: Any
  values: Any
  error: Any


class _LeafPlan(NamedTuple):
  """How one leaf is handled: its layer axes and one layer's window layout."""

  layers: tuple[int, ...]
  layer_shape: tuple[int, ...]
  window: sparse_window.WindowLayout


def scale_by_micro_adam(
    window: int = 10,
    density: float = 0.01,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    *,
    block_size: int = 1024,
    error_bucket: int = 1024,
    partition: partition_lib.BlockPartition | None = None,
    shardings: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """MicroAdam's direction ``m_hat / (sqrt(v_hat) + eps)`` from a window of sparse gradients.

  Args:
    window: ``m``, the ring's rows (the steps remembered; static).
    density: the share of each block kept per step (static, in ``(0, 1]``).
    b1, b2, eps: Adam's decays and epsilon (outside the square root), traced.
    block_size: ``B``, the top-k block (static, at most 32,768: indices are
      int16). The default keeps ``k = 11`` at 1%, within XLA's fast GPU top-k
      (``k <= 16``).
    error_bucket: elements sharing one min and max in the error feedback (an
      even int).
    partition: only its ``layers`` are used: each layer of a stacked leaf is
      an array of its own.
    shardings: the parameters' ``NamedSharding``s (a pytree matched by path,
      as :func:`~qadam_mini_jax.adam_mini`'s). A layer split along its first
      axis into ``n`` shards, each a whole number of blocks and error buckets,
      has its ring ``(*layers, m, kept)`` split along ``kept`` and its error
      feedback along its buckets in ``n`` (a device holds the blocks of its
      own rows); layer axes keep the parameter's sharding. Any other split
      raises :class:`~.sharding.ShardingError` naming the parameter.
      ``jax.jit(init)`` gives the state placed so.

  The state costs ``0.5 + 4 m k / B + 4 / error_bucket`` bytes per element:
  0.93 at the defaults.
  """
  for name, value, least in (("window", window, 1), ("block_size", block_size, 1),
                             ("error_bucket", error_bucket, 2)):
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
      raise ValueError(f"{name} must be an int >= {least}, got {value!r}.")
  if block_size > sparse_window.MAX_BLOCK:
    raise ValueError(f"block_size must be at most {sparse_window.MAX_BLOCK} (int16 indices), "
                     f"got {block_size}.")
  if error_bucket % 2:
    raise ValueError(f"error_bucket must be even (two 4-bit codes per byte), got {error_bucket}.")
  if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
    raise ValueError(f"density must be a number in (0, 1], got {density!r}.")
  transform.check_hyperparameters(b1=b1, b2=b2, eps=eps)
  partition = partition_lib.BlockPartition() if partition is None else partition
  feedback = int4.MinMaxInt4Storage(error_bucket)

  def plan(path, leaf):
    if not partition_lib.is_trainable(leaf):
      return None
    shape = tuple(leaf.shape)
    layers = partition.layer_axes(partition_lib.path_str(path), shape)
    layer_shape = tuple(n for i, n in enumerate(shape) if i not in layers)
    return _LeafPlan(layers, layer_shape, sparse_window.window_layout(
        math.prod(layer_shape), block_size, density))

  def plans(tree):
    return [plan(path, x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]

  def placed(tree, state_parts):
    """``state_parts`` (indices, values, error leaf lists) constrained to follow
    ``shardings`` (the parameters' of ``tree``)."""
    if shardings is None:
      return state_parts
    placements = _placements(tree, shardings, plans(tree), feedback)
    return [[x if s is None else jax.lax.with_sharding_constraint(x, s[i])
             for x, s in zip(part, placements)] for i, part in enumerate(state_parts)]

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    indices, values, error = [], [], []
    for x, p in zip(leaves, plans(params)):
      if p is None:
        for out in (indices, values, error):
          out.append(optax.MaskedNode())
        continue
      lead = tuple(x.shape[i] for i in p.layers)
      indices.append(jnp.zeros(lead + (window, p.window.kept), jnp.int16))
      values.append(jnp.zeros(lead + (window, p.window.kept), jnp.bfloat16))
      error.append(feedback.init(p.window.size, lead))
    return ScaleByMicroAdamState(jnp.zeros([], jnp.int32), *(
        treedef.unflatten(t) for t in placed(params, [indices, values, error])))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    leaves, treedef = jax.tree.flatten(updates)
    rings = [treedef.flatten_up_to(t) for t in (state.indices, state.values, state.error)]
    out = []
    for k, (g, p) in enumerate(zip(leaves, plans(updates))):
      if p is None:
        out.append(g)
        continue

      parts = 1 if shardings is not None else _parts(p, feedback)
      window_part = sparse_window.window_layout(p.window.size // parts, block_size, density)

      def part_step(_, g, indices, values, error, layout=window_part):
        return _layer_step(g, indices, values, error, count, b1, b2, eps, layout, feedback)
      new = _per_part(part_step, p, parts, g, rings[0][k], rings[1][k], rings[2][k])
      out.append(new[0])
      for ring, x in zip(rings, new[1:]):
        ring[k] = x
    return treedef.unflatten(out), ScaleByMicroAdamState(count, *(
        treedef.unflatten(r) for r in placed(updates, rings)))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


#: Elements of a layer updated at once at most, where its first axis splits into
#: parts of whole blocks and error buckets: each part's dense temporaries (``a``,
#: ``m_hat``, ``v_hat``) are alive one part at a time (a 7B embedding: 8 parts).
PART_ELEMENTS = 2**24


def _parts(p: _LeafPlan, feedback: int4.MinMaxInt4Storage) -> int:
  """How many parts along its first axis each layer of a leaf is updated in: the
  fewest that hold at most :data:`PART_ELEMENTS` each and whole blocks and error
  buckets (1 if none does)."""
  rows, size = (p.layer_shape or (1,))[0], p.window.size
  unit = math.lcm(p.window.block, feedback.size(size))
  for parts in range(1, rows + 1):
    if rows % parts == 0 and size // parts % unit == 0 and size // parts <= PART_ELEMENTS:
      return parts
  return 1


def _per_part(step, p: _LeafPlan, parts: int, g, indices, values, error):
  """``step(_, g, indices, values, error)`` of one part of one layer at a time,
  over every layer of a leaf and ``parts`` parts of each along its first axis
  (a part's kept entries, error codes and buckets are a contiguous range of its
  layer's, since its blocks are)."""
  nl = len(p.layers)
  if not nl and parts == 1:
    return step(None, g, indices, values, error)
  shape, lead = g.shape, tuple(range(nl))
  if parts == 1:
    return partition_lib.layer_loop(step, tuple(shape[i] for i in p.layers),
                                    (g, indices, values, error),
                                    (p.layers, lead, lead, int4.MinMaxInt4(lead, lead, lead)))
  first = next(i for i in range(len(shape)) if i not in p.layers)  # the layer's first axis
  g_parts = g.reshape(shape[:first] + (parts, shape[first] // parts) + shape[first + 1:])
  g_axes = tuple(a + (a > first) for a in p.layers) + (first,)
  split = lambda x, at: x.reshape(x.shape[:at] + (parts, x.shape[at] // parts) + x.shape[at + 1:])
  ring_axes, flat_axes = lead + (nl + 1,), lead + (nl,)
  carry = (g_parts, split(indices, nl + 1), split(values, nl + 1),
           jax.tree.map(lambda x: split(x, nl), error))
  sizes = tuple(shape[i] for i in p.layers) + (parts,)
  g_parts, indices, values, error = partition_lib.layer_loop(
      step, sizes, carry, (g_axes, ring_axes, ring_axes, int4.MinMaxInt4(*(flat_axes,) * 3)))
  merge = lambda x, at: x.reshape(x.shape[:at] + (-1,) + x.shape[at + 2:])
  return (g_parts.reshape(shape), merge(indices, nl + 1), merge(values, nl + 1),
          jax.tree.map(lambda x: merge(x, nl), error))


def _placements(tree: Any, shardings: Any, plans: list[_LeafPlan | None],
                feedback: int4.MinMaxInt4Storage) -> list[tuple[Any, Any, Any] | None]:
  """Per leaf of ``tree``, the shardings of its indices, values and error feedback
  (``None`` for a leaf left alone), as :func:`scale_by_micro_adam`'s ``shardings`` says."""
  out = []
  for (name, shape, sharding), p in zip(sharding_lib.per_parameter(tree, shardings), plans):
    if p is None:
      out.append(None)
      continue
    entries = sharding_lib.padded_spec(sharding.spec, len(shape))
    layers = [entries[i] for i in p.layers]
    inner = [e for i, e in enumerate(entries) if i not in p.layers]
    if any(e is not None for e in inner[1:]):
      raise sharding_lib.ShardingError(
          f"{name}: its sharding {sharding.spec} splits an axis other than the first of each "
          f"layer (shape {p.layer_shape}); MicroAdam's blocks run over each layer flattened "
          "row-major, so only the first axis of a layer may be sharded (FSDP on axis 0).")
    first = inner[0] if inner else None
    ways = sharding_lib.ways(sharding.mesh, first)
    shard, size = p.window.size // ways, feedback.size(p.window.size)
    if ways > 1 and (shard % p.window.block or shard % size):
      raise sharding_lib.ShardingError(
          f"{name}: its sharding {sharding.spec} cuts each layer (shape {p.layer_shape}) into "
          f"{ways} shards of {shard} elements, not a whole number of top-k blocks "
          f"({p.window.block}) and error buckets ({size}); choose block_size and error_bucket "
          "that divide a shard, or shard this parameter less.")
    ring = NamedSharding(sharding.mesh, PartitionSpec(*layers, None, first))
    flat = NamedSharding(sharding.mesh, PartitionSpec(*layers, first))
    out.append((ring, ring, int4.MinMaxInt4(flat, flat, flat)))
  return out


def _layer_step(g, indices, values, error, count, b1, b2, eps,
                layout: sparse_window.WindowLayout, feedback: int4.MinMaxInt4Storage):
  """One array's step: ``(u, indices, values, error)`` (Algorithm 1, lines 4-12)."""
  a = g.reshape(-1).astype(jnp.float32) + feedback.load(error, layout.size)
  within, flat = sparse_window.select(a, layout)
  row = (count - 1) % indices.shape[0]
  indices = indices.at[row].set(within.astype(jnp.int16))
  values = values.at[row].set(a[flat].astype(jnp.bfloat16))
  error = feedback.store(a.at[flat].set(0.0))
  m_hat, v_hat = sparse_window.moments(indices, values, count, b1, b2, layout)
  u = m_hat / (jnp.sqrt(v_hat) + eps)
  return u.reshape(g.shape).astype(g.dtype), indices, values, error
