"""MicroAdam's step by part, per top-k block size, on LLaMA shapes (CPU: 130M).

    python benchmarks/micro_adam_profile.py
    python benchmarks/micro_adam_profile.py --model 60M --blocks 512 1024 --iters 3

For each block size: the state's bytes per parameter, the whole direction
(``scale_by_micro_adam``'s update, jitted) and its parts,
each jitted alone over every leaf of the model (flattened), on random
gradients after ``--window`` warm-up steps (a full ring):

* feedback: ``a = g + Q^-1(e)`` (4-bit error feedback loaded);
* select: the top-k of ``|a|`` per block (``jax.lax.top_k``);
* store: the ring's new row and ``e = Q(a)`` with the kept entries zeroed;
* moments: ``m_hat``, ``v_hat`` from the ring (scattered) and ``m_hat / (sqrt(v_hat) + eps)``.

Median of ``--iters`` timed calls. The table goes to
``benchmarks/results/micro_adam_profile_<backend>.md``.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import llama_shapes  # noqa: E402
import results_file  # noqa: E402

import qadam_mini_jax as qam  # noqa: E402
from qadam_mini_jax import int4, sparse_window  # noqa: E402

PARTS = ("feedback", "select", "store", "moments")
B1, B2, EPS = 0.9, 0.999, 1e-8


def median_ms(fn, args, iters: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def profile(params, block: int, args) -> dict[str, float]:
  """Milliseconds of the whole direction and of each part, and the state's B/param."""
  tx = qam.scale_by_micro_adam(args.window, args.density, B1, B2, EPS, block_size=block,
                               error_bucket=args.error_bucket)
  leaves = jax.tree.leaves(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))

  def grads_at(step):
    return jax.tree.unflatten(jax.tree.structure(params), [
        1e-3 * jax.random.normal(jax.random.fold_in(k, step), x.shape, jnp.float32)
        for k, x in zip(keys, leaves)])

  update = jax.jit(tx.update, donate_argnums=(1,))
  state = tx.init(params)
  for step in range(args.window):  # fill the ring
    _, state = update(grads_at(step), state)
  grads = grads_at(args.window)
  out = {"state B/param": qam.tree_nbytes(state) / sum(x.size for x in leaves)}
  out["whole"] = median_ms(jax.jit(tx.update), (grads, state), args.iters)
  feedback = int4.MinMaxInt4Storage(args.error_bucket)
  layouts = [sparse_window.window_layout(x.size, block, args.density) for x in leaves]
  flat_grads = [g.reshape(-1) for g in jax.tree.leaves(grads)]
  errors, indices, values = (jax.tree.leaves(getattr(state, f), is_leaf=lambda x: isinstance(
      x, int4.MinMaxInt4)) for f in ("error", "indices", "values"))
  count = jnp.asarray(args.window + 1, jnp.int32)

  @jax.jit
  def part_feedback(gs, es):
    return [g + feedback.load(e, g.size) for g, e in zip(gs, es)]

  @jax.jit
  def part_select(a_s):
    return [sparse_window.select(a, l) for a, l in zip(a_s, layouts)]

  @jax.jit
  def part_store(a_s, picks, rings, vals):
    row = (count - 1) % args.window
    return [(r.at[row].set(w.astype(jnp.int16)), v.at[row].set(a[f].astype(jnp.bfloat16)),
             feedback.store(a.at[f].set(0.0)))
            for a, (w, f), r, v in zip(a_s, picks, rings, vals)]

  @jax.jit
  def part_moments(rings, vals):
    out = []
    for r, v, l in zip(rings, vals, layouts):
      m_hat, v_hat = sparse_window.moments(r, v, count, B1, B2, l)
      out.append(m_hat / (jnp.sqrt(v_hat) + EPS))
    return out

  a_s = part_feedback(flat_grads, errors)
  picks = part_select(a_s)
  out["feedback"] = median_ms(part_feedback, (flat_grads, errors), args.iters)
  out["select"] = median_ms(part_select, (a_s,), args.iters)
  out["store"] = median_ms(part_store, (a_s, picks, indices, values), args.iters)
  out["moments"] = median_ms(part_moments, (indices, values), args.iters)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="130M")
  parser.add_argument("--blocks", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
  parser.add_argument("--window", type=int, default=10)
  parser.add_argument("--density", type=float, default=0.01)
  parser.add_argument("--error-bucket", type=int, default=1024)
  parser.add_argument("--iters", type=int, default=3)
  args = parser.parse_args()
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        llama_shapes.param_shapes(args.model))
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform)
  header = ["block", "k", "state B/param", "whole ms", *(f"{p} ms" for p in PARTS),
            "parts' sum ms"]
  rows = []
  for block in args.blocks:
    r = profile(params, block, args)
    k = sparse_window.kept_count(block, args.density)
    row = [str(block), str(k), f"{r['state B/param']:.3f}", f"{r['whole']:.0f}",
           *(f"{r[p]:.0f}" for p in PARTS), f"{sum(r[p] for p in PARTS):.0f}"]
    print(*row, flush=True)
    rows.append(row)
  lines = [
      f"Produced by `python benchmarks/micro_adam_profile.py {' '.join(sys.argv[1:])}`".rstrip()
      + f" on {kind} (jax {jax.__version__}); LLaMA {args.model} shapes, m = {args.window}, "
      f"density {args.density}, error buckets of {args.error_bucket}; median of {args.iters}.",
      "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
      *("| " + " | ".join(r) + " |" for r in rows), "",
      "whole: `scale_by_micro_adam`'s update (the direction; no weight decay or learning "
      "rate; the state not donated). The parts "
      "are jitted alone, so their sum also counts what the whole step fuses away.", ""]
  results_file.write(f"micro_adam_profile_{jax.default_backend()}.md", "\n".join(lines))


if __name__ == "__main__":
  main()
