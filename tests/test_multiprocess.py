"""examples/train.py over 2 processes x 4 CPU devices: the run of 1 process x 8, resumable across.

The runs are started early, in the background (tests/multiprocess_runs.py).
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest

import multiprocess_runs
import train


@pytest.fixture(scope="module")
def runs():
  yield multiprocess_runs.result()
  multiprocess_runs.cleanup()


def metrics(out: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(a: pathlib.Path, b: pathlib.Path):
  """The same steps logged, the same numbers up to float summation order (collectives differ)."""
  ma, mb = metrics(a), metrics(b)
  assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(
      range(1, multiprocess_runs.STOP_AT + 1))
  for key in ("loss", "grad_norm", "embed_norm", "val_loss"):
    np.testing.assert_allclose([m[key] for m in ma if key in m], [m[key] for m in mb if key in m],
                               rtol=1e-5, err_msg=key)


def assert_succeeded(run: multiprocess_runs.Run):
  assert run.returncodes == [0] * len(run.returncodes), run.outputs


def test_two_processes_train_as_one_process_with_eight_devices(runs):
  two, one = runs["two"], runs["one"]
  assert_succeeded(two)
  assert_succeeded(one)
  assert_same_losses(two.out, one.out)
  assert "distributed: process 0 of 2: 4 of 8 cpu devices\n" in two.outputs[0]
  assert "step 6: validation loss" in two.outputs[0]
  # Only process 0 logs and writes the run's files; both write their checkpoint shards.
  assert not re.search(r"distributed:|data:|step +\d|validation loss", two.outputs[1])
  assert json.loads((two.out / "summary.json").read_text())["step"] == multiprocess_runs.STOP_AT
  for step in (3, 6):
    state = two.out / "checkpoints" / str(step) / "state"
    assert {p.name for p in state.glob("ocdbt.process_*")} == {"ocdbt.process_0",
                                                              "ocdbt.process_1"}
  assert not (two.out / "run.lock").exists()


@pytest.mark.parametrize("name", ["two-then-one", "one-then-two"])
def test_checkpoints_resume_with_another_process_count(runs, name):
  resumed = runs[name]
  assert_succeeded(resumed)
  saved_by = "two" if name.startswith("two") else "one"
  assert f"resumed from step 3 ({resumed.out}/checkpoints)" in resumed.outputs[0]
  assert_same_losses(resumed.out, runs[saved_by].out)  # steps 1-3 its log, 4-6 resumed
  assert_same_losses(resumed.out, runs["one" if saved_by == "two" else "two"].out)


def test_a_dead_process_stops_the_others_with_an_error(runs):
  killed = runs["killed"]
  assert killed.killed_at is not None, killed.outputs
  assert killed.returncodes[1] == -9  # SIGKILL, as a host that fails
  assert killed.returncodes[0] not in (0, None), killed.outputs[0]  # None: it hung
  # JAX's coordination service ends it: heartbeats stopped.
  assert "This most likely indicates that another task died" in killed.outputs[0]
  assert killed.ended[0] - killed.killed_at < multiprocess_runs.HEARTBEAT_TIMEOUT + 60


def test_a_launch_of_several_processes_must_ask_for_a_distributed_run(monkeypatch, capsys, tmp_path):
  monkeypatch.setenv("SLURM_NTASKS", "4")
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node[001-004]")
  with pytest.raises(SystemExit) as exit_info:
    train.main(["--out-dir", str(tmp_path / "run")])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.splitlines()[-1].endswith(
      "error: SLURM_NTASKS=4 says this is one of several processes, but train.py was not asked "
      "to run distributed: pass --distributed to train one run over all of them, or start a "
      "single process.")
  assert not (tmp_path / "run").exists()
