"""What one GaLore projector refresh costs: the SVD of each matrix shape of a LLaMA.

    python benchmarks/svd_cost.py                    # 60M, 1B, 7B shapes on this machine
    python benchmarks/svd_cost.py --model 60M --iters 3

For each distinct matrix shape that ``galore``/``q_galore`` project in the
example LLaMA (attention and MLP kernels, Flax ``(in, out)``), times
``projection.singular_vectors`` (a float32 SVD of the gradient and the first
``rank`` singular vectors on the projected side, signs fixed), jitted, median
of ``--iters`` runs after a warm-up, at Q-GaLore's rank for the model
(``llama_shapes.galore_rank``). The table also gives the cost of refreshing
every projected matrix of the model once (what a step at a multiple of the gap
pays when every layer refreshes together, as at step 0) and that cost spread
over Q-GaLore's gap for the model (200 below 7B, 500 at 7B). Results go to
``benchmarks/results/svd_cost_<backend>.md``.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import compile_time  # noqa: E402  (benchmarks/, beside this script)
import llama_shapes  # noqa: E402
import results_file  # noqa: E402

import qadam_mini_jax  # noqa: E402
from qadam_mini_jax import partition as partition_lib  # noqa: E402
from qadam_mini_jax import projection  # noqa: E402

#: Q-GaLore's refresh gap by model (its scripts: 200, and 500 for 7B).
GAPS = {"60M": 200, "130M": 200, "1B": 200, "7B": 500}


def projected_shapes(model: str) -> tuple[int, collections.Counter]:
  """Q-GaLore's rank and how many matrices of each ``(plan, shape)`` the model projects."""
  config = llama_shapes.CONFIGS[model]
  rank = llama_shapes.galore_rank(config)
  partition = qadam_mini_jax.BlockPartition(num_heads=config.num_heads,
                                            num_kv_heads=config.num_kv_heads)
  counts = collections.Counter()
  for path, x in jax.tree_util.tree_flatten_with_path(llama_shapes.param_shapes(model))[0]:
    plan = projection.plan_for(partition_lib.path_str(path), tuple(x.shape), partition, rank)
    if plan is not None:
      counts[(plan, tuple(x.shape))] += 1
  return rank, counts


def seconds(plan: projection.ProjectionPlan, shape: tuple[int, ...], iters: int) -> float:
  """Median time of one refresh's SVD of a ``shape`` gradient."""
  g = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  fn = jax.jit(lambda g: projection.singular_vectors(plan, projection.as_matrices(plan, g)))
  jax.block_until_ready(fn(g))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(g))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", nargs="+", default=["60M", "1B", "7B"], choices=list(GAPS))
  parser.add_argument("--iters", type=int, default=3)
  args = parser.parse_args()
  machine = f"{jax.devices()[0].device_kind} ({compile_time.cpu_name()}, {os.cpu_count()} cores)"
  lines = [f"Produced by `{' '.join(['python benchmarks/svd_cost.py', *sys.argv[1:]])}` on "
           f"{machine}; jax {jax.__version__}. Median of {args.iters} after a warm-up.", "",
           "| model | rank | matrix (in, out) | projected side | matrices | s per SVD | "
           "s per model refresh | s per step over the gap |", "|---|---:|---|---|---:|---:|---:|---:|"]
  for model in args.model:
    rank, counts = projected_shapes(model)
    timed = {key: seconds(*key, args.iters) for key in counts}
    total = sum(timed[key] * n for key, n in counts.items())
    for i, ((plan, shape), n) in enumerate(counts.items()):
      side = f"in ({shape[0]})" if plan.rows else f"out ({shape[-1]})"
      lines.append(f"| {model} | {rank} | {shape} | {side} | {n} | {timed[(plan, shape)]:.3f} | "
                   + (f"{total:.1f} | {total / GAPS[model]:.3f} |" if i == 0 else " | |"))
      print(lines[-1], flush=True)
  lines += ["", "The SVD is LAPACK's on this CPU (float32, all singular vectors of the "
            "smaller side, then the first `rank`); a GPU runs cuSOLVER. A model refresh "
            "happens at step 0 for every layer; later each layer refreshes at the "
            "multiples of its own gap, which Q-GaLore's lazy refresh lengthens."]
  results_file.write(f"svd_cost_{jax.default_backend()}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
