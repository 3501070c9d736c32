"""benchmarks/compare.py: a result is reused only for the very configuration that made it."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import compare  # noqa: E402  (benchmarks/, added above)

# The 3- and 4-step runs differ in their schedule only: init and eval step compile once.
pytestmark = pytest.mark.usefixtures("compilation_cache")

# A model far below "tiny", evaluated only at its last step (--eval-every > --steps).
TINY = [*compare.DEFAULT_TRAIN_FLAGS, "--dim", "32", "--layers", "1", "--heads", "2",
        "--kv-heads", "1", "--ffn-dim", "64", "--seq-len", "32", "--batch-size", "4",
        "--log-every", "1", "--eval-batches", "2"]


def test_a_changed_setting_retrains_and_the_same_one_comes_from_the_cache(tmp_path, capsys):
  first, cached = compare.run_one("--optimizer adamw", 1e-3, 0, [*TINY, "--steps", "3"], tmp_path)
  assert not cached and first["summary"]["step"] == 3
  again, cached = compare.run_one("--optimizer adamw", 1e-3, 0, [*TINY, "--steps", "3"], tmp_path)
  assert cached and again == first
  assert f"adamw_lr0.001_seed0: from the cache ({tmp_path}" in capsys.readouterr().out
  assert "| 1 of 1 |" in compare.table(compare.cells([again]), [1e-3], [0], {again["name"]})

  longer, cached = compare.run_one("--optimizer adamw", 1e-3, 0, [*TINY, "--steps", "4"], tmp_path)
  assert not cached and longer["key"] != first["key"]
  assert longer["config"]["optimizer"]["total_steps"] == 4 and longer["summary"]["step"] == 4
  assert [p["step"] for p in longer["curve"]] == [1, 2, 3, 4]
  assert "val_loss" in longer["curve"][-1]  # every run ends with a validation
  # Trained from scratch, not resumed from the 3-step run: the two schedules
  # agree on step 1 only, so the losses part from step 3 on.
  assert longer["curve"][0]["loss"] == first["curve"][0]["loss"]
  assert longer["curve"][2]["loss"] != first["curve"][2]["loss"]
