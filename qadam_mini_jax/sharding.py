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

The parameters' shardings come from ``shardings=`` (matched by path, so a
tree like the whole params also fits inside ``optax.masked``), else from the
arrays: outside ``jax.jit`` their ``.sharding``, on Explicit mesh axes their
types (``jax.typeof(x).sharding``); there the step runs under
``jax.sharding.auto_axes``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import weights as weights_lib


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


def masked_out(tree: Any) -> list[str]:
  """Paths of the parts of ``tree`` that ``optax.masked`` (or
  ``optax.multi_transform``) left out: its ``optax.MaskedNode``s."""
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  return [partition_lib.path_str(path) for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked)[0] if is_masked(leaf)]


def _enclosing(path: str, names: Any) -> str | None:
  """The longest of ``names`` that is ``path`` or a path above it (``""``: the root)."""
  parts = path.split("/") if path else []
  for k in range(len(parts), -1, -1):
    if "/".join(parts[:k]) in names:
      return "/".join(parts[:k])
  return None


def by_path(tree: Any, values: Any, what: str, *, is_leaf: Any = None,
            error: type[Exception] = ValueError) -> list[Any]:
  """``values``' entry for each leaf of ``tree`` (in leaf order), matched by path.

  ``values`` is a pytree like the whole parameters, or a prefix of them (an
  entry holds for the subtree under it). ``tree`` may be the part of them
  that ``optax.masked`` or ``optax.multi_transform`` hands its inner
  transform, the rest replaced by ``optax.MaskedNode``: entries in those
  parts are ignored. Raises ``error`` naming a leaf without an entry, or an
  entry that is no parameter path.
  """
  flat = jax.tree_util.tree_flatten_with_path(values, is_leaf=is_leaf)[0]
  table = {partition_lib.path_str(path): value for path, value in flat}
  paths = [partition_lib.path_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  known = paths + masked_out(tree)
  for name in table:
    if name and not any(p == name or p.startswith(name + "/") or name.startswith(p + "/")
                        for p in known):
      raise error(f"{what} has an entry for {name!r}, which is not a parameter path (pass a "
                  "pytree like params).")
  out = []
  for path in paths:
    name = _enclosing(path, table)
    if name is None:
      raise error(f"{path}: {what} has no entry for this parameter (pass a pytree like params).")
    out.append(table[name])
  return out


def left_out_rules(params: Any, partition: partition_lib.BlockPartition) -> set[str]:
  """Block rules that the parts of ``params`` left out by ``optax.masked`` may hold.

  A masked-out part keeps its path but not its shape, so it is judged by name:
  a default name (:data:`~.partition.DEFAULT_NAMES`) in any component of its
  path. With user ``rules=`` any rule may be there.
  """
  out = set()
  for path in masked_out(params):
    components = {c.lower() for c in path.split("/")}
    out.update(rule for rule, names in partition_lib.DEFAULT_NAMES.items()
               if partition.rules or components & set(names))
  return out


def is_explicit(mesh: Any) -> bool:
  """Whether ``mesh`` has Explicit axes (shardings in the arrays' types)."""
  return AxisType.Explicit in tuple(getattr(mesh, "axis_types", ()))


def _known_sharding(path: str, leaf: Any) -> NamedSharding | None:
  """A leaf's sharding as far as this trace shows it; ``None`` if on one device.

  Arrays outside ``jax.jit`` carry theirs; on Explicit mesh axes it is in the
  type (``jax.typeof(x).sharding``). A traced leaf on Auto axes of several
  devices hides its sharding: an error says what to pass instead.
  """
  if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
    sharding = leaf.sharding
    return sharding if isinstance(sharding, NamedSharding) and sharding.num_devices > 1 else None
  typed = getattr(jax.typeof(leaf), "sharding", None)
  if typed is None or math.prod(typed.mesh.shape.values()) == 1:
    return None
  if is_explicit(typed.mesh):
    return typed
  raise ShardingError(
      f"{path}: under jax.jit (or jax.eval_shape), parameters on a mesh "
      f"{dict(typed.mesh.shape)} with Auto axes do not show their shardings, so the optimizer "
      "state cannot follow them: pass shardings=jax.tree.map(lambda p: p.sharding, params) to "
      "the optimizer, call tx.init outside jax.jit, or use Explicit axes (jax.make_mesh's "
      "default); for shapes alone, trace it with jax.ShapeDtypeStruct(p.shape, p.dtype).")


def explicit_specs(tree: Any) -> Any:
  """The ``PartitionSpec``s in the types of ``tree``'s leaves (a pytree like
  ``tree``) if any leaf has Explicit mesh axes, else ``None``."""
  types = [getattr(jax.typeof(leaf), "sharding", None) for leaf in jax.tree.leaves(tree)]
  if not any(t is not None and is_explicit(t.mesh) for t in types):
    return None
  return jax.tree.map(lambda leaf: jax.typeof(leaf).sharding.spec, tree)


def param_shardings(params: Any, shardings: Any) -> Any:
  """The parameters' ``NamedSharding``s (a pytree like ``params``), or ``None`` if unsharded.

  From ``shardings`` where given (matched by path, see :func:`by_path`),
  else read from the parameters (see :func:`_known_sharding`); a parameter on
  one device next to sharded ones is replicated.
  """
  if shardings is not None:
    return jax.tree.unflatten(jax.tree.structure(params),
                              [s for _, _, s in per_parameter(params, shardings)])
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  known = [_known_sharding(partition_lib.path_str(path), leaf) for path, leaf in flat]
  some = next((s for s in known if s is not None), None)
  if some is None:
    return None
  replicated = NamedSharding(some.mesh, PartitionSpec())
  return jax.tree.unflatten(treedef, [replicated if s is None else s for s in known])


def follow(state: Any, params: Any, found: Any) -> Any:
  """``state`` placed to follow the parameters' shardings ``found`` (from
  :func:`param_shardings`; ``None``: left as it is).

  On Explicit axes the state's types are resharded; otherwise it is a
  sharding constraint (``jax.lax.with_sharding_constraint``).
  """
  if found is None:
    return state
  target = state_shardings(state, params, found)
  if is_explicit(jax.tree.leaves(target)[0].mesh):
    return jax.sharding.reshard(state, target)
  return jax.lax.with_sharding_constraint(state, target)


def on_auto_axes(fn: Callable[..., Any], params: Any, args: tuple[Any, ...], like: Any) -> Any:
  """``fn(shardings, *args)`` run with the Explicit mesh axes of ``params``' types made Auto.

  Adam-mini's block means and Q-Adam-mini's group reshapes split axes in ways
  that sharding-in-types has no rule for, so the step runs under
  ``jax.sharding.auto_axes`` (XLA's partitioner shards it as on an Auto mesh)
  with ``shardings``, the parameters' shardings read from their types; its
  results take the types of ``like`` (a pytree like them).
  """
  is_spec = lambda x: isinstance(x, PartitionSpec)
  specs = explicit_specs(params)
  if jax.sharding.get_abstract_mesh().empty:
    path, leaf = next((p, x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
                      if is_explicit(getattr(jax.typeof(x).sharding, "mesh", None)))
    raise ShardingError(
        f"{partition_lib.path_str(path)}: sharded on Explicit mesh axes "
        f"({jax.typeof(leaf).sharding.spec}) but no mesh is set; run the step under "
        "jax.set_mesh(mesh), as jax.jit needs for any Explicit-axis program.")

  def auto(*args):
    mesh = jax.sharding.get_abstract_mesh()
    return fn(jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec), *args)

  out_specs = jax.tree.map(lambda x: jax.typeof(x).sharding.spec, like)
  return jax.sharding.auto_axes(auto, out_sharding=out_specs)(*args)


def per_parameter(params: Any, param_shardings: Any, mesh: Any = None) -> list[tuple[str, tuple[int, ...], NamedSharding]]:
  """``(path, shape, NamedSharding)`` per parameter leaf, in leaf order (matched by path)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  is_sharding = lambda x: isinstance(x, (jax.sharding.Sharding, PartitionSpec))
  shardings = by_path(params, param_shardings, "param_shardings", is_leaf=is_sharding,
                      error=ShardingError)
  out = []
  for (path, leaf), sharding in zip(flat, shardings):
    name = partition_lib.path_str(path)
    if isinstance(sharding, PartitionSpec):
      if mesh is None:
        raise ShardingError(f"{name}: param_shardings holds PartitionSpecs; pass mesh= too.")
      try:
        sharding = NamedSharding(mesh, sharding)
      except ValueError as e:  # e.g. a mesh axis that the mesh lacks
        raise ShardingError(f"{name}: {e}") from e
    if not isinstance(sharding, NamedSharding):
      raise ShardingError(f"{name}: expected a NamedSharding or PartitionSpec, got "
                          f"{type(sharding).__name__}.")
    if len(sharding.spec) > len(leaf.shape):
      raise ShardingError(f"{name}: its PartitionSpec {sharding.spec} has more entries than "
                          f"its shape {tuple(leaf.shape)} has axes.")
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
    params: the parameters (arrays or ``ShapeDtypeStruct``s; an INT8 weight,
      :class:`~qadam_mini_jax.weights.QuantizedParam`, counts as its value).
    param_shardings: a pytree like ``params`` of ``NamedSharding``s (one per
      weight, INT8 or not), or of
      ``PartitionSpec``s together with ``mesh`` (e.g. from
      ``nnx.get_partition_spec``).
    mesh: the ``jax.sharding.Mesh`` of PartitionSpecs.

  Returns:
    A pytree like ``state`` of ``NamedSharding``s.

  Raises:
    ShardingError: a parameter sharding cuts INT8 quantization groups, or
      ``param_shardings`` does not match ``params``.
  """
  params = weights_lib.float_like(params)  # an INT8 weight: its value's path and shape
  per_param = {name: (shape, sharding)
               for name, shape, sharding in per_parameter(params, param_shardings, mesh)}
  treedef = jax.tree.structure(params)
  if treedef.num_leaves < 2 and treedef.num_nodes == 1:
    raise ShardingError("params must be a pytree container (e.g. a dict) of arrays, not one array.")
  any_sharding = next(iter(per_param.values()))[1] if per_param else NamedSharding(mesh, PartitionSpec())
  replicated = NamedSharding(any_sharding.mesh, PartitionSpec())

  def owner(path: str) -> tuple[str, str] | None:
    """``(parameter name, rest)`` of a state leaf path under a parameter's name."""
    name = _enclosing(path, per_param)
    return None if name is None else (name, path[len(name):].lstrip("/"))

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


def weight_shardings(params: Any, param_shardings: Any, *, mesh: Any = None) -> Any:
  """Shardings of parameters that hold INT8 weights (:func:`.weights.quantize_params`).

  A :class:`~qadam_mini_jax.weights.QuantizedParam`'s codes take the weight's
  sharding and its scales that sharding reduced along the group axes (as the
  INT8 ``m``'s scales: :func:`state_shardings`); float leaves keep theirs.
  For ``jax.device_put`` or ``jax.jit(..., out_shardings=...)``.

  Args:
    params: the parameters, INT8 weights among them.
    param_shardings: one ``NamedSharding`` (or ``PartitionSpec`` with ``mesh``)
      per weight, as for float parameters.

  Raises:
    ShardingError: a weight's sharding cuts its INT8 groups.
  """
  return state_shardings(params, params, param_shardings, mesh=mesh)
