"""What one GaLore projector refresh costs: the SVD of each matrix shape of a LLaMA.

    python benchmarks/svd_cost.py                    # 60M, 1B, 7B shapes on this machine
    python benchmarks/svd_cost.py --model 60M --iters 3

For each distinct matrix shape that ``galore``/``q_galore`` project in the
example LLaMA (attention and MLP kernels, Flax ``(in, out)``), times
``projection.singular_vectors`` (a float32 SVD of the gradient and the first
``rank`` singular vectors on the projected side, signs fixed), jitted, median
of ``--iters`` runs after a warm-up, at Q-GaLore's rank for the model
(``llama_shapes.galore_rank``), and the randomized range finder
(``projection.RandomizedRange``) beside it, with the share of the SVD's
projected energy it captures. The table also gives the cost of refreshing
every projected matrix of the model once (what a step at a multiple of the gap
pays when every layer refreshes together, as at step 0) and that cost spread
over Q-GaLore's gap for the model (200 below 7B, 500 at 7B). Results go to
``benchmarks/results/svd_cost_<backend>.md``.
"""

from __future__ import annotations

import argparse
import collections
import math
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


#: The randomized range finder measured beside the full SVD.
FINDER = projection.RandomizedRange()


def gradients(shape: tuple[int, ...]) -> dict[str, jax.Array]:
  """Test matrices: Gaussian (a flat spectrum: the range finder's hardest case) and
  ``X diag(1/(1+i)) Y^T`` with ``X``, ``Y`` Gaussian (a decaying one, as
  trained gradients have)."""
  keys = jax.random.split(jax.random.key(0), 3)
  flat = jax.random.normal(keys[0], shape, jnp.float32)
  m, n = shape[0], math.prod(shape[1:])
  k = min(m, n)
  x = jax.random.normal(keys[1], (m, k)) / jnp.arange(1, k + 1, dtype=jnp.float32)
  return {"flat": flat, "decaying": (x @ jax.random.normal(keys[2], (k, n))).reshape(shape)}


def timed(fn, g, iters: int) -> tuple[float, jax.Array]:
  """Median seconds of ``fn(g)`` after a warm-up, and its result."""
  out = jax.block_until_ready(fn(g))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(g))
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def measure(plan: projection.ProjectionPlan, shape: tuple[int, ...], iters: int) -> dict:
  """Seconds of the full SVD and of :data:`FINDER` on a ``shape`` gradient, and
  the share of the exact projection's energy ``||P^T G||^2`` that the
  finder's ``P`` captures on each of :func:`gradients`."""
  seeds = (jnp.uint32(1), jnp.uint32(2))
  out = {}
  for name, g in gradients(shape).items():
    for finder in (None, FINDER):
      p = plan._replace(finder=finder)
      fn = jax.jit(lambda g, p=p: projection.singular_vectors(
          p, projection.as_matrices(p, g), seeds))
      seconds, vectors = timed(fn, g, iters if name == "flat" else 1)
      if name == "flat":
        out["randomized s" if finder else "svd s"] = seconds
      mat = projection.as_matrices(plan, g)
      mat = mat if plan.rows else mat.T
      energy = float(jnp.sum(jnp.square(vectors.T @ mat)))
      out[(name, finder is not None)] = energy
    out[name] = out[(name, True)] / out[(name, False)]
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", nargs="+", default=["60M", "1B", "7B"], choices=list(GAPS))
  parser.add_argument("--iters", type=int, default=3)
  args = parser.parse_args()
  machine = f"{jax.devices()[0].device_kind} ({compile_time.cpu_name()}, {os.cpu_count()} cores)"
  lines = [f"Produced by `{' '.join(['python benchmarks/svd_cost.py', *sys.argv[1:]])}` on "
           f"{machine}; jax {jax.__version__}. Median of {args.iters} after a warm-up.", "",
           "| model | rank | matrix (in, out) | projected side | matrices | s per SVD | "
           "s randomized | energy captured, flat / decaying spectrum | s per model refresh, "
           "SVD / randomized | s per step over the gap, SVD / randomized |",
           "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
  for model in args.model:
    rank, counts = projected_shapes(model)
    results = {key: measure(*key, args.iters) for key in counts}
    total = {kind: sum(results[key][kind] * n for key, n in counts.items())
             for kind in ("svd s", "randomized s")}
    for i, ((plan, shape), n) in enumerate(counts.items()):
      r = results[(plan, shape)]
      side = f"in ({shape[0]})" if plan.rows else f"out ({shape[-1]})"
      lines.append(
          f"| {model} | {rank} | {shape} | {side} | {n} | {r['svd s']:.3f} | "
          f"{r['randomized s']:.3f} | {r['flat']:.4f} / {r['decaying']:.4f} | " + (
              f"{total['svd s']:.1f} / {total['randomized s']:.1f} | "
              f"{total['svd s'] / GAPS[model]:.3f} / {total['randomized s'] / GAPS[model]:.3f} |"
              if i == 0 else " | |"))
      print(lines[-1], flush=True)
  lines += ["", "The SVD is LAPACK's on this CPU (float32, all singular vectors of the "
            "smaller side, then the first `rank`); a GPU runs cuSOLVER. A model refresh "
            "happens at step 0 for every layer; later each layer refreshes at the "
            "multiples of its own gap, which Q-GaLore's lazy refresh lengthens.", "",
            f"Randomized: `projection.RandomizedRange(oversample={FINDER.oversample}, "
            f"power_iterations={FINDER.power_iterations})` (Halko, Martinsson & Tropp 2011), "
            "timed on the Gaussian matrix. Energy captured: `||P^T G||_F^2` of its `P` over "
            "that of the SVD's first `rank` vectors (1 = as good; the SVD's is the most any "
            "rank-`rank` projection captures), on a Gaussian matrix (a flat spectrum, the "
            "hardest case for a sketch) and on `X diag(1/(1+i)) Y^T` with `X`, `Y` Gaussian "
            "(a decaying spectrum, as trained gradients have)."]
  results_file.write(f"svd_cost_{jax.default_backend()}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
