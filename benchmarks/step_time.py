"""Optimizer step time on LLaMA parameter shapes, as ratios to optax.adamw.

    python benchmarks/step_time.py                # GPU: 130M, 1B (and 7B if it fits); CPU: 130M, XLA rows
    python benchmarks/step_time.py --model 60M --iters 10

Each row times one jitted optimizer step alone: ``tx.update`` plus
``optax.apply_updates`` (or ``fused_q_adam_mini``'s ``step``, which writes the
parameters itself), parameters and state donated, warmed up, median of
``--iters`` runs with ``block_until_ready``. Bandwidth counts the bytes a
perfectly fused step must move: read parameters, gradients and state, write
parameters and state. Results go to ``benchmarks/results/step_time_<device>.md`` and a
``.json`` beside it, rewritten after each model (a run cut short keeps the sizes it finished).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import llama_shapes  # noqa: E402
import results_file  # noqa: E402

import qadam_mini_jax as qam  # noqa: E402

PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}  # HBM peak, by device-kind substring
GALORE_NOTE = (
    "galore, q_galore: Q-GaLore's rank for the model and gap 200, so the warm-up step (step 0) "
    "refreshes every projector and the timed steps refresh none: their times are the "
    "projection, the inner Adam and the back-projection; what a refresh's SVD adds, spread "
    "over the gap, is in `svd_cost_<backend>.md` (`benchmarks/svd_cost.py`).")


def optimizers(config, on_gpu: bool) -> dict:
  """Row name -> (init, step(grads, state, params) -> (params, state))."""
  part = qam.BlockPartition(num_heads=config.num_heads, num_kv_heads=config.num_kv_heads)
  kw = dict(b2=0.95, weight_decay=0.1)

  def chain(tx):
    def step(grads, state, params):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    return tx.init, step

  rows = {
      "optax.adamw": chain(optax.adamw(1e-3, **kw)),
      "optax.adamw (mu bf16)": chain(optax.adamw(1e-3, mu_dtype=jnp.bfloat16, **kw)),
      "adam_mini": chain(qam.adam_mini(1e-3, partition=part, **kw)),
      "q_adam_mini xla": chain(qam.q_adam_mini(1e-3, partition=part, implementation="xla", **kw)),
      # Q-GaLore's rank for the model; the timed steps do not refresh (GALORE_NOTE).
      "galore": chain(qam.galore(1e-3, rank=llama_shapes.galore_rank(config), partition=part,
                                 **kw)),
      "q_galore": chain(qam.q_galore(1e-3, rank=llama_shapes.galore_rank(config),
                                     partition=part, **kw)),
      # m = 10, 1% of each block of 1024; its parts: benchmarks/micro_adam_profile.py.
      "micro_adam": chain(qam.micro_adam(1e-3, **kw)),
  }
  if on_gpu:  # the kernels: Pallas's, and the @triton.jit one where jax-triton is installed
    kernels = ["pallas"] + (["triton"] if importlib.util.find_spec("jax_triton") else [])
    for kernel in kernels:
      rows[f"q_adam_mini {kernel}"] = chain(
          qam.q_adam_mini(1e-3, partition=part, implementation=kernel, **kw))
      fused = qam.fused_q_adam_mini(1e-3, partition=part, implementation=kernel, **kw)
      rows[f"fused_q_adam_mini {kernel}"] = (fused.init, fused.step)
  return rows


def median_seconds(run, grads, state, params, iters: int) -> tuple[float, Any]:
  """Median seconds of ``run(grads, state, params) -> (params, state)`` after a warm-up
  call, and the last state. ``run`` may donate ``state`` and ``params``; the caller's
  ``params`` are copied first."""
  params = jax.tree.map(jnp.copy, params)
  params, state = run(grads, state, params)  # compile and warm up
  jax.block_until_ready((params, state))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    params, state = run(grads, state, params)
    jax.block_until_ready((params, state))
    times.append(time.perf_counter() - start)
  return statistics.median(times), state


def time_step(init, step, params, iters: int) -> tuple[float, int]:
  """Median seconds of one step on random gradients (MicroAdam's top-k sees no
  ties), and the state's bytes."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  grads = treedef.unflatten([1e-3 * jax.random.normal(k, p.shape, p.dtype)
                             for k, p in zip(keys, leaves)])
  seconds, state = median_seconds(jax.jit(step, donate_argnums=(1, 2)), grads,
                                  init(params), params, iters)
  return seconds, qam.tree_nbytes(state)


def main() -> None:
  on_gpu = jax.default_backend() == "gpu"
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", nargs="+", default=["130M", "1B", "7B"] if on_gpu else ["130M"])
  parser.add_argument("--iters", type=int, default=50 if on_gpu else 5)
  args = parser.parse_args()
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform)
  peak = next((v for k, v in PEAK_GBPS.items() if k in kind), None)
  lines = [f"Produced by `python benchmarks/step_time.py {' '.join(sys.argv[1:])}`".rstrip()
           + f" on {kind} ({jax.device_count()} device, jax {jax.__version__}); "
           f"median of {args.iters} steps; fp32 params.", ""]
  records = []
  name = f"step_time_{'gpu' if on_gpu else 'cpu'}"
  for model in args.model:
    config = llama_shapes.CONFIGS[model]
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                          llama_shapes.param_shapes(model))
    param_bytes = qam.tree_nbytes(params)
    header = ["optimizer", "step ms", "speed vs adamw", "state B/param", "GB/s"]
    if peak:
      header.append("% of peak HBM")
    rows, base = [], None
    for row_name, (init, step) in optimizers(config, on_gpu).items():
      record = {"model": model, "optimizer": row_name, "device": kind, "iters": args.iters}
      try:
        seconds, state_bytes = time_step(init, step, params, args.iters)
      except jax.errors.JaxRuntimeError as e:  # out of memory at 7B: report it, go on
        print(f"{model} {row_name}: {e}", file=sys.stderr)
        error = "out of memory" if "RESOURCE_EXHAUSTED" in str(e) else "failed"
        records.append(record | {"error": error})
        rows.append([row_name, error] + [""] * (len(header) - 2))
        continue
      if row_name == "optax.adamw":
        base = seconds
      moved = 3 * param_bytes + 2 * state_bytes  # read p, g, state; write p, state
      gbps = moved / seconds / 1e9
      speed = f"{base / seconds:.2f}x" if base else "n/a (adamw failed)"
      records.append(record | {"step_ms": seconds * 1e3,
                               "speed_vs_adamw": base / seconds if base else None,
                               "state_bytes_per_param": state_bytes * 4 / param_bytes,
                               "gb_per_s": gbps})
      row = [row_name, f"{seconds * 1e3:.2f}", speed,
             f"{state_bytes * 4 / param_bytes:.3f}", f"{gbps:.0f}"]
      if peak:
        row.append(f"{100 * gbps / peak:.0f}%")
      rows.append(row)
      print(model, *row, flush=True)
    del params
    lines += [f"## LLaMA {model} shapes", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    footer = [GALORE_NOTE, ""] + ([] if on_gpu else [
        "CPU run: the Pallas rows need a GPU (interpret mode is for tests, not speed)."])
    results_file.write(f"{name}.md", "\n".join(lines + footer) + "\n")
    results_file.write(f"{name}.json", json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
  main()
