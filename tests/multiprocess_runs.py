"""examples/train.py over 2 processes x 4 CPU devices, beside 1 process x 8, started early.

``jax.distributed.initialize`` must precede JAX's start, so every run is a
fresh ``python examples/train.py`` (per process: ``JAX_PLATFORMS=cpu``,
``--xla_force_host_platform_device_count``, ``--coordinator-address`` on a free
localhost port). ``conftest.py`` starts them in a background thread as soon as
the suite selects ``tests/test_multiprocess.py``, so they run beside the rest of
the suite; its tests wait for :func:`result`. The runs, in two rounds:

* ``two`` over 2 processes and ``one`` over 1 process with 8 devices, from the
  same flags (checkpoints every 3 steps): ``one`` stops after step 6, ``two``
  trains on until its process 1 is killed (SIGKILL) once checkpoint 6 is saved;
* ``two-then-one`` and ``one-then-two``: each one's checkpoint of step 3
  resumed by the other process count, to step 6.

The 1-process runs share a persistent compilation cache; the 2-process runs
compile afresh: with jax 0.10.2 on CPU, process 0 hits the cache where process 1
misses it (its cache keys differ), and 2 of 3 such runs hung here.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
DEVICES = 8
# Far below "tiny"; a batch of 8 splits over fsdp = 8, so the weights and the
# optimizer state are split across both processes. --steps 1000 and --stop-at 6
# (not --steps 6): "two" trains on past step 6 with the same compiled step.
FLAGS = ["--dim", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--ffn-dim", "64",
         "--seq-len", "32", "--batch-size", "8", "--log-every", "1", "--eval-every", "3",
         "--eval-batches", "2", "--steps", "1000", "--warmup-steps", "1",
         "--checkpoint-every", "3", "--keep-checkpoints", "100", "--mesh", f"fsdp={DEVICES}",
         "--no-progress"]
STOP_AT = 6
HEARTBEAT_TIMEOUT = 10  # seconds, for the run "two" (killed)
RUN_TIMEOUT = 600  # seconds: a run that takes longer hangs

_state: dict[str, object] = {}


@dataclasses.dataclass
class Run:
  """One run's processes: exit codes (None: killed after RUN_TIMEOUT) and outputs."""

  out: pathlib.Path
  returncodes: list[int | None]
  outputs: list[str]  # stdout and stderr of each process, by process id
  ended: list[float]  # time.monotonic() at each process's end
  killed_at: float | None = None  # when process 1 was killed (the run "two")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(local_devices: int, cache: pathlib.Path | None) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + (
      f" --xla_force_host_platform_device_count={local_devices}")).strip())
  env.pop("PYTEST_ADDOPTS", None)
  if cache is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return env


def _launch(out: pathlib.Path, processes: int, cache: pathlib.Path, *flags: str):
  """Start ``train.py`` as ``processes`` processes; returns ``[(Popen, log file)]``."""
  cmd = [sys.executable, str(REPO / "examples" / "train.py"), *FLAGS, *flags, "--out-dir", str(out)]
  if processes == 1:
    procs = [(cmd, _env(DEVICES, cache))]
  else:
    address = f"localhost:{_free_port()}"
    procs = [([*cmd, "--coordinator-address", address, "--num-processes", str(processes),
               "--process-id", str(i)], _env(DEVICES // processes, None))
             for i in range(processes)]
  started = []
  for i, (argv, env) in enumerate(procs):
    log = open(out.parent / f"{out.name}.{i}.log", "w+")  # pylint: disable=consider-using-with
    started.append((subprocess.Popen(argv, cwd=REPO, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, text=True), log))
  return started


def _wait(out: pathlib.Path, started, killed_at: float | None = None) -> Run:
  codes, outputs, ended = [], [], []
  deadline = time.monotonic() + RUN_TIMEOUT
  for proc, log in started:
    try:
      codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 1)))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
      codes.append(None)
    ended.append(time.monotonic())
    log.seek(0)
    outputs.append(log.read())
    log.close()
  return Run(out, codes, outputs, ended, killed_at)


def _kill_after_step(out: pathlib.Path, started, step: int) -> float | None:
  """SIGKILL process 1 once checkpoint ``step`` is saved; when that was (None: it never was)."""
  deadline = time.monotonic() + RUN_TIMEOUT
  while time.monotonic() < deadline and all(p.poll() is None for p, _ in started):
    if (out / "checkpoints" / str(step)).is_dir():
      started[1][0].send_signal(signal.SIGKILL)
      return time.monotonic()
    time.sleep(0.05)
  return None


def _schedule(root: pathlib.Path) -> dict[str, Run]:
  cache = root / "compilation-cache"
  stop = ["--stop-at", str(STOP_AT)]
  two = _launch(root / "two", 2, cache, "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT))
  one = _launch(root / "one", 1, cache, *stop)
  killed_at = _kill_after_step(root / "two", two, STOP_AT)
  runs = {"two": _wait(root / "two", two, killed_at), "one": _wait(root / "one", one)}
  second = {}
  for before, after, processes in (("two", "two-then-one", 1), ("one", "one-then-two", 2)):
    shutil.copytree(root / before, root / after)
    second[after] = _launch(root / after, processes, cache, *stop, "--resume-step", "3")
  runs.update({name: _wait(root / name, started) for name, started in second.items()})
  return runs


def start() -> None:
  """Start the runs (once), in a background thread."""
  if _state:
    return
  root = pathlib.Path(tempfile.mkdtemp(prefix="qadam-multiprocess-"))
  _state["root"] = root

  def work():
    try:
      _state["runs"] = _schedule(root)
    except BaseException as err:  # handed to the tests by result()
      _state["error"] = err

  _state["thread"] = threading.Thread(target=work, daemon=True)
  _state["thread"].start()


def result(timeout: float = 4 * RUN_TIMEOUT) -> dict[str, Run]:
  """The runs by name (starting them first if nothing has); raises what the schedule raised."""
  start()
  _state["thread"].join(timeout)
  if "error" in _state:
    raise _state["error"]
  assert "runs" in _state, f"the multi-process runs took over {timeout} s"
  return _state["runs"]


def cleanup() -> None:
  """Remove the runs' directory (after the tests looked at it)."""
  if "root" in _state and not _state["thread"].is_alive():
    shutil.rmtree(_state["root"], ignore_errors=True)
