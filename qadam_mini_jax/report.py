"""Readable reports on a partition and on optimizer-state memory."""

from __future__ import annotations

import math
from typing import Any

import jax

from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import transform
from qadam_mini_jax import weights as weights_lib


def tree_nbytes(tree: Any) -> int:
  """Total bytes of the array leaves of ``tree`` (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, "dtype"))


def tree_nbytes_per_device(tree: Any) -> dict[Any, int]:
  """Bytes of ``tree``'s arrays held by each device (its addressable shards)."""
  held: dict[Any, int] = {}
  for x in jax.tree.leaves(tree):
    for shard in getattr(x, "addressable_shards", ()):
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return held


def describe(params: Any, optimizer: Any = None, *, state: Any = None,
             partition: partition_lib.BlockPartition | None = None,
             **scale_by_adam_mini_kwargs: Any) -> str:
  """A table of path, shape, rule, number of blocks and optimizer-state bytes per leaf.

  The bytes are those of the state the user trains with: ``optimizer`` (any
  optax transformation, e.g. ``q_adam_mini(...)`` inside an ``optax.chain``,
  or a :class:`~qadam_mini_jax.alias.FusedOptimizer`) initialised on
  ``params``, or a ``state`` already built. Every state leaf is counted on the
  parameter whose path it contains (``mu/layers/0/mlp/kernel/codes`` on
  ``layers/0/mlp/kernel``); leaves of no parameter (step counts, keys) are
  one row of their own. Without either, the state is
  ``scale_by_adam_mini(partition=partition, **scale_by_adam_mini_kwargs)``'s.
  ``rule`` and ``blocks`` are Adam-mini's under ``partition`` (default
  :class:`~.partition.BlockPartition()`): pass the optimizer's.

  ``params`` may hold arrays, ``jax.ShapeDtypeStruct``s or INT8 weights
  (:class:`~qadam_mini_jax.weights.QuantizedParam`); nothing is allocated.
  """
  if optimizer is not None and state is not None:
    raise TypeError("describe takes an optimizer or its state, not both.")
  if (optimizer is not None or state is not None) and scale_by_adam_mini_kwargs:
    raise TypeError(f"describe: {sorted(scale_by_adam_mini_kwargs)} configure the default "
                    "scale_by_adam_mini; with an optimizer or a state they have no effect.")
  partition = partition or partition_lib.BlockPartition()
  if state is None:
    optimizer = optimizer or transform.scale_by_adam_mini(partition=partition,
                                                          **scale_by_adam_mini_kwargs)
    state = jax.eval_shape(optimizer.init, params)
  shapes = weights_lib.float_like(params)
  paths = [partition_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
  state_bytes = dict.fromkeys(paths, 0)
  other_bytes = 0
  for state_path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    owner = _owner(partition_lib.path_str(state_path).split("/"), state_bytes)
    if owner is None:
      other_bytes += tree_nbytes(leaf)
    else:
      state_bytes[owner] += tree_nbytes(leaf)
  specs = partition_lib.block_specs(shapes, partition)
  rows = [("path", "shape", "rule", "blocks", "state bytes")]
  leaves, treedef = jax.tree.flatten(shapes)
  for path, leaf, spec in zip(paths, leaves, treedef.flatten_up_to(specs)):
    rule = "left alone" if spec is None else spec.rule + (
        f" per layer (axes {spec.layers})" if spec.layers else "")
    blocks = "-" if spec is None else str(partition_lib.num_blocks(spec, tuple(leaf.shape)))
    rows.append((path, str(tuple(leaf.shape)), rule, blocks, f"{state_bytes[path]:,}"))
  if other_bytes:
    rows.append(("(not per parameter)", "", "counts, keys...", "", f"{other_bytes:,}"))
  total_params = sum(math.prod(leaf.shape) for leaf in leaves)
  total_bytes = sum(state_bytes.values()) + other_bytes
  rows.append(("total", f"{total_params:,} params", "", "",
               f"{total_bytes:,} ({total_bytes / max(total_params, 1):.4f} B/param)"))
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _owner(parts: list[str], params: dict[str, int]) -> str | None:
  """The longest parameter path that is a run of consecutive ``parts``, if any."""
  found = None
  for i in range(len(parts)):
    for j in range(len(parts), i, -1):
      path = "/".join(parts[i:j])
      if path in params and (found is None or len(path) > len(found)):
        found = path
        break
  return found
