import os
import pathlib
import sys

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
  """Start tests/multidevice early when the suite selects it (see multidevice_process)."""
  del config
  if any(item.name == "test_multidevice_suite" for item in items):
    import multidevice_process  # pylint: disable=g-import-not-at-top
    multidevice_process.start()
