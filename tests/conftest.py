import pathlib
import sys

# The example LLaMA model and training script are shared by tests and the benchmarks.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
