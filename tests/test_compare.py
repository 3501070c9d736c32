"""benchmarks/compare.py: a result is reused only for the very configuration that made it."""

from __future__ import annotations

import json
import pathlib
import re
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


def record(variant: str, seed: int, commit: str | None, val_loss: float = 1.5,
           loss: float = 2.0) -> dict:
  """A finished run's record as run_one writes it (``commit=None``: from before
  records kept their code), with a two-point curve."""
  curve = [{"step": 1, "loss": loss, "embed_norm": 3.0},
           {"step": 2, "loss": loss, "embed_norm": 3.5, "val_loss": val_loss}]
  summary = {"val_loss": val_loss, "state_bytes_per_param": 8.0, "state_bytes": 80,
             "tokens_per_s": 1.0, "embed_norm": 3.5}
  r = {"name": f"{variant}_lr0.001_seed{seed}", "variant": variant, "flags": "", "lr": 1e-3,
       "seed": seed, "train_flags": ["--steps", "2"], "summary": summary, "curve": curve}
  if commit:
    r["config"] = {"data": {"name": "d", "fingerprint": "f"},
                   "code": {"commit": commit, "uncommitted": None}}
  return r


def write(out: pathlib.Path, *records: dict) -> None:
  (out / "runs").mkdir(parents=True, exist_ok=True)
  for i, r in enumerate(records):
    (out / "runs" / f"{r['name']}_{i}.json").write_text(json.dumps(r))


def test_a_row_of_an_older_commit_is_reported_with_the_run_of_a_newer_one_that_reproduced_it(
    tmp_path):
  write(tmp_path, record("adamw", 0, None), record("adamw", 1, None),
        record("adamw", 0, "b" * 40, loss=2.0 * (1 + 1e-7)), record("lion", 0, "c" * 40))
  records = compare.finished_runs(tmp_path)
  assert sorted((r["variant"], r["seed"], r["run_by"]) for r in records) == [
      ("adamw", 0, "not recorded"), ("adamw", 1, "not recorded"), ("lion", 0, "ccccccc")]
  rows = compare.table(compare.cells(records), [1e-3], [0], set()).splitlines()
  assert rows[2].endswith("| 0, 1 | **1.5000** (1.5000, 1.5000) | 4.482 | +0.00% | 8.000 | 80 | "
                          "1 | 3.50 | 0 of 2 | not recorded; lr 0.001 seed 0 reproduced by "
                          "bbbbbbb |")
  assert rows[3].endswith("| 0 | **1.5000** (1.5000) | 4.482 | +0.00% | 8.000 | 80 | 1 | 3.50 "
                          "| 0 of 1 | ccccccc |")
  # a grid of two learning rates, of which lion ran one: its best is marked as such,
  # and not compared with adamw's
  rows = compare.table(compare.cells(records), [1e-3, 3e-3], [0], set()).splitlines()
  assert "| `lion` | 1.5000 | - | 0.001 (of 0.001 only) | 0 | **1.5000** (1.5000) | 4.482 | - |" \
      in rows[3]


@pytest.mark.parametrize("records, problem", [
    ([record("adamw", 0, None), record("adamw", 0, "b" * 40, val_loss=1.5 + 1e-12)],
     "adamw_lr0.001_seed0 by not recorded and by bbbbbbb differ"),
    ([record("adamw", 0, None), record("adamw", 0, "b" * 40, loss=2.0 * (1 + 1e-5))],
     "adamw_lr0.001_seed0 by not recorded and by bbbbbbb differ"),
    ([record("adamw", 0, "a" * 40), record("adamw", 1, "b" * 40)],
     "runs of one variant come from several commits ({'adamw': ['aaaaaaa', 'bbbbbbb']})"),
])
def test_runs_of_one_row_from_different_commits_must_agree(tmp_path, records, problem):
  write(tmp_path, *records)
  with pytest.raises(SystemExit, match=re.escape(problem)):
    compare.finished_runs(tmp_path)
