"""Whole training-step time with updates inside the backward pass, as a ratio to the ordinary step.

    python benchmarks/in_backward_time.py                  # CPU: 60M and 130M
    python benchmarks/in_backward_time.py --model 60M --iters 3 --seq 128

For each optimizer, the ordinary step of ``benchmarks/fits.py`` (forward,
backward with remat, then the update over the whole gradient tree) and its
``, in backward`` twin (``qadam_mini_jax.in_backward.train_step``: each layer
recomputed, differentiated and updated in the backward pass) are compiled for
the same model and batch, then run alternately (``--iters`` times each after
a warm-up call, parameters and state donated) so that both see the same
machine load; the table gives the median step times and their ratio. Neither
clips gradients; with ``clip_global_norm`` the in-backward step adds a
backward pass (the ``+ clip`` row, against the ordinary step with
``optax.clip_by_global_norm``). Results go to
``benchmarks/results/in_backward_time_<backend>.md`` and a ``.json`` beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import compile_time  # noqa: E402
import fits  # noqa: E402
import results_file  # noqa: E402
import qadam_mini_jax  # noqa: E402
from llama_model import CONFIGS  # noqa: E402  (examples/, on the path via fits)

OPTIMIZERS = ("q_adam_mini", "optax.adamw")
CLIP = 1.0


def clipped_rows() -> dict[str, fits.Row]:
  """``q_adam_mini`` after ``optax.clip_by_global_norm``, ordinary and in backward."""
  q_adam_mini = lambda c: qadam_mini_jax.q_adam_mini(fits.LEARNING_RATE,
                                                     partition=fits.partition(c))
  return {"q_adam_mini + clip": fits.optax_row(
              lambda c: optax.chain(optax.clip_by_global_norm(CLIP), q_adam_mini(c))),
          "q_adam_mini + clip" + fits.IN_BACKWARD: fits.optax_row(
              q_adam_mini, in_backward=True, clip_global_norm=CLIP)}


def timed_pair(rows, config, batch, iters: int) -> tuple[list[float], list[float]]:
  """Step seconds of two rows, run alternately after one warm-up call each."""
  runs = []
  for row in rows:
    init, train_step, tokens = row(config, batch)
    key = jax.random.key(0)
    tokens = jax.random.randint(key, tokens.shape, 0, config.vocab, tokens.dtype)
    state = jax.jit(init)()
    state, _ = train_step(state, tokens)  # compile and warm up
    jax.block_until_ready(state)
    runs.append([train_step, state, tokens, []])
  for _ in range(iters):
    for run in runs:
      train_step, state, tokens, times = run
      start = time.perf_counter()
      state, metrics = train_step(state, tokens)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - start)
      run[1] = state
  return runs[0][3], runs[1][3]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", nargs="+", default=["60M", "130M"], choices=CONFIGS)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (batch 1)")
  args = parser.parse_args()
  batch = (1, args.seq)
  device = jax.devices()[0]
  machine = (f"{getattr(device, 'device_kind', jax.default_backend())} "
             f"({compile_time.cpu_name()}, {os.cpu_count()} cores)")
  flags = f", `XLA_FLAGS={os.environ['XLA_FLAGS']}`" if os.environ.get("XLA_FLAGS") else ""
  lines = [f"Produced by `{' '.join(['python benchmarks/in_backward_time.py', *sys.argv[1:]])}`"
           f" on {machine}; jax {jax.__version__}{flags}.", "",
           f"Whole train step (batch {batch[0]} x {batch[1]} tokens, bf16 compute, blocks "
           "scanned with remat; parameters and state donated), the ordinary step and the one "
           "that updates each layer inside the backward pass, run alternately; median of "
           f"{args.iters} steps each after a warm-up.", "",
           "| model | optimizer | ordinary ms | in backward ms | in backward / ordinary |",
           "|---|---|---:|---:|---:|"]
  records = []
  pairs = {name: (fits.ROWS[name], fits.ROWS[name + fits.IN_BACKWARD]) for name in OPTIMIZERS}
  clipped = clipped_rows()
  pairs["q_adam_mini + clip"] = tuple(clipped.values())
  name = f"in_backward_time_{jax.default_backend()}"
  for model in args.model:
    config = dataclasses.replace(CONFIGS[model], scan_layers=True, remat=True)
    for optimizer, rows in pairs.items():
      ordinary, in_backward = timed_pair(rows, config, batch, args.iters)
      a, b = statistics.median(ordinary), statistics.median(in_backward)
      records.append({"model": model, "optimizer": optimizer, "batch": batch,
                      "ordinary_ms": [t * 1e3 for t in ordinary],
                      "in_backward_ms": [t * 1e3 for t in in_backward], "ratio": b / a})
      lines.append(f"| {model} | `{optimizer}` | {a * 1e3:,.0f} | {b * 1e3:,.0f} | "
                   f"{b / a:.3f} |")
      print(lines[-1], flush=True)
    results_file.write(f"{name}.md", "\n".join(lines) + "\n")
    results_file.write(f"{name}.json", json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
  main()
