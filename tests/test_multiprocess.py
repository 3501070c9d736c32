"""Tests of other processes: examples/train.py over 2 processes x 4 CPU devices (the run
of 1 process x 8, resumable across), and tests/multidevice on 8 CPU devices.

Both run in the background, started early (tests/multiprocess_runs.py,
tests/multidevice_process.py); the tests here wait for them.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest

import multidevice_process
import multiprocess_runs
import train

STOP_AT = multiprocess_runs.STOP_AT
#: What only process 0 prints.
LOG_LINES = r"distributed:|data:|step +\d|validation loss"


@pytest.fixture(scope="module")
def runs():
  yield multiprocess_runs.result()
  multiprocess_runs.cleanup()


def metrics(out: pathlib.Path) -> list[dict]:
  """The first STOP_AT lines of the run's metrics.jsonl ("two" trained on until killed)."""
  lines = (out / "metrics.jsonl").read_text().splitlines()[:STOP_AT]
  return [json.loads(line) for line in lines]


def assert_same_losses(a: pathlib.Path, b: pathlib.Path):
  """The same steps logged, the same numbers up to float summation order (collectives differ)."""
  ma, mb = metrics(a), metrics(b)
  assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(range(1, STOP_AT + 1))
  for key in ("loss", "grad_norm", "embed_norm", "val_loss"):
    np.testing.assert_allclose([m[key] for m in ma if key in m], [m[key] for m in mb if key in m],
                               rtol=1e-5, err_msg=key)


def assert_written_by_both_processes(out: pathlib.Path, step: int):
  state = out / "checkpoints" / str(step) / "state"
  assert {p.name for p in state.glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}


def test_two_processes_train_as_one_process_with_eight_devices(runs):
  two, one = runs["two"], runs["one"]
  assert one.returncodes == [0], one.outputs
  assert "distributed: process 0 of 2: 4 of 8 cpu devices\n" in two.outputs[0]
  assert not re.search(LOG_LINES, two.outputs[1])  # only process 0 logs
  assert_same_losses(two.out, one.out)
  for step in (3, 6):  # each process wrote its shards of the weights and optimizer state
    assert_written_by_both_processes(two.out, step)


@pytest.mark.parametrize("name", ["two-then-one", "one-then-two"])
def test_checkpoints_resume_with_another_process_count(runs, name):
  resumed = runs[name]
  assert resumed.returncodes == [0] * len(resumed.returncodes), resumed.outputs
  assert f"resumed from step 3 ({resumed.out}/checkpoints)" in resumed.outputs[0]
  assert_same_losses(resumed.out, runs["one"].out)  # steps 1-3 from its log, 4-6 resumed
  assert_same_losses(resumed.out, runs["two"].out)
  assert json.loads((resumed.out / "summary.json").read_text())["step"] == STOP_AT
  assert f"step {STOP_AT}: validation loss" in resumed.outputs[0]
  assert not (resumed.out / "run.lock").exists()  # released
  if name == "one-then-two":
    assert not re.search(LOG_LINES, resumed.outputs[1])
    assert_written_by_both_processes(resumed.out, STOP_AT)


def test_a_dead_process_stops_the_others_with_an_error(runs):
  two = runs["two"]
  assert two.killed_at is not None, two.outputs  # it saved checkpoint 6, then process 1 died
  assert two.returncodes[1] == -9  # SIGKILL, as when a host fails
  assert two.returncodes[0] not in (0, None), two.outputs[0]  # None: it hung
  # JAX's coordination service ends it when the heartbeats stop.
  assert "This most likely indicates that another task died" in two.outputs[0]
  assert two.ended[0] - two.killed_at < multiprocess_runs.HEARTBEAT_TIMEOUT + 60


def test_a_launch_of_several_processes_must_ask_for_a_distributed_run(monkeypatch, capsys,
                                                                      tmp_path):
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


def test_multidevice_suite():
  """tests/multidevice on 8 simulated CPU devices, in a process of its own."""
  rc, out = multidevice_process.result()
  assert rc == 0, out[-9000:]
  assert " passed" in out and "skipped" not in out, out[-2000:]
