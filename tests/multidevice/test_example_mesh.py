"""examples/train.py --mesh on 8 devices: same run as unsharded, really sharded, resumable anywhere.

Run by ``tests/test_sharding.py`` in a subprocess with 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import qadam_mini_jax as q
import train

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")

# Far below "tiny"; a batch of 8 splits over data * fsdp = 8.
SMALL = ["--dim", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--ffn-dim", "64",
         "--seq-len", "32", "--batch-size", "8", "--log-every", "1", "--eval-every", "4",
         "--eval-batches", "2", "--warmup-steps", "1"]


def run(out: pathlib.Path, *flags: str) -> train.Result:
  args = train.build_parser().parse_args([*SMALL, *flags, "--out-dir", str(out), "--no-progress"])
  model_cfg, opt_cfg, cfg = train.configs_from_args(args)
  return train.train(model_cfg, opt_cfg, dataclasses.replace(cfg, verbose=False))


def metrics(out: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


LR = 3e-3  # the default --lr


def assert_close(a, b, rtol=1e-5):
  """Leaves equal up to ``rtol`` of each leaf's largest magnitude (float summation order).

  Sharded sums round differently, so an INT8 code of ``m`` may land one step
  off (as in tests/multidevice/test_sharded.py): rare elements may then differ
  by about one code step of one update, ``LR / 127``.
  """
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    tol = rtol * max(float(np.max(np.abs(y))), 1e-30)
    diff = np.abs(x - y)
    assert (diff > tol).mean() < 1e-3 and diff.max() <= tol + LR / 127, (
        (diff > tol).sum(), diff.max(), tol)


def assert_same_losses(a: pathlib.Path, b: pathlib.Path):
  ma, mb = metrics(a), metrics(b)
  assert [m["step"] for m in ma] == [m["step"] for m in mb]
  for key in ("loss", "grad_norm", "embed_norm", "val_loss"):
    got = [m[key] for m in ma if key in m]
    want = [m[key] for m in mb if key in m]
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=key)


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
  """The runs without --mesh (on device 0 of the 8), by optimizer."""
  runs = {}

  def get(optimizer):
    if optimizer not in runs:
      out = tmp_path_factory.mktemp(f"unsharded-{optimizer}")
      runs[optimizer] = out, run(out, "--optimizer", optimizer, "--steps", "4")
    return runs[optimizer]

  return get


def leaf(tree, path):
  for key in path.split("/"):
    tree = tree[int(key) if key.isdigit() else key]  # layers are keyed by int
  return tree


@pytest.mark.parametrize("optimizer, mesh, specs", [
    ("q_adam_mini", "data=2,fsdp=4", {
        "embed/embedding": P("fsdp", None), "layers/0/attn/q_proj/kernel": P(None, "fsdp"),
        "layers/0/mlp/down_proj/kernel": P(None, "fsdp"), "lm_head/kernel": P(None, "fsdp"),
        "layers/0/attn_norm/scale": P()}),
    ("adam_mini", "data=2,fsdp=2,tensor=2", {
        "embed/embedding": P(("tensor", "fsdp"), None),
        "layers/0/attn/q_proj/kernel": P(None, ("tensor", "fsdp")),
        "layers/0/attn/o_proj/kernel": P("tensor", "fsdp"),
        "layers/0/mlp/down_proj/kernel": P("tensor", "fsdp"),
        "lm_head/kernel": P(None, ("tensor", "fsdp"))}),
    ("adamw", "fsdp=8", {
        "embed/embedding": P("fsdp", None), "layers/0/mlp/up_proj/kernel": P(None, "fsdp"),
        "layers/0/attn/k_proj/kernel": P(None, "fsdp")}),
])
def test_mesh_run_equals_the_unsharded_run(unsharded, tmp_path, optimizer, mesh, specs):
  want_dir, want = unsharded(optimizer)
  got = run(tmp_path, "--optimizer", optimizer, "--steps", "4", "--mesh", mesh)
  assert_same_losses(tmp_path, want_dir)
  assert_close(got.state["params"], want.state["params"])

  params, opt_state = got.state["params"], got.state["opt_state"]
  for path, spec in specs.items():
    assert leaf(params, path).sharding.spec == spec, path
  # The optimizer state follows the parameters (and really is split).
  expected = q.state_shardings(opt_state, params, jax.tree.map(lambda x: x.sharding, params))
  for x, s in zip(jax.tree.leaves(opt_state), jax.tree.leaves(expected)):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding.spec, s.spec)
  m = leaf(opt_state[1][0].mu, "lm_head/kernel")  # after clipping: Adam(-mini)'s m
  if optimizer == "q_adam_mini":  # INT8 codes and one scale per column (one group of 32 rows)
    assert isinstance(m, q.QuantizedArray) and m.scales.sharding.spec == P(None, "fsdp")
    m = m.codes
  assert m.sharding.spec == specs.get("lm_head/kernel", P(None, "fsdp"))
  s = got.summary
  assert s["mesh"] == train.parse_mesh(mesh)
  assert s["state_bytes_per_device"] < s["state_bytes"] / 2
  assert s["params_bytes_per_device"] < s["params"] * 4 / 2


RESUME = ["--optimizer", "q_adam_mini", "--steps", "6", "--grad-accum", "2",
          "--checkpoint-every", "3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  out = tmp_path_factory.mktemp("uninterrupted")
  return out, run(out, *RESUME)


@pytest.fixture(scope="module")
def saved_on_mesh(tmp_path_factory):
  """Steps 1-4 on (data=2, fsdp=4), checkpointed at steps 3 and 4 (an eval step: same log lines)."""
  out = tmp_path_factory.mktemp("saved-on-mesh")
  run(out, *RESUME, "--mesh", "data=2,fsdp=4", "--stop-at", "4")
  return out


@pytest.mark.parametrize("mesh", ["fsdp=8", "data=8", None])
def test_checkpoint_resumes_on_another_mesh(uninterrupted, saved_on_mesh, tmp_path, mesh):
  shutil.copytree(saved_on_mesh, tmp_path / "run")
  resumed = run(tmp_path / "run", *RESUME, "--resume", *(["--mesh", mesh] if mesh else []))
  want_dir, want = uninterrupted
  assert_same_losses(tmp_path / "run", want_dir)
  assert_close(resumed.state["params"], want.state["params"])
  devices = {d for x in jax.tree.leaves(resumed.state) for d in x.sharding.device_set}
  assert len(devices) == (8 if mesh else 1)
  if mesh == "fsdp=8":
    assert resumed.state["params"]["lm_head"]["kernel"].sharding.spec == P(None, "fsdp")


@pytest.mark.parametrize("flags, message", [
    (["--mesh", "data=2,fsdp=4,pipeline=1"],
     "unknown mesh axis 'pipeline'; the axes are data, fsdp, tensor"),
    (["--mesh", "data2"], "cannot read 'data2'; expected comma-separated AXIS=SIZE"),
    (["--mesh", "data=two"], "the size of 'data' must be a positive integer"),
    (["--mesh", "data=0,fsdp=8"], "the size of 'data' must be a positive integer"),
    (["--mesh", "data=2,data=4"], "axis 'data' is given twice"),
    (["--mesh", "data=2,fsdp=2"], "needs 4 devices, but JAX sees 8.*"
                                  "XLA_FLAGS=--xla_force_host_platform_device_count=4"),
    (["--mesh", "fsdp=8", "--batch-size", "4"], "--batch-size 4 must be divisible by "
                                                 "data \\* fsdp = 8"),
])
def test_bad_mesh_is_a_clear_error(tmp_path, capsys, flags, message):
  with pytest.raises(SystemExit):
    train.main([*flags, "--out-dir", str(tmp_path / "run")])
  err = capsys.readouterr().err
  assert "error:" in err
  assert re.search(message, err), err
  assert not (tmp_path / "run").exists()


def test_mesh_that_cuts_int8_groups_names_the_parameter(tmp_path):
  # o_proj (64, 64) holds INT8 m with one group of 64 rows per column; tensor=8
  # would split those rows 8 ways.
  with pytest.raises(SystemExit, match=r"--mesh 'tensor=8' does not suit q_adam_mini.*"
                                       r"layers/0/attn/o_proj/kernel.*INT8 quantization groups"):
    train.main(["--dim", "64", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                "--ffn-dim", "64", "--mesh", "tensor=8", "--out-dir", str(tmp_path / "run")])
  assert not (tmp_path / "run").exists()
