"""Shardings of optimizer state that follow the parameters' shardings.

Adam-mini's ``v`` holds one scalar per block (Zhang et al. 2024,
arXiv:2406.16793, Sec. 2.3) and Q-Adam-mini's INT8 ``m`` one float32 scale per
group, so their state leaves have the parameter's rank with some axes reduced.
A state leaf keeps the parameter's sharding on every axis it shares with the
parameter, and on a reduced axis:

* size 1 (a block spans the whole axis): replicated;
* ``k`` blocks or groups per axis (heads, quantization groups): sharded like
  the parameter's axis when every shard holds whole blocks (the axis length
  divides into ``k`` equal parts and ``k`` is a multiple of the shard count),
  else replicated along that axis (the block mean is still exact: it is a
  sum over shards, see below).

Quantization groups must not straddle shards, so for INT8 scales the second
case is an error (:class:`ShardingError`) naming the parameter: supported are
shardings where each shard of a grouped axis is a whole number of groups
(for the default ``group_size=256``: the ``in`` axis of an ``(in, out)``
kernel split into parts of a multiple of 256 rows, any split of ``out``, and
for row-grouped leaves such as an embedding ``(vocab, dim)``: any split of
``vocab`` and splits of ``dim`` into multiples of 256).

Under ``jax.jit`` the update itself needs nothing: the block means are
``jnp.mean`` reductions that XLA's SPMD partitioner computes as per-shard sums
plus an all-reduce of the (tiny) block sums, so they equal the single-device
result up to float summation order, without gathering parameters or
gradients.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from qadam_mini_jax import partition as partition_lib


class ShardingError(ValueError):
  """A parameter's sharding that the optimizer state cannot follow."""


def padded_spec(spec: PartitionSpec, ndim: int) -> tuple[Any, ...]:
  """The entries of ``spec``, one per axis (``None`` for the unnamed trailing ones)."""
  entries = tuple(spec)
  if len(entries) > ndim:
    raise ShardingError(f"PartitionSpec {spec} has more entries than the array's {ndim} axes.")
  return entries + (None,) * (ndim - len(entries))


def ways(mesh: Any, entry: Any) -> int:
  """How many shards a PartitionSpec entry (None, a mesh axis or a tuple of them) makes."""
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[name] for name in names)


def _blocked_entry(mesh, entry, length: int, blocks: int) -> tuple[Any, bool]:
  """Spec entry of an axis of ``blocks`` equal blocks cut from one of ``length``.

  Returns ``(entry, whole)``: ``whole`` is False when the parameter's shards
  would cut a block, in which case the axis is replicated (``None``).
  """
  n = ways(mesh, entry)
  if n == 1 or blocks == 1:
    return None, n == 1 or length == 1
  whole = length % blocks == 0 and blocks % n == 0
  return (entry if whole else None), whole


def reduced_spec(shape: tuple[int, ...], spec: PartitionSpec, mesh: Any,
                 reduced: tuple[int, ...]) -> tuple[PartitionSpec, list[int]]:
  """Spec of a state leaf of shape ``reduced`` derived from a parameter of ``shape``.

  ``reduced`` either has the parameter's rank (each axis the same, 1, or a
  number of equal blocks) or merges leading or trailing axes into one axis of
  groups, as :class:`~qadam_mini_jax.quantize.GroupLayout` scales do.

  Returns the spec and the parameter axes whose shards would cut a block.
  """
  shape, reduced = tuple(shape), tuple(reduced)
  entries = padded_spec(spec, len(shape))
  if reduced == shape:
    return PartitionSpec(*entries), []
  if len(reduced) == len(shape):
    out, cut = [], []
    for axis, (n, k, entry) in enumerate(zip(shape, reduced, entries)):
      new, whole = (entry, True) if k == n else _blocked_entry(mesh, entry, n, k)
      out.append(new)
      if not whole:
        cut.append(axis)
    return PartitionSpec(*out), cut
  # One axis of groups over merged axes: (groups,) + shape[split:] (columns
  # layout) or shape[:split] + (groups,) (rows layout).
  merges = []
  if len(reduced) < len(shape):
    split = len(shape) - len(reduced) + 1
    if split >= 1 and reduced[1:] == shape[split:]:
      merges.append((list(range(split)), 0))
    split = len(reduced) - 1
    if reduced[:split] == shape[:split]:
      merges.append((list(range(split, len(shape))), split))
  if not merges:
    raise ShardingError(f"A state leaf of shape {reduced} does not derive from a "
                        f"parameter of shape {shape}.")
  merged, position = merges[0]
  kept = [entries[a] for a in range(len(shape)) if a not in merged]
  sharded = [a for a in merged if entries[a] is not None]
  if not sharded:
    group_entry, cut = None, []
  elif sharded != [merged[0]]:  # a later merged axis is split: shards interleave
    group_entry, cut = None, sharded
  else:
    length = math.prod(shape[a] for a in merged)
    group_entry, whole = _blocked_entry(mesh, entries[merged[0]], length, reduced[position])
    cut = [] if whole else sharded
  kept.insert(position, group_entry)
  return PartitionSpec(*kept), cut


def check_auto_axes(mesh: Any, where: str) -> None:
  """Raise if ``mesh`` has Explicit axes (the optimizer needs Auto, GSPMD, axes)."""
  if any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
    raise ShardingError(
        f"{where}: the mesh {dict(mesh.shape)} has Explicit axes (jax.make_mesh's default); "
        "the optimizer's block and group reshapes need Auto axes: create it with "
        "jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names)).")


def check_not_explicitly_sharded(leaves: Any, paths: list[str]) -> None:
  """Raise if a traced leaf carries an Explicit-axis sharding in its type."""
  for path, leaf in zip(paths, leaves):
    sharding = getattr(jax.typeof(leaf), "sharding", None)
    if sharding is not None and any(e is not None for e in sharding.spec):
      check_auto_axes(sharding.mesh, path)


def per_parameter(params: Any, param_shardings: Any, mesh: Any = None) -> list[tuple[str, tuple[int, ...], NamedSharding]]:
  """``(path, shape, NamedSharding)`` per parameter leaf, in leaf order."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  is_sharding = lambda x: isinstance(x, (jax.sharding.Sharding, PartitionSpec))
  shardings = jax.tree.leaves(param_shardings, is_leaf=is_sharding)
  if len(shardings) != len(flat):
    raise ShardingError(f"param_shardings has {len(shardings)} leaves, the parameters have "
                        f"{len(flat)}; pass one sharding per parameter (a pytree like params).")
  out = []
  for (path, leaf), sharding in zip(flat, shardings):
    name = partition_lib.path_str(path)
    if isinstance(sharding, PartitionSpec):
      if mesh is None:
        raise ShardingError(f"{name}: param_shardings holds PartitionSpecs; pass mesh= too.")
      sharding = NamedSharding(mesh, sharding)
    if not isinstance(sharding, NamedSharding):
      raise ShardingError(f"{name}: expected a NamedSharding or PartitionSpec, got "
                          f"{type(sharding).__name__}.")
    check_auto_axes(sharding.mesh, name)
    out.append((name, tuple(leaf.shape), sharding))
  return out


def leaf_spec(name: str, shape: tuple[int, ...], sharding: NamedSharding,
              reduced: tuple[int, ...], *, groups: bool) -> PartitionSpec:
  """:func:`reduced_spec`, raising if ``groups`` (INT8 scales) would be cut."""
  reduced = tuple(reduced)
  if not reduced or math.prod(reduced) == 1:
    return PartitionSpec()
  spec, cut = reduced_spec(shape, sharding.spec, sharding.mesh, reduced)
  if groups and cut:
    raise ShardingError(
        f"{name}: its sharding {sharding.spec} splits axes {cut} of shape {shape} into shards "
        f"that cut INT8 quantization groups (scales of shape {reduced}); shard a grouped axis "
        "into whole groups (a multiple of Int8Quantization.group_size per shard), shard "
        "another axis, or set Int8Quantization(min_size=...) above this leaf's size.")
  return spec


def state_shardings(state: Any, params: Any, param_shardings: Any, *, mesh: Any = None) -> Any:
  """Shardings for an optimizer state, each leaf following its parameter.

  Works for the state of any chain whose per-parameter parts are pytrees
  shaped like ``params`` (this library's transforms, ``optax.adamw``,
  ``optax.MultiSteps``...): every leaf of such a part gets its parameter's
  sharding, reduced along block or group axes as the module docstring says;
  every other leaf (step counts, keys) is replicated.

  Args:
    state: the optimizer state, or its shapes (``jax.eval_shape(tx.init,
      params)``), or a ``flax.nnx.Optimizer``'s ``opt_state`` with ``params``
      from ``nnx.state(model, nnx.Param)``.
    params: the parameters (arrays or ``ShapeDtypeStruct``s).
    param_shardings: a pytree like ``params`` of ``NamedSharding``s, or of
      ``PartitionSpec``s together with ``mesh`` (e.g. from
      ``nnx.get_partition_spec``).
    mesh: the ``jax.sharding.Mesh`` of PartitionSpecs.

  Returns:
    A pytree like ``state`` of ``NamedSharding``s.

  Raises:
    ShardingError: a parameter sharding cuts INT8 quantization groups, or
      ``param_shardings`` does not match ``params``.
  """
  per_param = {name: (shape, sharding)
               for name, shape, sharding in per_parameter(params, param_shardings, mesh)}
  treedef = jax.tree.structure(params)
  if treedef.num_leaves < 2 and treedef.num_nodes == 1:
    raise ShardingError("params must be a pytree container (e.g. a dict) of arrays, not one array.")
  any_sharding = next(iter(per_param.values()))[1] if per_param else NamedSharding(mesh, PartitionSpec())
  replicated = NamedSharding(any_sharding.mesh, PartitionSpec())

  def owner(path: str) -> tuple[str, str] | None:
    """``(parameter name, rest)`` of a state leaf path under a parameter's name."""
    parts = path.split("/")
    for k in range(len(parts), 0, -1):
      name = "/".join(parts[:k])
      if name in per_param:
        return name, "/".join(parts[k:])
    return None

  def walk(node):
    flat, node_def = jax.tree_util.tree_flatten_with_path(node)
    if not flat:
      return node
    owners = [owner(partition_lib.path_str(path)) for path, _ in flat]
    if all(owners):  # a pytree like params, e.g. ``mu`` (leaves may be QuantizedArrays)
      out = []
      for (name, rest), (_, leaf) in zip(owners, flat):
        shape, sharding = per_param[name]
        spec = leaf_spec(name, shape, sharding, tuple(getattr(leaf, "shape", ())),
                         groups=rest.split("/")[-1] == "scales")
        out.append(NamedSharding(sharding.mesh, spec))
      return jax.tree.unflatten(node_def, out)
    children, node_def = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    if len(children) == 1 and children[0] is node:  # a leaf: counts, keys
      return replicated
    return jax.tree.unflatten(node_def, [walk(c) for c in children])

  return walk(state)
