"""The pretraining example: every optimizer trains, resume is exact, bad input fails clearly."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil
import sys

import jax
import numpy as np
import pytest

import checkpointing
import data as data_lib
import train

# A model far below "tiny" for the checkpoint tests: they exercise the plumbing.
SMALL = ["--dim", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--ffn-dim", "64",
         "--seq-len", "32", "--batch-size", "4", "--log-every", "1", "--eval-every", "4",
         "--eval-batches", "2"]


def run(out: pathlib.Path, *flags: str) -> train.Result:
  args = train.build_parser().parse_args([*flags, "--out-dir", str(out), "--no-progress"])
  model_cfg, opt_cfg, cfg = train.configs_from_args(args)
  return train.train(model_cfg, opt_cfg, dataclasses.replace(cfg, verbose=False))


def assert_same_state(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def metrics(out: pathlib.Path) -> list[dict]:
  lines = (out / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


@pytest.mark.parametrize("optimizer", ["adamw", "adam_mini", "q_adam_mini", "adafactor", "lion"])
def test_each_optimizer_trains_the_tiny_config(tmp_path, optimizer):
  result = run(tmp_path, "--model", "tiny", "--optimizer", optimizer, "--steps", "8",
               "--warmup-steps", "1", "--seq-len", "32", "--batch-size", "4",
               "--log-every", "1", "--eval-every", "8", "--eval-batches", "1")
  losses = [m["loss"] for m in metrics(tmp_path)]
  assert len(losses) == 8 and all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < losses[0] - 0.5  # from ln(256) = 5.5 towards byte statistics
  s = result.summary
  assert np.isfinite(s["val_loss"]) and s["val_ppl"] == pytest.approx(np.exp(s["val_loss"]))
  assert s["state_bytes"] > 0 and s["compiled_step_memory"]["argument"] > 0
  if optimizer == "q_adam_mini":
    assert s["state_bytes_per_param"] < 1.5  # INT8 m: about 1 byte per parameter
  assert (tmp_path / "summary.json").exists()


RESUME_FLAGS = [*SMALL, "--optimizer", "q_adam_mini", "--steps", "6", "--grad-accum", "2",
                "--checkpoint-every", "3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """A q_adam_mini run (INT8 m, stochastic rounding, MultiSteps) with checkpoints at 3 and 6."""
  out = tmp_path_factory.mktemp("uninterrupted")
  return out, run(out, *RESUME_FLAGS)


@pytest.fixture
def copied_run(uninterrupted, tmp_path):
  """A copy of the uninterrupted run's directory, free to break."""
  shutil.copytree(uninterrupted[0], tmp_path / "run")
  return tmp_path / "run"


def test_resume_continues_the_exact_trajectory(uninterrupted, tmp_path):
  out, whole = uninterrupted
  run(tmp_path, *RESUME_FLAGS, "--stop-at", "4")  # an eval step: same log lines
  resumed = run(tmp_path, *RESUME_FLAGS, "--resume")
  assert_same_state(whole.state, resumed.state)  # params, INT8 codes, scales, v, key, counts
  assert metrics(out) == metrics(tmp_path)


def test_corrupt_checkpoint_is_reported_and_the_previous_one_still_resumes(
    uninterrupted, copied_run):
  for f in (copied_run / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  with pytest.raises(checkpointing.CheckpointError, match=r"step 6.*unreadable.*steps \[3\]"):
    run(copied_run, *RESUME_FLAGS, "--resume")
  resumed = run(copied_run, *RESUME_FLAGS, "--resume-step", "3")
  assert_same_state(uninterrupted[1].state, resumed.state)
  assert (copied_run / "checkpoints-set-aside" / "6").is_dir()  # kept, out of the way
  again = run(copied_run, *RESUME_FLAGS, "--resume")  # the new step 6 is readable
  assert_same_state(uninterrupted[1].state, again.state)


def test_unfinished_save_is_ignored(copied_run):
  (copied_run / "checkpoints" / "9.orbax-checkpoint-tmp-123").mkdir()  # a save cut short
  assert checkpointing.Checkpoints(copied_run / "checkpoints").steps() == [3, 6]


@pytest.mark.parametrize("change, problem", [
    (["--dim", "48"], r"different model \(dim: checkpoint 32, this run 48"),
    (["--optimizer", "adamw"], r"different optimizer \(name: checkpoint 'q_adam_mini'"),
    (["--no-stochastic-rounding"], r"different optimizer \(stochastic_rounding"),
    (["--grad-accum", "1"], r"different optimizer \(grad_accum"),
])
def test_checkpoint_of_another_model_or_optimizer_is_refused(copied_run, change, problem):
  with pytest.raises(checkpointing.CheckpointError, match=problem):
    run(copied_run, *RESUME_FLAGS, "--resume", *change)


def test_existing_checkpoints_are_not_overwritten_without_resume(copied_run):
  with pytest.raises(checkpointing.CheckpointError, match="already holds checkpoints"):
    run(copied_run, *RESUME_FLAGS)
  assert checkpointing.Checkpoints(copied_run / "checkpoints").steps() == [3, 6]


def test_missing_empty_or_tiny_data_fail_clearly(tmp_path, capsys):
  with pytest.raises(SystemExit, match="does not exist"):
    train.main(["--data", str(tmp_path / "nope.txt"), "--out-dir", str(tmp_path / "run")])
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(SystemExit, match="no text"):
    train.main(["--data", str(tmp_path / "empty.txt"), "--out-dir", str(tmp_path / "run")])
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(SystemExit, match="holds no files"):
    train.main(["--data", str(tmp_path / "empty_dir"), "--out-dir", str(tmp_path / "run")])
  (tmp_path / "short.txt").write_text("too short")
  with pytest.raises(SystemExit, match="too small"):
    train.main(["--data", str(tmp_path / "short.txt"), "--out-dir", str(tmp_path / "run")])
  assert not (tmp_path / "run").exists()  # nothing written


def test_heads_that_do_not_divide_the_width_fail_clearly(capsys):
  with pytest.raises(SystemExit):
    train.main(["--model", "tiny", "--heads", "6", "--kv-heads", "2"])
  assert "num_heads=6 does not divide dim=128" in capsys.readouterr().err


@pytest.mark.parametrize("mesh, problem", [
    ("data=2,pipeline=4", "unknown mesh axis 'pipeline'; the axes are data, fsdp, tensor"),
    ("data:2", "cannot read 'data:2'; expected comma-separated AXIS=SIZE items"),
    ("data=16",
     r"needs 16 devices, but JAX sees \d+ .*--xla_force_host_platform_device_count=16"),
])
def test_bad_mesh_fails_clearly(tmp_path, capsys, mesh, problem):
  """Sharded runs themselves are tested on 8 devices (tests/multidevice/test_example_mesh.py)."""
  with pytest.raises(SystemExit):
    train.main(["--mesh", mesh, "--out-dir", str(tmp_path / "run")])
  assert re.search(problem, capsys.readouterr().err)
  assert not (tmp_path / "run").exists()


def test_user_text_files_are_split_into_train_and_validation(tmp_path):
  (tmp_path / "a.txt").write_text("hello world. " * 100)
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.md").write_text("more text! " * 100)
  corpus = data_lib.load_corpus([str(tmp_path)], seq_len=16, val_fraction=0.25)
  assert len(corpus.val) == int(0.25 * (len(corpus.train) + len(corpus.val)))
  assert corpus.name == str(tmp_path)
  batch = data_lib.train_batch(corpus.train, 7, 3, 16, seed=0)
  assert batch.shape == (3, 16) and np.array_equal(
      batch, data_lib.train_batch(corpus.train, 7, 3, 16, seed=0))


def test_hugging_face_data_without_the_datasets_package_fails_clearly(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
  with pytest.raises(data_lib.DataError, match="needs the `datasets` package"):
    data_lib.load_corpus(["hf:wikitext:wikitext-2-raw-v1"], seq_len=16)
