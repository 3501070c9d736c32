import os
import pathlib
import sys

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
# The example LLaMA model and training script are shared by tests and the benchmarks.
sys.path.insert(0, str(TESTS.parent / "examples"))
# benchmarks/kernel_compile.py compiles the kernel with Triton for the report and the tests.
sys.path.insert(0, str(TESTS.parent / "benchmarks"))
sys.path.insert(0, str(TESTS))  # tiny_models, for tests in subdirectories too

# tests/multidevice needs 8 devices: tests/test_sharding.py runs it in a
# subprocess with 8 simulated CPU devices (the flag must precede JAX's start).
if os.environ.get("QADAM_MULTIDEVICE") != "1":
  collect_ignore = ["multidevice"]


def pytest_collection_modifyitems(config, items):
  """Start tests/multidevice and the multi-process runs early when the suite selects them.

  See multidevice_process and multiprocess_runs.
  """
  del config
  if any(item.name == "test_multidevice_suite" for item in items):
    import multidevice_process  # pylint: disable=g-import-not-at-top
    multidevice_process.start()
  if any(item.path.name == "test_multiprocess.py" for item in items):
    import multiprocess_runs  # pylint: disable=g-import-not-at-top
    multiprocess_runs.start()


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
