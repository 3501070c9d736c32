"""The pretraining example: every optimizer trains, resume is exact, bad input fails clearly."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import chex
import numpy as np
import optax
import pytest

import qadam_mini_jax

import checkpointing
import llama_model
import data as data_lib
import optimizers
import run_lock
import train

EXAMPLES = pathlib.Path(train.__file__).resolve().parent

# Many runs here share a configuration (every resume of RESUME_FLAGS): with JAX's
# persistent compilation cache each distinct train step, init and eval step
# compiles once (conftest.py).
pytestmark = pytest.mark.usefixtures("compilation_cache")

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


def stacked(params: dict) -> dict:
  """The unscanned model's ``params`` with ``layers/i/...`` stacked into ``layers/...``."""
  layers = params["layers"]
  return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs),
                                           *(layers[i] for i in sorted(layers)))}


@functools.cache  # the same arrays for every test that asks for a configuration
def initial_params(*flags: str) -> dict:
  model_cfg, _, cfg = train.configs_from_args(train.build_parser().parse_args(flags))
  return train.init_fn(model_cfg, optax.identity(), cfg.seed, cfg.dtype)[1]()["params"]


def test_scanned_model_starts_from_the_unscanned_weights():
  assert_same_state(stacked(initial_params("--model", "tiny")),
                    initial_params("--model", "tiny", "--scan-layers"))


def test_adafactor_is_optax_adafactor_when_layers_are_not_stacked():
  """Its chain is optax.adafactor's with the update clipping per layer: the same unscanned."""
  params = initial_params("--model", "tiny")
  c = optimizers.OptimizerConfig(name="adafactor", total_steps=10, warmup_steps=2)
  lr = optimizers.schedule(c)
  reference = optax.adafactor(lr, multiply_by_parameter_scale=False,
                              weight_decay_rate=lambda count: c.weight_decay * lr(count),
                              weight_decay_mask=qadam_mini_jax.default_decay_mask)
  ours = optimizers.core(c, train.CONFIGS["tiny"])
  states, trees = [reference.init(params), ours.init(params)], [params, params]
  for i in range(4):  # the updates' RMS is just above 1: the clipping acts
    grads = jax.tree.map(lambda p: 3 * jax.random.normal(jax.random.key(i), p.shape), params)
    for k, tx in enumerate((reference, ours)):
      updates, states[k] = jax.jit(tx.update)(grads, states[k], trees[k])
      trees[k] = optax.apply_updates(trees[k], updates)
  assert_same_state(*trees)
  assert_same_state(*states)


#: Relative loss tolerance of a --scan-layers run against the unscanned one. Not
#: bit-exact: XLA sums the scanned and the unrolled forward and backward passes in
#: different orders (and the global gradient norm over other leaves), so losses
#: part in the last float bits (1e-7) and training amplifies that: after 20 steps
#: here up to 5e-6 relative, most for Q-Adam-mini, whose INT8 rounding can turn a
#: last-bit difference of m into a whole quantization step (2e-3 after 50 steps).
#: A layer axis left undeclared makes adam_mini and q_adam_mini refuse the stacked
#: kernels (PartitionError) and gives Adafactor one update clip over all layers:
#: 1e-3 from step 6 on (0.23 after 50 steps).
SCAN_RTOL = {"q_adam_mini": 1e-2}
#: q_adam_mini rounds m to nearest here: stochastic rounding would draw other noise
#: for the output layer, its stream being named by its position among the leaves.
SCAN_FLAGS = {"q_adam_mini": ["--stochastic-rounding", "none"]}
SCAN_STEPS = 20


#: GaLore's stacked layers equal the per-layer NumPy reference (tests/test_low_rank.py)
#: and the example trains and resumes Q-GaLore's whole recipe scanned
#: (test_int8_weights_train_and_resume_exactly), so neither trains here (the suite's time);
#: nor MicroAdam, whose stacked layers equal their twins (tests/test_micro_adam.py) and
#: which benchmarks/compare.py trains; nor Lion, an elementwise optax transform whose
#: scanned run differs from AdamW's in nothing this test reads (compare.py trains it).
@pytest.mark.parametrize("optimizer", [o for o in optimizers.OPTIMIZERS
                                       if o not in ("galore", "q_galore", "micro_adam", "lion")])
def test_each_optimizer_trains_the_tiny_config_the_same_scanned_or_not(tmp_path, optimizer):
  flags = ["--model", "tiny", "--optimizer", optimizer, *SCAN_FLAGS.get(optimizer, []),
           "--steps", str(SCAN_STEPS), "--warmup-steps", "5", "--seq-len", "32",
           "--batch-size", "4", "--log-every", "1", "--eval-every", str(SCAN_STEPS),
           "--eval-batches", "1"]
  result = run(tmp_path / "unscanned", *flags)
  scanned = run(tmp_path / "scanned", *flags, "--scan-layers")
  losses = [m["loss"] for m in metrics(tmp_path / "unscanned")]
  assert len(losses) == SCAN_STEPS and all(np.isfinite(losses))
  # From ln(256) = 5.5 towards byte statistics: about 2.1 lower after 20 steps.
  assert np.mean(losses[-5:]) < losses[0] - 0.7
  np.testing.assert_allclose([m["loss"] for m in metrics(tmp_path / "scanned")], losses,
                             rtol=SCAN_RTOL.get(optimizer, 1e-4))
  assert scanned.state["params"]["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 128, 128)
  s = result.summary
  assert np.isfinite(s["val_loss"]) and s["val_ppl"] == pytest.approx(np.exp(s["val_loss"]))
  assert s["state_bytes"] > 0 and s["compiled_step_memory"]["argument"] > 0
  assert s["compile_seconds"] > 0  # the same state up to Adafactor's per-leaf placeholders:
  assert scanned.summary["state_bytes"] == pytest.approx(s["state_bytes"], rel=1e-3)
  if optimizer == "q_adam_mini":
    assert s["state_bytes_per_param"] < 1.5  # INT8 m: about 1 byte per parameter
  assert (tmp_path / "unscanned" / "summary.json").exists()


@pytest.mark.parametrize("weight_quant", [[], ["--weight-quant"]], ids=["float", "int8_weights"])
def test_update_in_backward_trains_as_the_ordinary_step(tmp_path, weight_quant):
  """20 steps of q_adam_mini (clipped by global norm, stochastic rounding on the
  embedding and head), with and without ``--update-in-backward``: the same
  losses and gradient norms up to float rounding, and a checkpoint of one
  resumes under the other (the state is the same)."""
  flags = ["--model", "tiny", "--scan-layers", *weight_quant, "--steps", str(SCAN_STEPS),
           "--warmup-steps", "5", "--lr", "1e-3", "--seq-len", "32", "--batch-size", "4", "--log-every", "1",
           "--eval-every", str(SCAN_STEPS), "--eval-batches", "1"]
  ordinary = run(tmp_path / "ordinary", *flags)
  in_backward = run(tmp_path / "in_backward", *flags, "--update-in-backward")
  got, want = metrics(tmp_path / "in_backward"), metrics(tmp_path / "ordinary")
  assert len(got) == SCAN_STEPS and got[-1]["loss"] < got[0]["loss"] - 1
  # Float rounding grows over the steps (at lr 3e-3 a gradient spike at step 20
  # differed by 7%; at 1e-3 the trajectories stay close).
  for key, rtol in (("loss", 2e-4), ("grad_norm", 2e-3)):
    np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=rtol)
  assert jax.tree.structure(in_backward.state) == jax.tree.structure(ordinary.state)
  temp = lambda r: r.summary["compiled_step_memory"]["temp"]
  assert temp(in_backward) < temp(ordinary)


@pytest.mark.parametrize("flags, problem", [
    ([], "--scan-layers is needed"),
    (["--scan-layers", "--optimizer", "adafactor"], "--optimizer adafactor"),
    (["--scan-layers", "--grad-accum", "2"], "--grad-accum"),
    (["--scan-layers", "--skip-nonfinite"], "--skip-nonfinite"),
])
def test_update_in_backward_refuses_what_needs_the_whole_gradient(tmp_path, capsys, flags,
                                                                  problem):
  with pytest.raises(SystemExit) as exit_info:
    train.main([*SMALL, "--update-in-backward", *flags, "--out-dir", str(tmp_path / "run")])
  assert exit_info.value.code == 2
  line = capsys.readouterr().err.splitlines()[-1]
  assert "--update-in-backward updates each layer" in line and problem in line
  assert not (tmp_path / "run").exists()


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
  for f in (copied_run / "checkpoints" / "6" / "state" / "ocdbt.process_0" / "d").iterdir():
    f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])  # truncated array data
  with pytest.raises(checkpointing.CheckpointError) as err:
    run(copied_run, *RESUME_FLAGS, "--resume")
  assert re.fullmatch(
      r"checkpoint step 6 in \S+: \S+/checkpoints/6/state \(array [\w/]+\) is unreadable, "
      r"truncated or damaged \(.{,400}\)\. Resume from an older checkpoint with --resume-step 3 "
      r"\(steps here: \[3\]\)\.", str(err.value))  # no TensorStore spec dump
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


def test_scanned_run_resumes_exactly_and_only_scanned(copied_run, tmp_path):
  flags = [*RESUME_FLAGS, "--layers", "2", "--scan-layers"]
  whole = run(tmp_path / "whole", *flags)
  run(tmp_path / "cut", *flags, "--stop-at", "4")
  resumed = run(tmp_path / "cut", *flags, "--resume")
  assert_same_state(whole.state, resumed.state)  # stacked params, INT8 m per layer, key
  assert metrics(tmp_path / "whole") == metrics(tmp_path / "cut")
  for out, other, saved, this in ((tmp_path / "whole", [*RESUME_FLAGS, "--layers", "2"], "with",
                                   "without"),
                                  (copied_run, flags, "without", "with")):
    with pytest.raises(checkpointing.CheckpointError) as err:
      run(out, *other, "--resume")
    assert re.fullmatch(
        rf"checkpoint step 6 in \S+ was saved by a run {saved} --scan-layers, and this run "
        rf"is {this} it: the layers' arrays differ\. Resume it {saved} --scan-layers\.",
        str(err.value))


def test_checkpoint_from_before_scan_layers_still_resumes(uninterrupted, copied_run):
  for meta in (copied_run / "checkpoints").glob("*/meta/metadata"):
    record = json.loads(meta.read_text())
    del record["model"]["scan_layers"]  # as saved before the flag existed
    meta.write_text(json.dumps(record))
  resumed = run(copied_run, *RESUME_FLAGS, "--resume-step", "3")
  assert_same_state(uninterrupted[1].state, resumed.state)


def test_a_resume_never_reports_a_step_it_did_not_reach(copied_run, capsys):
  with pytest.raises(SystemExit) as exit_info:  # the newest checkpoint is of step 6
    train.main([*RESUME_FLAGS, "--resume", "--stop-at", "4", "--out-dir", str(copied_run)])
  assert re.fullmatch(
      r"error: --stop-at 4 is before step 6, where the checkpoint to resume in \S+ stands "
      r"\(steps there: \[3, 6\]\): give a later --stop-at, or an earlier checkpoint with "
      r"--resume-step\.", exit_info.value.code)
  assert "validation loss" not in capsys.readouterr().out
  assert checkpointing.Checkpoints(copied_run / "checkpoints").steps() == [3, 6]


def test_existing_checkpoints_are_not_overwritten_without_resume(copied_run):
  with pytest.raises(checkpointing.CheckpointError, match="already holds checkpoints"):
    run(copied_run, *RESUME_FLAGS)
  assert checkpointing.Checkpoints(copied_run / "checkpoints").steps() == [3, 6]


@pytest.mark.parametrize("flags, problem", [
    (["--log-every", "0"], "argument --log-every: must be a positive integer, got 0"),
    (["--eval-every", "0"], "argument --eval-every: must be a positive integer, got 0"),
    (["--checkpoint-every", "0"], "argument --checkpoint-every: must be a positive integer, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
    (["--steps", "-5"], "argument --steps: must be a positive integer, got -5"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
    (["--b1", "1.0"], r"argument --b1: must be in [0, 1), got 1.0"),
    (["--b2", "1.5"], r"argument --b2: must be in [0, 1), got 1.5"),
    (["--weight-decay", "-0.1"], "argument --weight-decay: must be a finite number >= 0, got -0.1"),
    (["--steps", "10", "--warmup-steps", "20"], "--warmup-steps 20 must not exceed --steps 10."),
    (["--attention-chunk", "0"], "argument --attention-chunk: must be a positive integer, got 0"),
    (["--seq-len", "32", "--attention-chunk", "12"],
     "--attention-chunk 12 must divide --seq-len 32."),
])
def test_bad_flags_fail_in_one_line_naming_the_flag(tmp_path, capsys, flags, problem):
  with pytest.raises(SystemExit) as exit_info:
    train.main([*flags, "--out-dir", str(tmp_path / "run")])
  assert exit_info.value.code == 2  # argparse's parser.error, before anything is built
  assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {problem}")
  assert not (tmp_path / "run").exists()


TINY_RUN = [*RESUME_FLAGS, "--stop-at", "1"]  # one step, compiled before (the cache)


def test_one_writer_per_run_directory_and_stale_locks_are_taken_over(tmp_path, capsys):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import run_lock, sys, time; run_lock.RunLock(sys.argv[1])"
       ".__enter__(); print('locked', flush=True); time.sleep(120)", str(tmp_path)],
      cwd=EXAMPLES, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "locked\n"
    who = f"PID {holder.pid} on host {socket.gethostname()}"
    with pytest.raises(run_lock.LockError, match=rf"in use by another run \({who}, since"):
      run(tmp_path, *TINY_RUN)
    assert not (tmp_path / "metrics.jsonl").exists()  # the refused run wrote nothing
  finally:
    holder.kill()  # SIGKILL: no cleanup, its lock file stays behind
    holder.wait()
  assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["pid"] == holder.pid  # stale
  run(tmp_path, *TINY_RUN)
  assert f"took over the stale lock of {tmp_path} from {who}" in capsys.readouterr().err
  assert not (tmp_path / run_lock.LOCK_FILE).exists()  # released at the end


DIVERGING = [*SMALL, "--optimizer", "adamw", "--lr", "1e30", "--warmup-steps", "0"]


def test_divergence_stops_with_the_step_and_no_nonfinite_checkpoint(tmp_path):
  with pytest.raises(SystemExit) as exit_info:
    train.main([*DIVERGING, "--steps", "6", "--checkpoint-every", "1", "--log-every", "5",
                "--out-dir", str(tmp_path), "--no-progress"])
  assert re.fullmatch(
      r"error: step 2: loss \S+, gradient norm nan: training diverged and stops without "
      r"saving; the checkpoint of step 1 in \S+ is the last good one \(--resume-step 1\)\. "
      r"Try a lower --lr \(this run: 1e\+30\), or --skip-nonfinite to skip updates whose "
      r"gradients are not finite \(optax.apply_if_finite\)\.", exit_info.value.code)
  assert checkpointing.Checkpoints(tmp_path / "checkpoints").steps() == [1]
  assert [m["step"] for m in metrics(tmp_path)] == [1]
  assert not (tmp_path / "summary.json").exists()


def test_skip_nonfinite_skips_updates_until_apply_if_finite_gives_up(tmp_path):
  with pytest.raises(train.Diverged, match=r"^step 12: .*\(11 micro-batches in a row, more "
                     r"than --skip-nonfinite skips\).* the checkpoint of step 10 "):
    run(tmp_path, *DIVERGING, "--steps", "20", "--checkpoint-every", "5", "--skip-nonfinite")
  assert [m["skipped"] for m in metrics(tmp_path)] == [0] + [1] * 10
  # Steps 2 to 11 were skipped: the state stayed finite, so 5 and 10 were saved.
  assert checkpointing.Checkpoints(tmp_path / "checkpoints").steps() == [5, 10]


def test_all_finite_looks_at_float_leaves_only():
  codes = jnp.full((3,), -128, jnp.int8)
  assert train.all_finite({"codes": codes, "m": jnp.ones(3)})
  assert not train.all_finite({"codes": codes, "m": jnp.array([1.0, jnp.inf, 0.0])})
  assert not train.all_finite({"codes": codes, "v": jnp.array([[jnp.nan]], jnp.bfloat16)})


def test_sigterm_saves_the_current_step_and_the_run_resumes_exactly(tmp_path, compilation_cache):
  flags = [*SMALL, "--optimizer", "q_adam_mini", "--steps", "100000", "--warmup-steps", "2",
           "--checkpoint-every", "100000"]
  out = tmp_path / "stopped"
  proc = subprocess.Popen([sys.executable, str(EXAMPLES / "train.py"), *flags, "--out-dir",
                           str(out), "--no-progress"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, **compilation_cache))  # compiles for the runs below
  deadline = time.monotonic() + 300
  while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
  step = int(re.search(r"stopped by SIGTERM after step (\d+), saved in \S+; continue with:\n"
                       r"  python \S*train.py .* --out-dir \S+ --no-progress --resume\n$",
                       err).group(1))
  assert checkpointing.Checkpoints(out / "checkpoints").steps() == [step]
  resumed = run(out, *flags, "--resume", "--stop-at", str(step + 2))
  whole = run(tmp_path / "whole", *flags, "--stop-at", str(step + 2))
  assert_same_state(whole.state, resumed.state)
  assert metrics(out) == metrics(tmp_path / "whole")


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


def test_attention_in_chunks_is_the_whole_causal_attention():
  """Values and gradients (grouped-query heads), to float rounding; a chunk that
  does not divide the sequence is refused."""
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, 16, 4, 8))
  k, v = (jax.random.normal(key, (2, 16, 2, 8)) for key in keys[1:])

  def grads(chunk):
    loss = lambda *qkv: jnp.sum(jnp.sin(llama_model.causal_attention(*qkv, chunk)))
    return llama_model.causal_attention(q, k, v, chunk), jax.grad(loss, (0, 1, 2))(q, k, v)
  whole = grads(None)
  for chunk in (1, 4, 16, 64):
    chex.assert_trees_all_close(grads(chunk), whole, atol=2e-6)
  with pytest.raises(ValueError, match="attention_chunk=5 must divide the sequence length 16"):
    llama_model.causal_attention(q, k, v, 5)
  with pytest.raises(ValueError, match="attention_chunk=0 must be a positive number"):
    dataclasses.replace(llama_model.CONFIGS["tiny"], attention_chunk=0)


def test_attention_in_chunks_trains_as_whole_attention(tmp_path):
  flags = [*SMALL, "--steps", "3"]
  run(tmp_path / "whole", *flags)
  run(tmp_path / "chunks", *flags, "--attention-chunk", "8")
  got, want = metrics(tmp_path / "chunks"), metrics(tmp_path / "whole")
  for key in ("loss", "grad_norm", "embed_norm"):
    np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=1e-5)


def test_heads_that_do_not_divide_the_width_fail_clearly(capsys):
  with pytest.raises(SystemExit):
    train.main(["--model", "tiny", "--heads", "6", "--kv-heads", "2"])
  assert "--heads=6 does not divide --dim=128; set --head-dim" in capsys.readouterr().err


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


WEIGHT_QUANT = [*SMALL, "--ffn-dim", "128", "--optimizer", "q_adam_mini", "--weight-quant",
                "--steps", "6", "--warmup-steps", "1", "--checkpoint-every", "3"]


#: Q-GaLore's whole recipe (INT8 weights, INT4 projectors, INT8 m on R): the
#: projectors refresh at steps 0, 2 and 4, so the resumed run refreshes first.
Q_GALORE = ["--scan-layers", "--optimizer", "q_galore", "--rank", "8", "--update-proj-gap", "2"]


@pytest.mark.parametrize("scan", [[], ["--scan-layers"], Q_GALORE],
                         ids=["unrolled", "scanned", "q_galore_scanned"])
def test_int8_weights_train_and_resume_exactly(tmp_path, scan):
  whole = run(tmp_path / "whole", *WEIGHT_QUANT, *scan)
  params = whole.state["params"]
  kernel = params["layers"]["mlp"]["up_proj"]["kernel"] if scan else (
      params["layers"][0]["mlp"]["up_proj"]["kernel"])
  assert isinstance(kernel, qadam_mini_jax.QuantizedParam) and kernel.codes.dtype == jnp.int8
  assert kernel.shape == ((1, 32, 128) if scan else (32, 128)) and kernel.stochastic
  assert not isinstance(params["norm"]["scale"], qadam_mini_jax.QuantizedParam)
  losses = [m["loss"] for m in metrics(tmp_path / "whole")]
  assert len(losses) == 6 and losses[-1] < losses[0]
  run(tmp_path / "cut", *WEIGHT_QUANT, *scan, "--stop-at", "4")
  resumed = run(tmp_path / "cut", *WEIGHT_QUANT, *scan, "--resume")
  # Weight codes and scales, m, v, key, counts; q_galore's projectors, gaps and cosines.
  assert_same_state(whole.state, resumed.state)
  if scan is Q_GALORE:
    galore_state = whole.state["opt_state"][1][0]
    assert isinstance(galore_state, qadam_mini_jax.ScaleByGaLoreState)
  assert metrics(tmp_path / "whole") == metrics(tmp_path / "cut")


def test_micro_adam_state_is_per_layer_when_scanned():
  """The example's MicroAdam (trained by benchmarks/compare.py; its steps, stacked
  layers and resume are tested in tests/test_micro_adam.py): a ring and error
  feedback per layer of the scanned model, under 1 byte per parameter."""
  flags = [*SMALL, "--layers", "2", "--scan-layers", "--optimizer", "micro_adam"]
  model_cfg, opt_cfg, cfg = train.configs_from_args(train.build_parser().parse_args(flags))
  state = jax.eval_shape(train.init_fn(model_cfg, optimizers.make(opt_cfg, model_cfg), cfg.seed,
                                       cfg.dtype)[1])
  micro = optimizers.core_state(opt_cfg, state["opt_state"])[0]
  assert isinstance(micro, qadam_mini_jax.ScaleByMicroAdamState)
  ring = micro.indices["layers"]["mlp"]["up_proj"]["kernel"]
  assert ring.dtype == jnp.int16 and ring.shape == (2, 10, 22)  # 2048 = 2 blocks keeping 11
  params = state["params"]
  per_param = optimizers.state_nbytes(opt_cfg, model_cfg, params) / sum(
      x.size for x in jax.tree.leaves(params))
  assert 0.9 < per_param < 1.0


def test_micro_adam_refuses_a_mesh(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.main([*SMALL, "--optimizer", "micro_adam", "--mesh", "data=1",
                "--out-dir", str(tmp_path / "run")])
  assert exit_info.value.code == 2
  assert "--optimizer micro_adam does not combine with --mesh 'data=1' yet" in (
      capsys.readouterr().err.splitlines()[-1])
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, problem", [
    (["--optimizer", "adamw"], "--weight-quant needs --optimizer q_adam_mini"),
    (["--grad-accum", "2"], "without --grad-accum or --skip-nonfinite"),
    (["--mesh", "data=1"], "--weight-quant does not combine with --mesh 'data=1' yet"),
])
def test_weight_quant_refuses_what_it_cannot_do(tmp_path, capsys, flags, problem):
  with pytest.raises(SystemExit) as exit_info:
    train.main([*SMALL, "--weight-quant", *flags, "--out-dir", str(tmp_path / "run")])
  assert exit_info.value.code == 2
  assert problem in capsys.readouterr().err.splitlines()[-1]
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("optimizer", ["adamw", "micro_adam"])
def test_stochastic_rounding_is_refused_where_nothing_is_rounded(tmp_path, capsys, optimizer):
  with pytest.raises(SystemExit) as exit_info:
    train.main([*SMALL, "--optimizer", optimizer, "--no-stochastic-rounding",
                "--out-dir", str(tmp_path / "run")])
  assert exit_info.value.code == 2
  assert (f"--stochastic-rounding needs --optimizer q_adam_mini, q_galore: {optimizer} has no "
          "stochastic rounding to set.") in capsys.readouterr().err.splitlines()[-1]
  assert not (tmp_path / "run").exists()


def test_mu_dtype_sets_the_first_moment_of_adamw_and_is_refused_elsewhere(tmp_path, capsys):
  flags = [*SMALL, "--optimizer", "adamw", "--mu-dtype", "bfloat16"]
  model_cfg, opt_cfg, cfg = train.configs_from_args(train.build_parser().parse_args(flags))
  assert "mu_dtype" in optimizers.STRUCTURAL_FIELDS  # a checkpoint resumes only with the same
  state = jax.eval_shape(train.init_fn(model_cfg, optimizers.make(opt_cfg, model_cfg), cfg.seed,
                                       cfg.dtype)[1])
  adam_state = optimizers.core_state(opt_cfg, state["opt_state"])[0]
  assert {x.dtype for x in jax.tree.leaves(adam_state.mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(adam_state.nu)} == {jnp.dtype(jnp.float32)}
  with pytest.raises(SystemExit) as exit_info:
    train.main([*SMALL, "--optimizer", "q_adam_mini", "--mu-dtype", "bfloat16",
                "--out-dir", str(tmp_path / "run")])
  assert exit_info.value.code == 2
  assert ("--mu-dtype needs --optimizer adamw, adam_mini, lion: q_adam_mini has no float first "
          "moment to set.") in capsys.readouterr().err.splitlines()[-1]
  assert not (tmp_path / "run").exists()
