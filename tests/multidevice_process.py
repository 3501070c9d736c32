"""tests/multidevice on 8 simulated CPU devices, in a process of its own.

The flag that makes 8 devices must precede JAX's start, so these tests run in a
fresh process. ``conftest.py`` starts it early when the suite selects
``test_multiprocess.py``, so it runs beside the rest of the suite;
``test_multiprocess.py::test_multidevice_suite`` then waits for its result.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile

TESTS = pathlib.Path(__file__).resolve().parent
_run: dict[str, object] = {}


def start() -> None:
  """Start the process (once)."""
  if _run:
    return
  env = dict(os.environ, QADAM_MULTIDEVICE="1", JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip())
  env.pop("PYTEST_ADDOPTS", None)
  log = tempfile.TemporaryFile(mode="w+")
  _run["log"] = log
  _run["proc"] = subprocess.Popen(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "multidevice")],
      cwd=TESTS.parent, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def result(timeout: float = 1200) -> tuple[int, str]:
  """Its exit code and output (starting it first if nothing has)."""
  start()
  rc = _run["proc"].wait(timeout=timeout)
  _run["log"].seek(0)
  return rc, _run["log"].read()
