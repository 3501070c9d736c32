"""Orbax checkpoints of a training state, checked before they are trusted.

A checkpoint is one Orbax step directory holding

* ``state``: every array of the training state (parameters and the whole
  optimizer state: INT8 codes and scales of ``m``, ``v``, step counts, the
  stochastic-rounding key), stored flat under its ``/``-joined pytree path;
* ``meta``: JSON describing the run (model, optimizer, data position, ...).

Orbax writes each step into a temporary directory and renames it when
complete, so a crash or a full disk mid-save never damages the previous
checkpoint. Restoring checks, before reading any array, that the stored
``meta`` agrees with what the caller expects (same model, same optimizer) and
that every stored path, shape and dtype matches the target state; any
disagreement or unreadable file raises :class:`CheckpointError` naming the
problem and the other checkpoints available. Nothing is ever deleted except by
Orbax's ``keep`` rotation after a newer save succeeded.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

import multihost


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable, or written for another model/optimizer."""


def flatten(tree: Any) -> dict[str, Any]:
  """``{"a/b/0/c": leaf}`` for every leaf of ``tree``."""
  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unreadable(path: pathlib.Path, err: Exception) -> str:
  """``"<path> is unreadable ..."`` with the first line of ``err``, naming the array if it does.

  TensorStore errors follow their first sentence with a 2 kB spec dump: that is
  cut, keeping the array's name from it.
  """
  text = str(err)
  arrays = re.findall(r"'path': '([^/'][^']*?)/?'", text)
  first = text.split(" See full TensorStore details")[0].strip().splitlines()[0][:300]
  array = f" (array {arrays[-1]})" if arrays else ""
  return (f"{path}{array} is unreadable, truncated or damaged ({type(err).__name__}: "
          f"{first.rstrip('.')})")


def _differences(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
  return [f"{k}: checkpoint {stored.get(k)!r}, this run {expected.get(k)!r}"
          for k in sorted(set(stored) | set(expected)) if stored.get(k) != expected.get(k)]


class Checkpoints:
  """The checkpoints of one run directory (the newest ``keep`` are kept)."""

  def __init__(self, directory: str | pathlib.Path, keep: int = 2):
    self.directory = pathlib.Path(directory).resolve()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def steps(self) -> list[int]:
    """Steps with a complete checkpoint, oldest first."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
    """Write ``state`` (a pytree of arrays) and ``meta`` (JSON) as ``step``."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flatten(state)), meta=ocp.args.JsonSave(dict(meta))))
    self._manager.wait_until_finished()

  def set_aside_after(self, step: int) -> list[pathlib.Path]:
    """Move checkpoints newer than ``step`` to ``<dir>-set-aside/``; return their new paths.

    A resume from an older ``step`` starts a new trajectory: its checkpoints
    must not be shadowed by (or silently skipped for) the old ones, which are
    kept rather than deleted. In a multi-process run process 0 moves them (the
    others return ``[]``) while every process waits.
    """
    newer = [s for s in self.steps() if s > step]
    multihost.barrier("checkpoints listed")  # before any moves
    moved = []
    for s in newer if multihost.is_primary() else ():
      target = self.directory.with_name(self.directory.name + "-set-aside") / str(s)
      while target.exists():
        target = target.with_name(target.name + "+")
      target.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(s)).rename(target)
      moved.append(target)
    multihost.barrier("checkpoints set aside")
    self._manager.reload()
    return moved

  def _fail(self, step: int, problem: str) -> CheckpointError:
    others = [s for s in self.steps() if s != step]
    older = [s for s in others if s < step]
    hint = (f" Resume from an older checkpoint with --resume-step {(older or others)[-1]} "
            f"(steps here: {others})." if others else "")
    return CheckpointError(f"checkpoint step {step} in {self.directory}: {problem}.{hint}")

  def read_meta(self, step: int) -> dict[str, Any]:
    """The JSON ``meta`` of ``step``."""
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return dict(meta.meta)
    except Exception as err:  # any unreadable file is reported the same way
      raise self._fail(step, _unreadable(self.directory / str(step) / "meta", err)) from err

  def restore(self, target: Any, must_match: Mapping[str, Mapping[str, Any]],
              step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restore ``(state, meta)`` of ``step`` (default: the newest) into ``target``'s structure.

    Args:
      target: a pytree of arrays or ``jax.ShapeDtypeStruct``s like the saved state;
        leaves with a ``sharding`` are restored with it (onto the current mesh,
        whatever mesh, if any, the checkpoint was saved from).
      must_match: ``{meta key: {field: value}}`` that the checkpoint's ``meta``
        must equal (e.g. the model and optimizer settings).
      step: which step; ``None`` for the newest.
    """
    steps = self.steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}.")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; "
                            f"steps available: {steps}.")
    meta = self.read_meta(step)
    for key, expected in must_match.items():
      diffs = _differences(meta.get(key) or {}, expected)
      if diffs:
        raise self._fail(step, f"written for a different {key} (" + "; ".join(diffs) + ")")
    want = {k: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
            for k, x in flatten(target).items()}
    self._check_arrays(step, want)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(want)))
    except Exception as err:
      raise self._fail(step, _unreadable(self.directory / str(step) / "state", err)) from err
    leaves = [restored.state[k] for k in want]
    return jax.tree.unflatten(jax.tree.structure(target), leaves), meta

  def _check_arrays(self, step: int, want: Mapping[str, jax.ShapeDtypeStruct]) -> None:
    """Stored paths, shapes and dtypes must be those of ``want``."""
    try:
      stored = dict(self._manager.item_metadata(step)["state"])
    except Exception as err:
      raise self._fail(step, _unreadable(self.directory / str(step) / "state", err)) from err
    missing, extra = sorted(want.keys() - stored.keys()), sorted(stored.keys() - want.keys())
    wrong = [f"{k} {tuple(stored[k].shape)} {stored[k].dtype} (want {w.shape} {w.dtype})"
             for k, w in want.items() if k in stored
             and (tuple(stored[k].shape) != w.shape or np.dtype(stored[k].dtype) != w.dtype)]
    if missing or extra or wrong:
      problems = [f"{name}: {items[:4]}" for name, items in
                  (("missing arrays", missing), ("unexpected arrays", extra),
                   ("different shapes", wrong)) if items]
      raise self._fail(step, "its arrays do not fit this model and optimizer ("
                       + "; ".join(problems) + ")")
