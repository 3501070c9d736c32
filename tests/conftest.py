import os
import pathlib
import sys

import pytest

TESTS = pathlib.Path(__file__).resolve().parent

# The suite is mostly XLA compiles, and LLVM's optimizations take a third of their
# time on the CPU backend: the tests (and the processes they start, which inherit
# the environment) compile at LLVM level 0 (about 35% less compile time). The
# program XLA optimizes is the same at every level (fusion, layouts and buffer
# assignment are XLA's passes, before LLVM) and no level allows fast-math; only
# the machine code's speed differs. XLA_FLAGS naming
# --xla_backend_optimization_level runs the suite at that level instead.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()
# The example LLaMA model and training script are shared by tests and the benchmarks.
sys.path.insert(0, str(TESTS.parent / "examples"))
# benchmarks/kernel_compile.py compiles the kernel with Triton for the report and the tests.
sys.path.insert(0, str(TESTS.parent / "benchmarks"))
sys.path.insert(0, str(TESTS))  # tiny_models, for tests in subdirectories too

# tests/multidevice needs 8 devices: tests/test_sharding.py runs it in a
# subprocess with 8 simulated CPU devices (the flag must precede JAX's start).
if os.environ.get("QADAM_MULTIDEVICE") != "1":
  collect_ignore = ["multidevice"]


BACKGROUND = "test_multiprocess.py"  # its tests wait for work in processes of their own


def _start_background() -> None:
  """Start tests/multidevice and the multi-process runs (see multidevice_process and
  multiprocess_runs)."""
  import multidevice_process  # pylint: disable=g-import-not-at-top
  import multiprocess_runs  # pylint: disable=g-import-not-at-top
  multidevice_process.start()
  multiprocess_runs.start()


def pytest_collection_modifyitems(config, items):
  """Start the background work early when the suite selects the tests that wait for it.

  In one process: as soon as the suite is collected. Under pytest-xdist
  (``-n 2 --dist loadfile``, the README's command; one worker runs each test
  file, so module fixtures and compiles are shared) those tests are scheduled
  first, and the worker that runs them starts the work and waits while the
  other worker runs the rest (:func:`pytest_runtest_setup`).
  """
  del config
  waiting = [item for item in items if item.path.name == BACKGROUND]
  if not waiting:
    return
  if "PYTEST_XDIST_WORKER" in os.environ:
    items[:] = waiting + [item for item in items if item.path.name != BACKGROUND]
  else:
    _start_background()


def pytest_runtest_setup(item):
  if item.path.name == BACKGROUND:  # (again: once per process)
    _start_background()


#: JAX flags of the persistent compilation cache (also read from the environment,
#: upper-cased, by a subprocess).
_CACHE_FLAGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(scope="session")
def _compilation_cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax-compilation-cache")


@pytest.fixture(scope="module")
def compilation_cache(_compilation_cache_dir):
  """JAX's persistent compilation cache, on for the module that uses this fixture.

  Runs of ``examples/train.py`` build their jitted functions afresh, so every
  run of one configuration used to compile the same train step, init and eval
  step again (about 20 s each on two cores). With the cache, XLA compiles each
  distinct program once per test session (in a fresh directory, never reused
  across sessions) and later runs load the executable: the same program, so
  nothing a test compares changes. Yields the environment variables that make a
  subprocess share the cache.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  values = (str(_compilation_cache_dir), 0, -1)  # every executable, however quick or small
  before = {name: getattr(jax.config, name) for name in _CACHE_FLAGS}
  for name, value in zip(_CACHE_FLAGS, values):
    jax.config.update(name, value)
  cc.reset_cache()  # JAX decides whether to use the cache once; decide again
  try:
    yield {name.upper(): str(value) for name, value in zip(_CACHE_FLAGS, values)}
  finally:
    for name, value in before.items():
      jax.config.update(name, value)
    cc.reset_cache()
