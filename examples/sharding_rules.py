"""Parameter shardings of the example LLaMA for ``train.py --mesh``."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

#: Megatron-style tensor parallelism: the axis each 2-D weight splits over
#: ``tensor`` (column-parallel layers by output, row-parallel ones by input).
TENSOR_AXIS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "gate_proj": 1, "up_proj": 1,
               "lm_head": 1, "o_proj": 0, "down_proj": 0, "embed": 0}


def param_shardings(params: Any, mesh: Mesh) -> Any:
  """A ``NamedSharding`` per parameter of the example LLaMA on ``mesh``.

  ``mesh`` may have the axes ``data``, ``fsdp`` and ``tensor`` (any may be
  missing or of size 1). Parameters never split over ``data`` (replicated
  there; only the batch is split over it). Every 2-D weight:

  * ``fsdp`` (fully sharded data parallel): split along the axis that never
    cuts Q-Adam-mini's INT8 quantization groups: the output axis (1) of the
    ``(in, out)`` kernels, whose groups run down the ``in`` axis, and the
    vocabulary axis (0) of the ``(vocab, dim)`` embedding, whose groups run
    along its rows;
  * ``tensor`` (Megatron): ``q/k/v/gate/up_proj`` and ``lm_head`` split by
    output (axis 1), ``o_proj``, ``down_proj`` and the embedding by input
    (axis 0), as :data:`TENSOR_AXIS` says. With both, ``fsdp`` stays on its
    own axis: the other one for ``o_proj`` and ``down_proj`` (``P("tensor",
    "fsdp")``), the same one, split ``tensor``-major, for the rest (e.g.
    ``P(None, ("tensor", "fsdp"))``).

  A split of ``o_proj``/``down_proj`` inputs over ``tensor`` cuts INT8 groups
  unless each shard holds a multiple of ``group_size`` (default 256) rows:
  :func:`qadam_mini_jax.state_shardings` then raises a ``ShardingError``
  naming the parameter. An axis whose length the mesh axes do not divide
  stays replicated over them; 1-D parameters (norm scales) are replicated.

  Args:
    params: a pytree of arrays or ``jax.ShapeDtypeStruct``s with the example
      model's paths (``embed/embedding``, ``layers/0/attn/q_proj/kernel``...).
    mesh: the device mesh.

  Returns:
    A pytree like ``params`` of ``NamedSharding``s.
  """
  sizes = dict(mesh.shape)

  def rule(path, leaf):
    if len(leaf.shape) != 2:
      return NamedSharding(mesh, PartitionSpec())
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    module = next((n for n in reversed(names) if n in TENSOR_AXIS), None)
    fsdp_axis = 0 if module == "embed" else 1
    entries: list[list[str]] = [[], []]
    for mesh_axis, axis in (("tensor", TENSOR_AXIS.get(module)), ("fsdp", fsdp_axis)):
      ways = sizes.get(mesh_axis, 1)
      if axis is None or ways == 1:
        continue
      already = 1
      for name in entries[axis]:
        already *= sizes[name]
      if leaf.shape[axis] % (already * ways) == 0:
        entries[axis].append(mesh_axis)
    spec = [None if not e else e[0] if len(e) == 1 else tuple(e) for e in entries]
    return NamedSharding(mesh, PartitionSpec(*spec))

  return jax.tree_util.tree_map_with_path(rule, params)
