"""Optimizer-state memory per parameter on LLaMA shapes, without allocating.

Run from the repository root::

    python benchmarks/memory.py

For each optimizer and LLaMA size, the state's shapes come from
``jax.eval_shape(tx.init, params)`` on the unallocated parameter tree of
``llama_shapes.param_shapes``, and its bytes from ``qadam_mini_jax.tree_nbytes``.
Prints a Markdown table of state bytes per parameter (and total GiB at 7B),
checks Q-Adam-mini against its memory target, and writes the same report to
``benchmarks/results/memory.md``.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import llama_shapes  # noqa: E402  (found through the sys.path entry above)
import results_file  # noqa: E402

import qadam_mini_jax  # noqa: E402

MODELS = ("60M", "130M", "1B", "7B")
GIB_MODEL = "7B"  # the model whose total state size is reported in GiB
TARGET_MODELS = ("1B", "7B")
TARGET_BYTES_PER_PARAM = 1.02  # Q-Adam-mini's goal: about 1 byte of state per parameter
TARGET_OPTIMIZER = "q_adam_mini"
MICRO_ADAM = "micro_adam"
MICRO_ADAM_TARGET = 0.95  # the MicroAdam issue's goal at 7B (m = 10, density 1%)
COMMAND = "python benchmarks/memory.py"
LEARNING_RATE = 1e-3

OptimizerFactory = Callable[[llama_shapes.LlamaConfig], optax.GradientTransformation]


def _partition(c: llama_shapes.LlamaConfig) -> qadam_mini_jax.BlockPartition:
  return qadam_mini_jax.BlockPartition(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads)


def _galore(alias: Callable[..., optax.GradientTransformation]) -> OptimizerFactory:
  return lambda c: alias(LEARNING_RATE, rank=llama_shapes.galore_rank(c), partition=_partition(c))


#: Table row name -> optimizer for one model config.
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "optax.adamw": lambda c: optax.adamw(LEARNING_RATE),
    "optax.adamw (mu bf16)": lambda c: optax.adamw(LEARNING_RATE, mu_dtype=jnp.bfloat16),
    "optax.adafactor": lambda c: optax.adafactor(LEARNING_RATE),
    "optax.lion": lambda c: optax.lion(LEARNING_RATE),
    "adam_mini": lambda c: qadam_mini_jax.adam_mini(LEARNING_RATE, partition=_partition(c)),
    TARGET_OPTIMIZER: lambda c: qadam_mini_jax.q_adam_mini(
        LEARNING_RATE, partition=_partition(c)),
    "galore (Q-GaLore's ranks)": _galore(qadam_mini_jax.galore),
    "q_galore (Q-GaLore's ranks)": _galore(qadam_mini_jax.q_galore),
    MICRO_ADAM: lambda c: qadam_mini_jax.micro_adam(LEARNING_RATE),
}


def target_check(optimizer: str, model: str, value: float, target: float) -> str:
  verdict = "met" if value <= target else "NOT met"
  return f"- `{optimizer}` at {model}: {value:.4f} B/param (target <= {target}): **{verdict}**"


def num_params(params) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(params))


def state_bytes(tx: optax.GradientTransformation, params) -> int:
  """Bytes of ``tx``'s state for ``params``, from shapes only."""
  return qadam_mini_jax.tree_nbytes(jax.eval_shape(tx.init, params))


def measure() -> tuple[dict[str, int], dict[str, dict[str, int]]]:
  """Parameter counts per model and state bytes per optimizer and model."""
  counts, nbytes = {}, {name: {} for name in OPTIMIZERS}
  for model in MODELS:
    config, params = llama_shapes.CONFIGS[model], llama_shapes.param_shapes(model)
    counts[model] = num_params(params)
    for name, make in OPTIMIZERS.items():
      nbytes[name][model] = state_bytes(make(config), params)
  return counts, nbytes


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  align = ["---"] + ["---:"] * (len(header) - 1)
  return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *rows])


def report(counts: dict[str, int], nbytes: dict[str, dict[str, int]]) -> str:
  per_param = {name: {m: b / counts[m] for m, b in row.items()} for name, row in nbytes.items()}
  header = ["optimizer"] + [f"{m} B/param" for m in MODELS] + [f"{GIB_MODEL} state GiB"]
  rows = [[f"`{name}`"] + [f"{per_param[name][m]:.3f}" for m in MODELS]
          + [f"{nbytes[name][GIB_MODEL] / 2**30:.2f}"] for name in OPTIMIZERS]
  params_row = ", ".join(f"{m}: {counts[m]:,}" for m in MODELS)
  checks = [target_check(TARGET_OPTIMIZER, model, per_param[TARGET_OPTIMIZER][model],
                         TARGET_BYTES_PER_PARAM) for model in TARGET_MODELS]
  return "\n".join([
      f"Produced by `{COMMAND}` "
      f"(jax {jax.__version__}, optax {optax.__version__}, "
      f"qadam_mini_jax {qadam_mini_jax.__version__}); shapes only, no device memory used.",
      "",
      "## Optimizer-state bytes per parameter (float32 LLaMA parameters)",
      "",
      f"Parameters: {params_row}.",
      "",
      markdown_table(header, rows),
      "",
      "GaLore rows: rank " + ", ".join(f"{llama_shapes.galore_rank(llama_shapes.CONFIGS[m])} "
                                      f"at {m}" for m in MODELS)
      + " (Q-GaLore's scripts; its paper's table gives 512 at 1B). Attention and MLP matrices keep Adam's moments on the "
      "rank-r projection R (r x the larger side) and their projector (float32 in `galore`, "
      "INT4 in `q_galore`); embedding, output layer and norms keep full Adam moments. "
      "`q_galore` stores m in INT8 and v in 8 bits (a logarithmic code, "
      "`benchmarks/second_moment_code.py`).",
      "",
      f"`{MICRO_ADAM}`: MicroAdam's m = 10, density 1%, top-k blocks of 1024 (k = 11) and "
      "error buckets of 1024: 0.5 B/param of 4-bit error feedback, 4 m k / 1024 = 0.43 of "
      "ring (int16 index, bfloat16 value), 4 / 1024 of bucket ends (bfloat16 min and max); "
      "the reference's formula 0.5 + 4 m density + 4/q gives 0.90 at exactly 1%.",
      "",
      "## Memory targets",
      "",
      *checks,
      target_check(MICRO_ADAM, GIB_MODEL, per_param[MICRO_ADAM][GIB_MODEL],
                   MICRO_ADAM_TARGET),
      "",
  ])


def main() -> None:
  results_file.write("memory.md", report(*measure()))


if __name__ == "__main__":
  main()
