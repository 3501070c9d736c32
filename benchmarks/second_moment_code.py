"""Which 8-bit code keeps Adam's second moment ``v``: error of ``sqrt(v)`` over a run.

    python benchmarks/second_moment_code.py
    python benchmarks/second_moment_code.py --steps 500 --b2 0.95

Q-GaLore's inner Adam keeps ``m`` and ``v`` in 8 bits; ``q_galore`` stores
``v`` of every element of ``R`` (and of the embedding and output layer), 4
bytes per element in float32. ``v`` is non-negative, spans decades inside a
group of 256, and Adam divides by ``sqrt(v)``: an element whose ``v`` rounds
to zero gets the step ``m / eps``. Each step stores ``b2 * v + (1 - b2) g^2``
again, so a code must also keep the slow decay by ``b2`` (0.1% per step at
0.999), far below one level: round-to-nearest can leave ``v`` where it was.

This script runs that recursion for ``--steps`` steps on synthetic gradients,
every step re-quantized, beside float32 ``v``, for candidate codes built on
:mod:`qadam_mini_jax.quantize` (group-wise, one float32 scale per group of
256, 127 positive levels of an int8 code), each rounded to nearest and
stochastically: ``linear`` or ``square-law`` on ``v`` itself or on ``sqrt(v)``,
and the logarithmic code of :func:`qadam_mini_jax.quantize.quantize_log`.
Gradients: ``g = sigma * z`` with ``z`` standard normal and each element's
``sigma`` log-uniform over ``--decades`` decades (shuffled, so every group
holds the whole spread); a tenth of the elements are rare, nonzero at 2% of
the steps (10x larger when they are), as the rows of rarely seen tokens.
Reported against float32 ``v`` at the last step: the median and 99th
percentile of ``|sqrt(v_q)/sqrt(v) - 1|`` (the relative error of Adam's step
size), and the share of elements whose ``v`` became 0 where the float one is
not (step ``m / eps``). Results go to ``benchmarks/results/second_moment_code.md``.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import results_file  # noqa: E402  (benchmarks/, beside this script)

from qadam_mini_jax import quantize  # noqa: E402
from qadam_mini_jax import random_bits  # noqa: E402

GROUP = 256
#: name -> (on sqrt(v), code of quantize.quantize)
CODES = {"linear on v": (False, "linear"), "square-law on v": (False, "square"),
         "linear on sqrt(v)": (True, "linear"), "square-law on sqrt(v)": (True, "square"),
         "log on v (8 levels per octave)": (False, "log")}


def gradients(key, elements, decades):
  """``step(t) -> g``: the synthetic gradient of every element at step ``t``."""
  k_sigma, k_rare = jax.random.split(key)
  sigma = 10.0 ** (-decades * jax.random.uniform(k_sigma, (elements,)))
  rare = jax.random.uniform(k_rare, (elements,)) < 0.1

  def step(t):
    k_z, k_seen = jax.random.split(jax.random.fold_in(key, t))
    g = sigma * jax.random.normal(k_z, (elements,))
    seen = jax.random.uniform(k_seen, (elements,)) < 0.02
    return jnp.where(rare, jnp.where(seen, 10.0 * g, 0.0), g)
  return step


@functools.partial(jax.jit, static_argnames=("code", "stochastic", "steps", "elements",
                                             "decades"))
def run(code, stochastic, steps, elements, decades, b2):
  """float32 ``v`` and the quantized one after ``steps`` steps."""
  on_sqrt, kind = CODES[code]
  linear = kind == "linear"
  layout = quantize.group_layout((elements // GROUP, GROUP), GROUP)
  grad = gradients(jax.random.key(0), elements, decades)

  def store(v, t):
    x = jnp.sqrt(v) if on_sqrt else v
    noise = (random_bits.uniform(x.shape, *random_bits.stream_seeds(
        jnp.zeros(2, jnp.uint32), t, 0)) if stochastic else None)
    if kind == "log":
      return quantize.quantize_log(x, layout, noise)
    return quantize.quantize(x, layout, noise, linear=linear)

  def load(q):
    x = (quantize.dequantize_log(q, layout) if kind == "log"
         else quantize.dequantize(q, layout, linear=linear))
    return x * x if on_sqrt else x

  def one(carry, t):
    v, q = carry
    g2 = jnp.square(grad(t)).reshape(layout.shape)
    return (b2 * v + (1 - b2) * g2, store(b2 * load(q) + (1 - b2) * g2, t)), None

  zeros = jnp.zeros(layout.shape, jnp.float32)
  (v, q), _ = jax.lax.scan(one, (zeros, store(zeros, 0)), jnp.arange(steps))
  return v, load(q)


def errors(v, vq):
  ratio = np.sqrt(np.asarray(vq, np.float64)) / np.sqrt(np.asarray(v, np.float64))
  rel = np.abs(ratio - 1.0)[np.asarray(v) > 0]
  lost = np.mean((np.asarray(vq) == 0) & (np.asarray(v) > 0))
  return np.median(rel), np.percentile(rel, 99), lost


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--b2", type=float, nargs="+", default=[0.999, 0.95])
  parser.add_argument("--decades", type=float, default=3.0)
  parser.add_argument("--elements", type=int, default=1 << 16)
  args = parser.parse_args()
  lines = [f"Produced by `{' '.join(['python benchmarks/second_moment_code.py', *sys.argv[1:]])}`"
           f"; jax {jax.__version__}. {args.elements:,} elements in groups of {GROUP}, "
           f"{args.steps} steps, sigma over {args.decades:g} decades, a tenth of the elements "
           "rare (see the script's docstring).", "",
           "| b2 | code | rounding | median error of sqrt(v) | 99th percentile | v lost to 0 |",
           "|---:|---|---|---:|---:|---:|"]
  best = []
  for b2 in args.b2:
    rows = []
    for code in CODES:
      for stochastic in (False, True):
        v, vq = run(code, stochastic, args.steps, args.elements, args.decades, b2)
        rows.append((*errors(v, vq), code, "stochastic" if stochastic else "nearest"))
        median, p99, lost = rows[-1][:3]
        lines.append(f"| {b2:g} | {code} | {rows[-1][4]} | {median:.2%} | {p99:.2%} | {lost:.2%} |")
        print(lines[-1], flush=True)
    median, p99, _, code, rounding = min(rows, key=lambda r: r[1])
    best.append(f"b2 = {b2:g}: {code}, {rounding} (99th percentile {p99:.2%}, median {median:.2%})")
  lines += ["", "Smallest 99th-percentile error: " + "; ".join(best) + ". Rounded to nearest, "
            "`v` stops decaying once `b2 * v` rounds back to its own level, so at 0.999 every "
            "code but stochastic rounding keeps stale, too large values."]
  results_file.write("second_moment_code.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
