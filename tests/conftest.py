import pathlib
import sys

# The example LLaMA model is shared by tests, the demo and the benchmarks.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
