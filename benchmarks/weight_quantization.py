"""Which INT8 code for weights: the square-law code or a linear one, on trained weights.

Run from the repository root::

    python benchmarks/weight_quantization.py

``qadam_mini_jax.weights`` stores weight matrices in group-wise INT8 with no
float master copy and re-quantizes them after every step, ``w <- Q(w + delta)``.
This compares two codes with the same groups (``storage.layout_for``, as
``weights.quantize_params`` places them) and the same per-group absmax scale
``s`` (float32), codes ``c`` in [-127, 127]:

* square-law, the INT8 momentum's (``quantize.quantize``/``dequantize``): value
  ``s * sign(c) * (c/127)^2``;
* linear (the same with ``linear=True``, the code INT8 weights use): value
  ``s * c / 127``; rounding ``floor(127 |w| / s + r)`` with the sign applied,
  ``r = 1/2`` (round-to-nearest, RTN) or ``r ~ U[0, 1)`` (stochastic, SR).

Both with exact ``max|w|`` scales (the library's weights round them up to a
coarse grid, ``quantize.coarse_scale``, the same for either code).

Weights: the example LLaMA ``tiny`` (``examples/llama_model.py``) trained by
the example's own functions (``examples/train.py``: ``init_fn``,
``make_step_fns``; ``examples/optimizers.py``: ``optax.adamw`` with its
recipe) on its built-in corpus (the Python documentation text shipped with
CPython) for :data:`STEPS` steps; every leaf ``weights.quantize_params`` would
store in INT8 is measured (all 16 matrices: embedding, q/k/v/o, gate/up/down
of both layers, lm_head), at step 0 (initial weights) and after training.

1. Round-trip error ``||Q(w) - w|| / ||w||`` with RTN and SR.
2. Re-quantization drift over the two windows of :data:`WINDOW` training steps
   (from the initial weights and from the weights after :data:`WINDOW`
   steps): each code's INT8 trajectory starts at ``Q0 = Q_RTN(w)`` and adds
   the same updates ``delta_t``, re-quantizing after each step with SR or RTN;
   it is compared with the float trajectory ``Q0 + sum(delta)``. Updates
   (open loop: the INT8 copies do not feed back into training):
   the actual ``adamw`` updates of those steps; the same update directions
   rescaled per matrix and step to rms ``lr`` for each lr of
   :data:`SCALED_LRS`; and i.i.d. random signs times :data:`SIGN_LR` (no
   persistent direction: the hardest case for SR's noise). The uniforms of SR
   are ``qadam_mini_jax.random_bits``' weight streams, the same for both codes.
3. With ``--closed-loop`` (two more training runs): ``adamw`` training whose
   matrices are re-quantized with SR after every step (each code), against
   float training, same seed and data.

Prints a Markdown report and writes ``benchmarks/results/weight_quantization.md``
and ``.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import results_file  # noqa: E402  (found through the sys.path entries above)
import data as data_lib  # noqa: E402
import optimizers  # noqa: E402
import train as train_lib  # noqa: E402
from llama_model import CONFIGS  # noqa: E402

import qadam_mini_jax  # noqa: E402
from qadam_mini_jax import quantize as quantize_lib  # noqa: E402
from qadam_mini_jax import random_bits  # noqa: E402
from qadam_mini_jax import weights as weights_lib  # noqa: E402

COMMAND = "python benchmarks/weight_quantization.py"
MODEL = "tiny"
STEPS, WINDOW = 400, 200
CHECKS = (50, 100, 200)  # steps into a window where the drift is measured
BATCH, SEQ, SEED = 16, 128, 0
OPT = optimizers.OptimizerConfig(name="adamw", lr=3e-3, total_steps=STEPS,
                                 warmup_steps=STEPS // 10)
SCALED_LRS = (3e-4, 1e-3, 3e-3)
SIGN_LR = 1e-3
UPDATES = ("adamw", *(f"adamw dir., rms {lr:g}" for lr in SCALED_LRS),
           f"random signs x {SIGN_LR:g}")
CODES = ("square-law", "linear")
ROUNDINGS = ("SR", "RTN")
LAST_LOSSES = 20
QMAX = quantize_lib.QMAX


def roundtrip(code: str, x: jax.Array, layout: quantize_lib.GroupLayout,
              noise: jax.Array | None = None) -> jax.Array:
  """``dq(q(x))`` with ``code`` (one of :data:`CODES`)."""
  linear = code == "linear"
  return quantize_lib.dequantize(quantize_lib.quantize(x, layout, noise, linear=linear), layout,
                                 linear=linear)


def requantize(code: str, w: jax.Array, delta: jax.Array, layout: quantize_lib.GroupLayout,
               noise: jax.Array | None) -> jax.Array:
  """One step without a master copy: ``Q(w + delta)`` (``noise`` None: RTN)."""
  return roundtrip(code, w + delta, layout, noise)


# --- round-trip error ------------------------------------------------------------

def kind_of(path: str) -> str:
  """Matrix kind of a parameter path: ``layers/0/attn/q_proj/kernel`` -> ``q_proj``."""
  parts = path.split("/")
  return parts[0] if parts[0] in ("embed", "lm_head") else parts[-2]


@functools.partial(jax.jit, static_argnames="layout")
def roundtrip_stats(w, layout, s0, s1):
  """[sum w^2, err^2 per (code, rounding), sum 4|w|s, sum s^2, sum absmax/rms, nonzero groups]."""
  w = w.astype(jnp.float32)
  noise = random_bits.uniform(w.shape, s0, s1)
  errs = [jnp.sum((roundtrip(c, w, layout, n) - w) ** 2)
          for c in CODES for n in (noise, None)]
  grouped = lambda x: quantize_lib._grouped(x, layout)  # pylint: disable=protected-access
  g, real, axis = grouped(w), grouped(jnp.ones_like(w)), quantize_lib._group_axis(layout)  # pylint: disable=protected-access
  s = jnp.max(jnp.abs(g), axis=axis, keepdims=True)
  rms = jnp.sqrt(jnp.sum(g * g, axis=axis) / jnp.sum(real, axis=axis))
  crest = jnp.where(rms > 0, s.squeeze(axis) / jnp.where(rms > 0, rms, 1.0), 0.0)  # 0: all-zero group
  # Cell widths: linear s/127; square-law 2 sqrt(|w| s)/127 at |w|: RTN MSE ratio
  # (square-law / linear) = sum 4 |w| s / sum s^2 (uniform error within each cell).
  return jnp.stack([jnp.sum(w * w), *errs, jnp.sum(4 * jnp.abs(g) * s),
                    jnp.sum(real * s * s), jnp.sum(crest), jnp.sum(rms > 0).astype(jnp.float32)])


def roundtrip_table(matrices: dict, layouts: dict, step: int) -> dict:
  """{kind: stats} summed over the matrices of each kind (and "all")."""
  words = random_bits.key_words(SEED)
  out = {}
  for leaf, (path, w) in enumerate(matrices.items()):
    s0, s1 = random_bits.stream_seeds(words, step, leaf, random_bits.WEIGHTS)
    stats = np.asarray(roundtrip_stats(w, layouts[path], s0, s1), np.float64)
    for kind in (kind_of(path), "all"):
      out[kind] = out.get(kind, 0) + stats
  return out


# --- drift ----------------------------------------------------------------------

def update_deltas(actual: jax.Array, t, leaf: int) -> jax.Array:
  """The updates of :data:`UPDATES` for one matrix at step ``t``: ``(len(UPDATES), *shape)``."""
  rms = jnp.sqrt(jnp.mean(actual * actual))
  direction = jnp.where(rms > 0, actual / jnp.where(rms > 0, rms, 1.0), 0.0)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(SEED + 1), t), leaf)
  signs = jax.random.rademacher(key, actual.shape, jnp.float32)
  return jnp.stack([actual, *(lr * direction for lr in SCALED_LRS), SIGN_LR * signs])


@functools.partial(jax.jit, static_argnames=("layout", "leaf"), donate_argnums=(0, 1))
def advance(shadows, sums, actual, t, words, layout, leaf: int):
  """One step of every INT8 trajectory of one matrix.

  ``shadows``: ``(updates, codes, roundings, *shape)`` dequantized INT8 weights;
  ``sums``: ``(updates, *shape)`` sum of the updates so far.
  """
  deltas = update_deltas(actual, t, leaf)
  noise = random_bits.uniform(actual.shape, *random_bits.stream_seeds(
      words, t, leaf, random_bits.WEIGHTS))
  # r = noise (SR) or 1/2 (RTN) per element, in ROUNDINGS order.
  r = jnp.stack([noise if rounding == "SR" else jnp.full_like(noise, 0.5)
                 for rounding in ROUNDINGS])

  def per_code(code, w):  # w: (updates, roundings, *shape)
    one = lambda w, delta, r: requantize(code, w, delta, layout, r)
    return jax.vmap(jax.vmap(one, (0, None, 0)), (0, 0, None))(w, deltas, r)
  new = jnp.stack([per_code(code, shadows[:, c]) for c, code in enumerate(CODES)], axis=1)
  return new, sums + deltas


@jax.jit
def drift_stats(shadows, q0, w0, sums):
  """Per (update, code, rounding): [sum D^2, sum S^2, sum w0^2, sum (W - Q0).S,
  sum D.sign(S), sum (D.sign(S))^2, sum |S|, n] with S = sum of updates,
  D = W - (Q0 + S)."""
  s = sums[:, None, None]
  d = shadows - (q0[None, :, None] + s)
  moved = shadows - q0[None, :, None]
  along = d * jnp.sign(s)
  axes = tuple(range(3, shadows.ndim))
  full = lambda x: jnp.broadcast_to(x, shadows.shape)
  return jnp.stack([jnp.sum(d * d, axes), jnp.sum(full(s * s), axes),
                    jnp.sum(full(w0 * w0), axes), jnp.sum(moved * s, axes),
                    jnp.sum(along, axes), jnp.sum(along * along, axes),
                    jnp.sum(full(jnp.abs(s)), axes),
                    jnp.full(shadows.shape[:3], w0.size, jnp.float32)], -1)


@functools.partial(jax.jit, static_argnames="layout")
def rtn_both(w, layout):
  """``Q_RTN(w)`` with each of :data:`CODES`, stacked."""
  return jnp.stack([roundtrip(code, w, layout) for code in CODES])


class Drift:
  """INT8 trajectories of every matrix over one window."""

  def __init__(self, matrices: dict, layouts: dict):
    self.layouts = layouts
    self.w0 = {p: jnp.copy(w) for p, w in matrices.items()}  # train_step donates params
    self.q0 = {p: rtn_both(w, layouts[p]) for p, w in matrices.items()}
    n = (len(UPDATES), len(CODES), len(ROUNDINGS))
    self.shadows = {p: jnp.broadcast_to(q[None, :, None], n + q.shape[1:]) + 0.0
                    for p, q in self.q0.items()}
    self.sums = {p: jnp.zeros((len(UPDATES),) + w.shape, jnp.float32)
                 for p, w in matrices.items()}

  def step(self, actual: dict, t: int, words) -> None:
    for leaf, path in enumerate(self.shadows):
      self.shadows[path], self.sums[path] = advance(
          self.shadows[path], self.sums[path], actual[path], jnp.uint32(t), words,
          self.layouts[path], leaf)

  def stats(self) -> dict:
    """{kind: (updates, codes, roundings, 8) sums} (and "all")."""
    out = {}
    for path in self.shadows:
      st = np.asarray(drift_stats(self.shadows[path], self.q0[path], self.w0[path],
                                  self.sums[path]), np.float64)
      for kind in (kind_of(path), "all"):
        out[kind] = out.get(kind, 0) + st
    return out


# --- training --------------------------------------------------------------------

def path_str(key_path) -> str:
  return jax.tree_util.keystr(key_path, simple=True, separator="/")


def matrices(params, paths) -> dict:
  """{path: array} of the leaves of ``params`` at ``paths``."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {path_str(kp): x for kp, x in flat if path_str(kp) in paths}


def setup():
  model_cfg = CONFIGS[MODEL]
  corpus = data_lib.load_corpus(None, SEQ)
  tx = optimizers.make(OPT, model_cfg)
  graphdef, init = train_lib.init_fn(model_cfg, tx, SEED, "float32")
  train_step, eval_loss = train_lib.make_step_fns(graphdef, tx)
  state = init()
  partition = optimizers.block_partition(OPT, model_cfg)
  quantized = jax.eval_shape(lambda p: weights_lib.quantize_params(p, partition), state["params"])
  flat = jax.tree_util.tree_flatten_with_path(quantized, is_leaf=weights_lib.is_quantized)[0]
  layouts = {path_str(kp): q.layout for kp, q in flat if weights_lib.is_quantized(q)}
  return corpus, state, train_step, eval_loss, layouts


def batch(corpus, index: int):
  return jnp.asarray(data_lib.train_batch(corpus.train, index, BATCH, SEQ, SEED))


def set_matrices(params, new: dict):
  """``params`` with the leaves at the paths of ``new`` replaced."""
  return jax.tree_util.tree_map_with_path(lambda kp, x: new.get(path_str(kp), x), params)


def val_loss(eval_loss, params, corpus) -> float:
  return float(np.mean([eval_loss(params, jnp.asarray(b)) for b in
                        data_lib.val_batches(corpus.val, BATCH, SEQ, 8)]))


def open_loop(corpus, state, train_step, eval_loss, layouts):
  """Float training: round-trip stats at step 0 and window ends, drift per window."""
  words = random_bits.key_words(SEED)
  roundtrips, drifts, losses = {}, {}, []
  get = lambda params: matrices(params, layouts)
  roundtrips["w", 0] = roundtrip_table(get(state["params"]), layouts, 0)
  drift = Drift(get(state["params"]), layouts)
  for step in range(1, STEPS + 1):
    old = get(state["params"])
    old = {p: jnp.copy(m) for p, m in old.items()}  # train_step donates its state
    state, metrics = train_step(state, batch(corpus, step - 1))
    losses.append(float(metrics["loss"]))
    new = get(state["params"])
    t = (step - 1) % WINDOW + 1
    drift.step({p: new[p] - old[p] for p in layouts}, step, words)
    if t in CHECKS:
      drifts[(step - t, t)] = drift.stats()
    if t == WINDOW:
      roundtrips["w", step] = roundtrip_table(new, layouts, step)
      drift = Drift(new, layouts)
  roundtrips["m", STEPS] = roundtrip_table(get(first_moment(state["opt_state"])), layouts, STEPS)
  return roundtrips, drifts, np.asarray(losses), val_loss(eval_loss, state["params"], corpus)


def first_moment(opt_state):
  """``adamw``'s first moment ``m`` (a tree like the params)."""
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  return next(s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)).mu


@functools.partial(jax.jit, static_argnames=("code", "layout"))
def _store(w, t, leaf, words, code, layout):
  noise = random_bits.uniform(w.shape, *random_bits.stream_seeds(words, t, leaf,
                                                                  random_bits.WEIGHTS))
  return roundtrip(code, w, layout, noise)


def closed_loop(corpus, state, train_step, eval_loss, layouts, code: str):
  """``adamw`` training with the matrices re-quantized (SR) after every step."""
  words, paths = random_bits.key_words(SEED), list(layouts)
  params = state["params"]
  start = {p: rtn_both(m, layouts[p])[CODES.index(code)]
           for p, m in matrices(params, paths).items()}
  state = {"params": set_matrices(params, start),
           "opt_state": state["opt_state"]}
  losses = []
  for step in range(1, STEPS + 1):
    state, metrics = train_step(state, batch(corpus, step - 1))
    losses.append(float(metrics["loss"]))
    stored = {p: _store(m, jnp.uint32(step), leaf, words, code, layouts[p])
              for leaf, (p, m) in enumerate(matrices(state["params"], paths).items())}
    state = {"params": set_matrices(state["params"], stored), "opt_state": state["opt_state"]}
  return np.asarray(losses), val_loss(eval_loss, state["params"], corpus)


# --- report ----------------------------------------------------------------------

def markdown_table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
  align = ["---" if i < text_columns else "---:" for i in range(len(header))]
  return ["| " + " | ".join(cells) + " |" for cells in [header, align, *rows]]


TENSORS = {"w": "weights", "m": "adamw m"}
KIND_ORDER = ("embed", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
              "down_proj", "lm_head", "all")


def roundtrip_rows(roundtrips: dict) -> tuple[list[list[str]], list[dict]]:
  rows, records = [], []
  for (tensor, step), kinds in roundtrips.items():
    for kind in KIND_ORDER:
      w2, sq_sr, sq_rtn, lin_sr, lin_rtn, pred_num, pred_den, crest, groups = kinds[kind]
      rel = lambda e: float(np.sqrt(e / w2))
      rec = {"tensor": tensor, "step": step, "matrices": kind, "square_rtn": rel(sq_rtn), "linear_rtn": rel(lin_rtn),
             "square_sr": rel(sq_sr), "linear_sr": rel(lin_sr),
             "predicted_square_over_linear_rtn": float(np.sqrt(pred_num / pred_den)),
             "mean_absmax_over_rms": float(crest / groups)}
      records.append(rec)
      rows.append([TENSORS[tensor], str(step), kind, f"{rec['square_rtn']:.5f}", f"{rec['linear_rtn']:.5f}",
                   f"{rec['square_rtn'] / rec['linear_rtn']:.3f}",
                   f"{rec['predicted_square_over_linear_rtn']:.3f}",
                   f"{rec['square_sr']:.5f}", f"{rec['linear_sr']:.5f}",
                   f"{rec['mean_absmax_over_rms']:.2f}"])
  return rows, records


def drift_record(st: np.ndarray) -> dict:
  d2, s2, w2, moved_s, along, along2, abs_s, n = st
  mean_abs = abs_s / n
  bias = along / n / mean_abs
  se = np.sqrt(max(along2 / n - (along / n) ** 2, 0.0) / n) / mean_abs
  return {"drift_over_update": float(np.sqrt(d2 / s2)), "drift_over_w": float(np.sqrt(d2 / w2)),
          "update_over_w": float(np.sqrt(s2 / w2)), "realized": float(moved_s / s2),
          "bias": float(bias), "bias_se": float(se)}


def drift_rows(drifts: dict, kinds: tuple[str, ...], at: int | None = None):
  rows, records = [], []
  for (start, t), by_kind in drifts.items():
    for kind in kinds:
      st = by_kind[kind]
      for u, update in enumerate(UPDATES):
        for c, code in enumerate(CODES):
          for r, rounding in enumerate(ROUNDINGS):
            rec = {"window_start": start, "steps": t, "matrices": kind, "update": update,
                   "code": code, "rounding": rounding, **drift_record(st[u, c, r])}
            records.append(rec)
            if at is None or t == at:
              rows.append([str(start), str(t), kind, update, code, rounding,
                           f"{rec['update_over_w']:.4f}",
                           f"{rec['drift_over_update']:.4f}", f"{rec['drift_over_w']:.5f}",
                           f"{rec['realized']:.3f}",
                           f"{rec['bias']:+.4f} ± {2 * rec['bias_se']:.4f}"])
  return rows, records


def ratio_rows(drift_records: list[dict], at: int) -> list[list[str]]:
  """linear / square-law drift for each (window, update, rounding) at ``at`` steps."""
  rows = []
  index = {(r["window_start"], r["steps"], r["matrices"], r["update"], r["code"], r["rounding"]): r
           for r in drift_records}
  for (start, t, kind, update, code, rounding), rec in index.items():
    if t != at or kind != "all" or code != "square-law":
      continue
    lin = index[(start, t, kind, update, "linear", rounding)]
    per_kind = [index[(start, t, k, update, "linear", rounding)]["drift_over_w"]
                / index[(start, t, k, update, "square-law", rounding)]["drift_over_w"]
                for k in KIND_ORDER[:-1]]
    rows.append([str(start), update, rounding, f"{rec['drift_over_w']:.5f}",
                 f"{lin['drift_over_w']:.5f}", f"{lin['drift_over_w'] / rec['drift_over_w']:.3f}",
                 f"{min(per_kind):.3f} .. {max(per_kind):.3f}"])
  return rows


def conclusion(rt_records: list[dict], drift_records: list[dict]) -> list[str]:
  """The verdict and its reasons, from the pooled and per-kind linear / square-law ratios."""
  rt = {(r["tensor"], r["step"], r["matrices"]): r for r in rt_records}
  dr = {(r["window_start"], r["steps"], r["matrices"], r["update"], r["code"], r["rounding"]): r
        for r in drift_records}
  w_steps = sorted(step for tensor, step, kind in rt if tensor == "w" and kind == "all")
  windows = sorted({r["window_start"] for r in drift_records})

  def ratios(kind):
    """linear / square-law: RTN and SR round trip per step, SR drift per window and update."""
    rtn = [rt["w", s, kind]["linear_rtn"] / rt["w", s, kind]["square_rtn"] for s in w_steps]
    sr = [rt["w", s, kind]["linear_sr"] / rt["w", s, kind]["square_sr"] for s in w_steps]
    drift = [dr[w, WINDOW, kind, u, "linear", "SR"]["drift_over_update"]
             / dr[w, WINDOW, kind, u, "square-law", "SR"]["drift_over_update"]
             for w in windows for u in UPDATES]
    return rtn, sr, drift

  rtn, sr, drift = ratios("all")
  every = rtn + sr + drift
  pct = lambda r: f"{100 * (1 - r):.0f}%"
  span = lambda xs: f"{min(xs):.3f}..{max(xs):.3f}"
  if max(every) < 0.9:
    verdict = ("The data support the **linear** code for weights, clearly: its error and SR "
               "drift are more than 10% lower than the square-law code's in every pooled "
               "comparison.")
  elif max(every) < 1:
    verdict = (f"The data support the **linear** code for weights, consistently but modestly: "
               f"pooled over all matrices it is lower in all {len(every)} comparisons, by "
               f"{pct(max(every))} to {pct(min(every))}, which is under 10% in "
               f"{sum(r > 0.9 for r in every)} of them.")
  elif min(every) > 1:
    verdict = (f"The data support the **square-law** code for weights: the linear code's error "
               f"and drift are higher in all {len(every)} pooled comparisons.")
  else:
    verdict = ("The data are mixed: neither code is lower in every pooled comparison "
               f"(linear / square-law {span(every)}).")
  by_kind = {k: np.median(sum(ratios(k), [])) for k in KIND_ORDER[:-1]}
  lin_kinds = [k for k, r in by_kind.items() if r < 1]
  sq_kinds = [k for k, r in by_kind.items() if r >= 1]
  best = min(by_kind, key=by_kind.get)
  w_rows = [r for r in rt_records if r["tensor"] == "w"]
  crest = [r["mean_absmax_over_rms"] for r in w_rows if r["matrices"] != "all"]
  fit = max(abs(r["predicted_square_over_linear_rtn"] * r["linear_rtn"] / r["square_rtn"] - 1)
            for r in w_rows)
  m = {k: rt["m", STEPS, k] for k in KIND_ORDER}
  m_ratio = {k: r["square_rtn"] / r["linear_rtn"] for k, r in m.items()}
  m_square = [k for k in KIND_ORDER[:-1] if m_ratio[k] < 1]
  m_shape = lambda ks: ", ".join(f"{k} {m_ratio[k]:.2f} ({m[k]['mean_absmax_over_rms']:.2f})"
                                 for k in ks)
  sr_records = [r for r in drift_records if r["rounding"] == "SR"]
  worst_z = max(abs(r["bias"]) / r["bias_se"] for r in sr_records)
  worst_bias = max(abs(r["bias"]) for r in sr_records)
  stall = {c: dr[WINDOW, WINDOW, "all", "adamw", c, "RTN"]["realized"] for c in CODES}
  return [
      "## Conclusion",
      "",
      verdict + f" Linear / square-law, all matrices: round-trip RTN error {span(rtn)} (steps "
      f"{', '.join(map(str, w_steps))}), SR {span(sr)}; SR re-quantization drift after "
      f"{WINDOW} steps {span(drift)} ({len(UPDATES)} update kinds x {len(windows)} windows). Per "
      f"matrix kind (median of the same comparisons) linear is lower for "
      f"{', '.join(lin_kinds) or 'none'} (most for {best}, {by_kind[best]:.3f}), square-law for "
      f"{', '.join(sq_kinds) or 'none'}"
      + (f" ({', '.join(f'{k} {by_kind[k]:.3f}' for k in sq_kinds)})" if sq_kinds else "") + ".",
      "",
      "Why: with the same absmax scale s, the square-law code's cells are narrower than the "
      "linear code's (s/127) below |x| = s/4 and wider above (up to 2s/127), so it has the lower "
      "RTN error only in peaked groups, mean |x| < s/4 (the `predicted` column, within "
      f"{100 * fit:.1f}% of the measured ratio in every weight row). Weight groups are not "
      f"peaked: initial and trained, their absmax/rms is {min(crest):.2f}..{max(crest):.2f} "
      "(a Gaussian group breaks even near 3.2), so the square-law code puts its dense levels "
      "near zero where few weights are and its coarse ones where most are. For contrast, the "
      f"same run's first moment (step {STEPS}, same groups; square-law / linear RTN error, "
      f"absmax/rms): {m_ratio['all']:.2f} pooled; square-law lower for "
      f"{m_shape(m_square) or 'no kind'}; higher for "
      f"{m_shape([k for k in KIND_ORDER[:-1] if k not in m_square]) or 'no kind'}.",
      "",
      f"SR is unbiased with both codes: over all {len(sr_records)} SR measurements (per kind "
      f"and pooled, windows, updates, steps {', '.join(map(str, CHECKS))}) realized is "
      f"{min(r['realized'] for r in sr_records):.3f}..{max(r['realized'] for r in sr_records):.3f}"
      f" and |bias| at most {worst_bias:.4f} of mean |S| and {worst_z:.1f} standard errors, as "
      "many unbiased draws give. RTN loses updates with "
      f"both: on the trained weights it keeps {100 * stall['square-law']:.0f}% (square-law) "
      f"and {100 * stall['linear']:.0f}% (linear) of the actual adamw update over {WINDOW} steps.",
      "",
      f"Scope: a {MODEL} model trained {STEPS} steps, groups of 128-352 elements. Weights with "
      "outlier-heavy groups (absmax/rms well above 3.2) would favour the square-law code; "
      "`predicted` = sqrt(Σ 4|w|s / Σ s²) checks that on any checkpoint in one pass.",
      "",
  ]


def json_text(tables: dict[str, list[dict]]) -> str:
  """``{table: [record, ...]}`` as JSON, one record per line, floats to 5 significant digits."""
  def record(r):
    return json.dumps({k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in r.items()})
  return "{\n" + ",\n".join(
      f"{json.dumps(name)}: [\n" + ",\n".join(map(record, rows)) + "\n]"
      for name, rows in tables.items()) + "\n}\n"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--closed-loop", action="store_true",
                      help="also train with INT8 weights (each code, SR), 2 more runs")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  corpus, state0, train_step, eval_loss, layouts = setup()
  n_int8 = sum(int(np.prod(l.shape)) for l in layouts.values())
  n_params = sum(x.size for x in jax.tree.leaves(state0["params"]))
  copy = lambda s: jax.tree.map(jnp.copy, s)
  roundtrips, drifts, losses, val = open_loop(corpus, copy(state0), train_step, eval_loss,
                                              layouts)
  runs = {"float (adamw)": (losses, val)}
  for code in CODES if args.closed_loop else ():
    runs[f"INT8 weights, {code}, SR"] = closed_loop(corpus, copy(state0), train_step,
                                                     eval_loss, layouts, code)
  seconds = time.perf_counter() - start
  rt_rows, rt_records = roundtrip_rows(roundtrips)
  all_rows, drift_records = drift_rows(drifts, ("all",), at=WINDOW)
  _, drift_records = drift_rows(drifts, KIND_ORDER)
  run_rows = [[name, f"{l[-LAST_LOSSES:].mean():.4f}", f"{v:.4f}"] for name, (l, v) in runs.items()]
  group = qadam_mini_jax.Int8Quantization().group_size
  text = "\n".join([
      f"Produced by `{COMMAND}{' --closed-loop' if args.closed_loop else ''}` on CPU ({len(os.sched_getaffinity(0))} cores), jax "
      f"{jax.__version__}, optax {optax.__version__}, qadam_mini_jax "
      f"{qadam_mini_jax.__version__}; {seconds:.0f} s in all.",
      "",
      f"Model: LLaMA `{MODEL}` of `examples/llama_model.py` ({n_params:,} parameters, of which "
      f"{n_int8:,} in the {len(layouts)} matrices `weights.quantize_params` stores in INT8: "
      "embedding, q/k/v/o and gate/up/down of both layers, lm_head; all are measured). Data: "
      f"the example's built-in corpus (Python documentation text shipped with CPython), batch "
      f"{BATCH} x {SEQ} bytes, seed {SEED}. Training: `examples/optimizers.py` `adamw`, "
      f"clip 1.0, lr {OPT.lr:g} with {OPT.warmup_steps} warmup steps and cosine decay to "
      f"{OPT.min_lr_ratio:g} x lr over {STEPS} steps, b2 {OPT.b2}, weight decay "
      f"{OPT.weight_decay}. Groups: `storage.layout_for` with groups of {group} (kernels: "
      "down the `in` axis inside each output neuron, 128 or 256 or 352 long here; embedding: "
      "256 consecutive elements of the flattened table), absmax float32 scale per group, "
      "the same for both codes. Square-law = `quantize.quantize` (value s·sign(c)·(c/127)²), "
      "linear = value s·c/127 (`quantize(..., linear=True)`, the INT8 weights' code).",
      "",
      "## 1. Round-trip error ‖Q(w) - w‖ / ‖w‖",
      "",
      "Pooled over the matrices of each kind (both layers). predicted = sqrt(Σ 4|w|s / Σ s²), "
      "the RTN error ratio square-law / linear if the error is uniform within each cell "
      "(cell width s/127 linear, 2·sqrt(|w|s)/127 square-law): the square-law code wins "
      "where groups are peaked (mean |w| < s/4). absmax/rms: mean over groups not all zero. `adamw m`: "
      f"the same run's first moment at step {STEPS} in the same groups, for contrast (what "
      "the square-law code was chosen for).",
      "",
      *markdown_table(["tensor", "step", "matrices", "square-law RTN", "linear RTN",
                       "square / linear", "predicted", "square-law SR", "linear SR",
                       "absmax / rms"], rt_rows, 3),
      "",
      "## 2. Re-quantization drift without a master copy (open loop)",
      "",
      f"Windows of {WINDOW} steps starting at step 0 (initial weights, warmup) and at step "
      f"{WINDOW} (trained weights, lr decaying). Both codes start at Q0 = Q_RTN(w) and apply "
      "w <- Q(w + delta) each step. S = sum of the updates, D = W_T - (Q0 + S). "
      "drift / ‖S‖ = ‖D‖ / ‖S‖; drift / ‖w‖ = ‖D‖ / ‖w0‖; realized = "
      "<W_T - Q0, S> / ‖S‖² (1: the update is kept, 0: stalled; 1 - realized is the "
      "share lost); bias = mean(D·sign(S)) / mean|S| ± 2 standard errors (elements taken as "
      "independent; -1: the whole update lost). Updates: `adamw` = the training run's own "
      "updates; `adamw dir., rms x` = the same directions rescaled per matrix and step to rms x; "
      f"random signs = i.i.d. ±{SIGN_LR:g} per element and step.",
      "",
      f"### All matrices after {WINDOW} steps",
      "",
      *markdown_table(["window start", "steps", "matrices", "update", "code", "rounding",
                       "‖S‖ / ‖w‖", "drift / ‖S‖", "drift / ‖w‖", "realized",
                       "bias"], all_rows, 6),
      "",
      f"### linear / square-law drift after {WINDOW} steps",
      "",
      "All matrices pooled; last column: the range of the ratio over the 9 matrix kinds "
      "(per-kind numbers in the `.json`).",
      "",
      *markdown_table(["window start", "update", "rounding", "square-law drift / ‖w‖",
                       "linear drift / ‖w‖", "linear / square", "per kind"],
                      ratio_rows(drift_records, WINDOW), 3),
      "",
      "## 3. Training losses" + (": closed loop, training with INT8 weights (SR after "
                                 "every step)" if args.closed_loop else ""),
      "",
      ("Same initial weights (quantized RTN at step 0), data and `adamw` recipe; the matrices "
       "are replaced by Q_SR(w) after every step (the optimizer state stays float32)."
       if args.closed_loop else "The float run above (`--closed-loop` adds INT8-weight runs)."),
      "",
      *markdown_table(["weights", f"train loss (mean of last {LAST_LOSSES} steps)",
                       "validation loss"], run_rows),
      "",
      *conclusion(rt_records, drift_records),
  ])
  results_file.write("weight_quantization.md", text)
  results_file.write("weight_quantization.json", json_text({
      "roundtrip": rt_records, "drift": drift_records,
      "runs": [{"weights": k, "final_train_loss": float(l[-LAST_LOSSES:].mean()), "val_loss": v}
               for k, (l, v) in runs.items()]}))

if __name__ == "__main__":
  main()
