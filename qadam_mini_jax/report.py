"""Readable reports on a partition and on optimizer-state memory."""

from __future__ import annotations

import math
from typing import Any

import jax

from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import transform


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


def describe(params: Any, **scale_by_adam_mini_kwargs: Any) -> str:
  """A table of path, shape, rule, number of blocks and state bytes per leaf.

  ``params`` may hold arrays or ``jax.ShapeDtypeStruct``s; nothing is
  allocated. Keyword arguments are those of
  :func:`~qadam_mini_jax.transform.scale_by_adam_mini` (``partition``,
  ``quantization``, ``mu_dtype``...), so the bytes are those of that state.
  """
  tx = transform.scale_by_adam_mini(**scale_by_adam_mini_kwargs)
  state = jax.eval_shape(tx.init, params)
  partition = scale_by_adam_mini_kwargs.get("partition") or partition_lib.BlockPartition()
  specs = partition_lib.block_specs(params, partition)
  leaves, treedef = jax.tree.flatten(params)
  paths = [partition_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  rows = [("path", "shape", "rule", "blocks", "state bytes")]
  total_params = total_bytes = 0
  for path, leaf, spec, mu, nu in zip(paths, leaves, treedef.flatten_up_to(specs),
                                      treedef.flatten_up_to(state.mu),
                                      treedef.flatten_up_to(state.nu)):
    nbytes = tree_nbytes((mu, nu))
    total_params += math.prod(leaf.shape)
    total_bytes += nbytes
    rule = "left alone" if spec is None else spec.rule + (
        f" per layer (axes {spec.layers})" if spec.layers else "")
    blocks = "-" if spec is None else str(partition_lib.num_blocks(spec, tuple(leaf.shape)))
    rows.append((path, str(tuple(leaf.shape)), rule, blocks, f"{nbytes:,}"))
  rows.append(("total", f"{total_params:,} params", "", "",
               f"{total_bytes:,} ({total_bytes / max(total_params, 1):.4f} B/param)"))
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
