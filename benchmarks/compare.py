"""Train several optimizers on the same data, seeds and budget; plot and tabulate.

Every variant (a set of ``examples/train.py`` flags, e.g. ``--optimizer adamw``)
is trained at every learning rate of one grid with the selection seed(s)
(``--select-seeds``, default the first seed), everything else equal; its best
learning rate (lowest final validation loss over those seeds) is then run
with the remaining seeds too, and the variant is reported there as the mean
over all seeds (at this scale one seed's noise is about 1%, as large as the
differences measured). A variant that sets its own ``--lr`` runs at that
learning rate only. From the repository root::

    python benchmarks/compare.py --out benchmarks/results/compare   # the committed comparison
    python benchmarks/compare.py --steps 200 --lrs 3e-3 --seeds 0 --out /tmp/quick
    python benchmarks/compare.py --report-only --out benchmarks/results/compare  # redraw

Flags that ``examples/train.py`` understands (``--model``, ``--dim``,
``--batch-size``, ``--data``...) apply to every run. ``--out`` defaults to a
fresh directory under ``runs/compare/``. A run is identified by a key: the hash
of everything that determines its result (every resolved setting of the
model, optimizer and training loop, the data's fingerprint, the library's
version and git commit with any uncommitted changes, and the versions of JAX,
Optax and Flax). A finished run writes ``<out>/runs/<name>_<key>.json`` (its
summary and curves); repeated into the same ``--out`` with the same key it is
reused and reported as coming from the cache, and a changed setting (e.g.
``--steps``) trains it anew. An interrupted run resumes from its checkpoint in
``<out>/train/<name>_<key>/``, which only a run of the same key uses. Then
``<out>/compare.md`` (the table), ``compare.png`` (validation loss at each
variant's best learning rate, and the embedding norm) and ``compare.json`` are
(re)written from this command's runs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import hashlib
import json
import math
import pathlib
import shlex
import statistics
import subprocess
import sys
import time

import flax
import jax
import optax

import qadam_mini_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import data as data_lib  # noqa: E402  (examples/, added above)
import run_lock  # noqa: E402
import train as train_lib  # noqa: E402

#: Where ``--out`` directories are created by default (one fresh per command).
FRESH_OUT_PARENT = ROOT / "runs" / "compare"
#: TrainConfig fields that steer a run but do not change its result.
RUN_CONTROL = ("out_dir", "resume", "resume_step", "progress", "verbose")
DEFAULT_VARIANTS = (
    "--optimizer adamw",
    "--optimizer adam_mini --partition reference",
    "--optimizer adam_mini",
    "--optimizer q_adam_mini",
    "--optimizer q_adam_mini --no-stochastic-rounding --lr 3e-3",
    "--optimizer q_adam_mini --stochastic-rounding all --lr 3e-3",
    "--optimizer adamw --mu-dtype bfloat16",
    "--optimizer adafactor",
    "--optimizer lion",
    "--optimizer galore",
    "--optimizer q_galore",
)
DEFAULT_LRS = (1e-3, 3e-3, 6e-3)
DEFAULT_SEEDS = (0, 1, 2)
CURVE_KEYS = ("step", "loss", "val_loss", "embed_norm")  # kept from metrics.jsonl
BASELINE = "adamw"  # the variant others are compared with
#: Training losses of two runs of one trajectory agree to this relative tolerance (a
#: few float32 roundings; :func:`same_trajectory`).
LOSS_RTOL = 1e-6
#: The model and budget of the committed comparison (flags of examples/train.py).
DEFAULT_TRAIN_FLAGS = ("--model", "tiny", "--layers", "4", "--steps", "1000",
                       "--batch-size", "16", "--seq-len", "128", "--eval-every", "100",
                       "--eval-batches", "32")


def variant_name(flags: str) -> str:
  """``"--optimizer q_adam_mini --no-stochastic-rounding"`` -> ``"q_adam_mini-no-stochastic-rounding"``.

  ``--lr`` and its value are left out (they are part of the run's name).
  """
  words, kept, skip = shlex.split(flags), [], False
  for i, word in enumerate(words):
    if skip or word in ("--optimizer", "--lr"):
      skip = word in ("--optimizer", "--lr")
      continue
    kept.append(word.lstrip("-"))
  name = words[words.index("--optimizer") + 1] if "--optimizer" in words else "q_adam_mini"
  return "-".join([name, *kept])


def variant_lrs(flags: str, grid: list[float]) -> list[float]:
  """The variant's own ``--lr``, else the grid."""
  words = shlex.split(flags)
  return [float(words[words.index("--lr") + 1])] if "--lr" in words else list(grid)


def git(*args: str) -> str | None:
  """``git args``'s output in this checkout; ``None`` without git or a checkout."""
  try:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return None


@functools.cache
def code_version() -> dict[str, str | None]:
  """The versions that produce a result: this library's (and its git commit,
  with a hash of uncommitted changes to it and the example), JAX's, Optax's, Flax's."""
  diff = git("diff", "HEAD", "--", "qadam_mini_jax", "examples")
  return {"qadam_mini_jax": qadam_mini_jax.__version__,
          "commit": (git("rev-parse", "HEAD") or "").strip() or None,
          "uncommitted": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
          "jax": jax.__version__, "optax": optax.__version__, "flax": flax.__version__}


def run_config(argv: list[str]) -> tuple[tuple, dict, str]:
  """``(configs, config, key)`` of ``examples/train.py argv``.

  ``configs`` are train.py's; ``config`` is everything that determines the
  result (see the module docstring) and ``key`` its hash.
  """
  configs = train_lib.configs_from_args(train_lib.build_parser().parse_args(argv))
  model_cfg, opt_cfg, cfg = configs
  corpus = data_lib.load_corpus(cfg.data, cfg.seq_len, cfg.val_fraction)
  config = {"model": dataclasses.asdict(model_cfg), "optimizer": dataclasses.asdict(opt_cfg),
            "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_CONTROL},
            "data": {"name": corpus.name, "fingerprint": corpus.fingerprint},
            "code": code_version()}
  key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
  return configs, config, key


def run_one(variant: str, lr: float, seed: int, train_flags: list[str],
            out: pathlib.Path) -> tuple[dict, bool]:
  """``(record, cached)``: the result of one (variant, lr, seed), trained unless
  ``out`` holds a result of the same configuration (then ``cached``)."""
  name = f"{variant_name(variant)}_lr{lr:g}_seed{seed}"
  argv = [*train_flags, *shlex.split(variant), "--lr", str(lr), "--seed", str(seed)]
  (model_cfg, opt_cfg, cfg), config, key = run_config(argv)
  result_path = out / "runs" / f"{name}_{key}.json"
  if result_path.exists():
    print(f"[compare] {name}: from the cache ({result_path})", flush=True)
    return json.loads(result_path.read_text()), True
  run_dir = out / "train" / f"{name}_{key}"  # only this configuration resumes here
  print(f"[compare] {name}: training in {run_dir}", flush=True)
  summary = train_lib.train(model_cfg, opt_cfg, dataclasses.replace(
      cfg, out_dir=str(run_dir), resume=True, progress=False, verbose=False)).summary
  curve = [{k: v for k, v in json.loads(line).items() if k in CURVE_KEYS}
           for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  record = {"name": name, "variant": variant_name(variant), "flags": variant, "lr": lr,
            "seed": seed, "train_flags": train_flags, "key": key, "config": config,
            "summary": summary, "curve": curve}
  result_path.parent.mkdir(parents=True, exist_ok=True)
  result_path.write_text(json.dumps(record) + "\n")
  speed = f", {summary['tokens_per_s']:,.0f} tokens/s" if summary["tokens_per_s"] else ""
  print(f"[compare] {name}: val loss {summary['val_loss']:.4f}{speed}", flush=True)
  return json.loads(result_path.read_text()), False  # as a later command reads it


@dataclasses.dataclass
class Cell:
  """The runs of one (variant, lr) over seeds."""

  variant: str
  lr: float
  runs: list[dict]

  @property
  def val_losses(self) -> list[float]:
    return [r["summary"]["val_loss"] if math.isfinite(r["summary"]["val_loss"] or math.nan)
            else math.inf for r in self.runs]

  @property
  def val_loss(self) -> float:
    return statistics.mean(self.val_losses)

  def restricted(self, seeds) -> "Cell":
    """This cell with the runs of ``seeds`` only."""
    return Cell(self.variant, self.lr, [r for r in self.runs if r["seed"] in seeds])

  def mean(self, key: str) -> float:
    """Mean of a summary number over seeds (NaN where none has it, e.g. tokens/s of a
    run that resumed its finished checkpoint)."""
    values = [r["summary"][key] for r in self.runs if r["summary"][key] is not None]
    return statistics.mean(values) if values else math.nan

  def mean_curve(self, key: str) -> tuple[list[int], list[float]]:
    """Steps where every seed logged ``key``, and the mean over seeds."""
    points = collections.defaultdict(list)
    for r in self.runs:
      for p in r["curve"]:
        if key in p:
          points[p["step"]].append(p[key])
    steps = sorted(s for s, v in points.items() if len(v) == len(self.runs))
    return steps, [statistics.mean(points[s]) for s in steps]


def cells(records: list[dict]) -> dict[tuple[str, float], Cell]:
  grouped = collections.defaultdict(list)
  for r in records:
    grouped[r["variant"], r["lr"]].append(r)
  return {k: Cell(k[0], k[1], sorted(v, key=lambda r: r["seed"])) for k, v in grouped.items()}


def best_per_variant(all_cells: dict[tuple[str, float], Cell], select_seeds) -> dict[str, Cell]:
  """Variant -> its cell (all seeds) at the lr whose ``select_seeds`` runs have the
  lowest mean final validation loss (baseline first)."""
  best: dict[str, Cell] = {}
  for cell in all_cells.values():
    chosen = cell.restricted(select_seeds)
    if chosen.runs and (cell.variant not in best or chosen.val_loss
                        < best[cell.variant].restricted(select_seeds).val_loss):
      best[cell.variant] = cell
  return dict(sorted(best.items(), key=lambda item: (item[0] != BASELINE, item[0])))


def provenance(all_cells: dict[tuple[str, float], Cell], variant: str) -> str:
  """The commit that ran ``variant``'s runs, and which of them later commits reproduced."""
  runs = [r for c in all_cells.values() if c.variant == variant for r in c.runs]
  again = [f"lr {r['lr']:g} seed {r['seed']} reproduced by {', '.join(r['reproduced_by'])}"
           for r in runs if r.get("reproduced_by")]
  return "; ".join([runs[0].get("run_by") or run_by(runs[0]), *again])


def unfinished(tried: list[float], best: float, grid: list[float]) -> bool:
  """Whether a variant's grid search is not finished: it skipped a learning rate of
  ``grid`` between the ones it tried, or its best is its lowest (highest) tried and
  ``grid`` goes lower (higher). A grid that later commands widen (a variant run at
  larger rates) leaves the others' searches finished where their best lies inside."""
  lo, hi = min(tried), max(tried)
  return (set(tried) < {lr for lr in grid if lo <= lr <= hi}
          or (best == lo and min(grid) < lo) or (best == hi and max(grid) > hi))


def table(all_cells: dict[tuple[str, float], Cell], lrs: list[float], select_seeds,
          cached: set[str]) -> str:
  """Markdown: per variant the selection seeds' loss at every lr, the best lr's numbers
  and seeds, how many of its runs came from the cache (``cached``: their names) and
  the commit that ran them (:func:`provenance`)."""
  best = best_per_variant(all_cells, select_seeds)
  base = best.get(BASELINE)
  head = ["optimizer", *[f"val loss @ lr {lr:g} (seed {', '.join(map(str, select_seeds))})"
                        for lr in lrs], "best lr", "seeds", "final val loss, mean (per seed)",
          "perplexity", f"vs {BASELINE}", "state B/param", "state bytes", "tokens/s",
          "embedding norm", "runs from cache", "code"]
  rows = [head, ["---"] + ["---:"] * (len(head) - 1)]
  for variant, c in best.items():
    losses = [f"{all_cells[variant, lr].restricted(select_seeds).val_loss:.4f}"
              if (variant, lr) in all_cells else "-" for lr in lrs]
    seeds = ", ".join(f"{v:.4f}" for v in c.val_losses)
    tried = sorted(lr for v, lr in all_cells if v == variant
                   and all_cells[v, lr].restricted(select_seeds).runs)
    short = unfinished(tried, c.lr, variant_lrs(c.runs[0]["flags"], lrs))
    gap = f"{100 * (c.val_loss / base.val_loss - 1):+.2f}%" if base and not short else "-"
    rows.append([f"`{variant}`", *losses,
                 f"{c.lr:g}" + (f" (of {', '.join(f'{lr:g}' for lr in tried)} only)" if short
                                else ""),
                 ", ".join(str(r["seed"]) for r in c.runs),
                 f"**{c.val_loss:.4f}** ({seeds})",
                 f"{math.exp(c.val_loss):.3f}", gap, f"{c.mean('state_bytes_per_param'):.3f}",
                 f"{c.runs[0]['summary']['state_bytes']:,}", f"{c.mean('tokens_per_s'):,.0f}",
                 f"{c.mean('embed_norm'):.2f}",
                 f"{sum(r['name'] in cached for r in c.runs)} of {len(c.runs)}",
                 provenance(all_cells, variant)])
  return "\n".join("| " + " | ".join(row) + " |" for row in rows)


#: The issue's quality targets: (variant, reference, largest allowed gap in %).
TARGETS = (("q_adam_mini", "adam_mini", 0.5), ("adam_mini", BASELINE, 1.0),
           ("q_adam_mini", BASELINE, 1.0))


def targets(best: dict[str, Cell]) -> str:
  """Markdown lines: each target's measured gap of mean final validation losses."""
  lines = []
  for variant, reference, allowed in TARGETS:
    if variant in best and reference in best:
      gap = 100 * (best[variant].val_loss / best[reference].val_loss - 1)
      lines.append(f"* `{variant}` vs `{reference}`: {gap:+.2f}% (target within "
                   f"{allowed:g}%: {'met' if gap <= allowed else 'not met'})")
  return ("\nTargets, on the means over seeds at each one's best learning rate:\n\n"
          + "\n".join(lines) + "\n") if lines else ""


def plot(all_cells: dict[tuple[str, float], Cell], path: pathlib.Path, select_seeds) -> None:
  """Validation loss at each variant's best lr; embedding norm at one shared lr."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  best = best_per_variant(all_cells, select_seeds)
  norm_lr = min(c.lr for c in best.values() if c.variant.startswith("q_adam_mini")) if any(
      v.startswith("q_adam_mini") for v in best) else next(iter(best.values())).lr
  fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(13, 4.8))
  for variant, c in best.items():
    ax_loss.plot(*c.mean_curve("val_loss"), marker=".", label=f"{variant} (lr {c.lr:g})")
    if (variant, norm_lr) in all_cells:
      ax_norm.plot(*all_cells[variant, norm_lr].mean_curve("embed_norm"), label=variant)
  finals = [c.val_loss for c in best.values() if math.isfinite(c.val_loss)]
  if finals:
    ax_loss.set_ylim(min(finals) - 0.05, min(finals) + 0.8)
  ax_loss.set(xlabel="step", ylabel="validation loss (nats/byte), mean over seeds",
              title="validation loss, each optimizer at its best lr")
  ax_norm.set(xlabel="step", ylabel="||embedding||_F, mean over seeds",
              title=f"embedding weight norm at lr {norm_lr:g}")
  for ax in (ax_loss, ax_norm):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def run_by(record: dict, path: pathlib.Path | None = None) -> str:
  """The commit whose code ran ``record`` (``+changes``: with uncommitted ones); for a
  record from before runs recorded it, the commit that added ``path``."""
  code = record.get("config", {}).get("code")
  if code:
    return (code["commit"] or "no git")[:7] + ("+changes" if code["uncommitted"] else "")
  added = path and (git("log", "--diff-filter=A", "--format=%h", "--", str(path)) or "").split()
  return f"not recorded (committed in {added[-1]})" if added else "not recorded"


def same_trajectory(a: dict, b: dict) -> bool:
  """Whether two runs went the same way: the same final validation loss, and at every
  logged step the same validation loss and embedding norm, bit for bit, and training
  losses within float32 rounding (``LOSS_RTOL``: the logged loss is not an input to
  the update, and a differently compiled step may round it differently)."""
  def points(record):
    return [(p["step"], p.get("val_loss"), p["embed_norm"]) for p in record["curve"]]
  return (a["summary"]["val_loss"] == b["summary"]["val_loss"] and points(a) == points(b)
          and all(math.isclose(p["loss"], q["loss"], rel_tol=LOSS_RTOL, abs_tol=0)
                  for p, q in zip(a["curve"], b["curve"])))


def finished_runs(out: pathlib.Path) -> list[dict]:
  """The records in ``<out>/runs/``, of one recipe (train flags and data), each with its
  ``run_by`` (:func:`run_by`).

  A variant's runs must come from one commit. Runs of the same name (variant, lr,
  seed) from several commits must have gone the same way (:func:`same_trajectory`):
  the first is kept and names the others in ``reproduced_by``, the evidence that a
  row of an older commit is what a newer commit computes.
  """
  by_name = collections.defaultdict(list)
  for path in sorted((out / "runs").glob("*.json")):
    record = json.loads(path.read_text())
    by_name[record["name"]].append({**record, "run_by": run_by(record, path), "path": str(path)})
  if not by_name:
    sys.exit(f"error: no finished runs in {out / 'runs'}")
  recipes = {json.dumps(r["train_flags"]) for rs in by_name.values() for r in rs}
  data = {json.dumps(r["config"]["data"], sort_keys=True)
          for rs in by_name.values() for r in rs if "config" in r}
  if len(recipes) > 1 or len(data) > 1:
    sys.exit(f"error: {out / 'runs'} holds runs of {len(recipes)} sets of train flags and "
             f"{len(data)} data sets; rerun compare.py with the flags of the one to report "
             "(its runs come from the cache).")
  records = []
  for name, (kept, *others) in by_name.items():
    for other in others:
      if not same_trajectory(kept, other):
        sys.exit(f"error: {name} by {kept['run_by']} and by {other['run_by']} differ (final "
                 f"validation loss {kept['summary']['val_loss']} and "
                 f"{other['summary']['val_loss']}): remove the one not to report "
                 f"({kept['path']}, {other['path']}).")
    records.append({**kept, "reproduced_by": [o["run_by"] for o in others]})
  commits = collections.defaultdict(set)
  for r in records:
    commits[r["variant"]].add(r["run_by"])
  mixed = {v: sorted(c) for v, c in commits.items() if len(c) > 1}
  if mixed:
    sys.exit(f"error: runs of one variant come from several commits ({mixed}): rerun it at "
             "one, or remove the older runs.")
  return records


def report(out: pathlib.Path, records: list[dict], cached: set[str], lrs: list[float],
           select_seeds: list[int]) -> None:
  """(Re)write compare.md, compare.png and compare.json from ``records``; ``cached``:
  the names of those that came from the cache."""
  all_cells = cells(records)
  lrs = sorted({r["lr"] for r in records} | set(lrs))
  s = records[0]["summary"]
  seeds = sorted({r["seed"] for r in records})
  header = (
      f"# Optimizer comparison\n\n`python benchmarks/compare.py`: a {s['params']:,}-parameter "
      f"byte-level LLaMA ({s['model']['num_layers']} layers, dim {s['model']['dim']}, "
      f"{s['model']['num_heads']} heads, {s['model']['num_kv_heads']} KV heads) trained on "
      f"{s['data']} with `{' '.join(records[0]['train_flags'])}`. Every optimizer gets the "
      f"same data order, seeds ({', '.join(map(str, seeds))}), warmup + cosine schedule, "
      "gradient clipping, betas (0.9, 0.95) and weight decay 0.1 on the same leaves. Each "
      "runs at every learning rate of the grid with seed "
      f"{', '.join(map(str, select_seeds))}; the learning rate with the lowest final "
      "validation loss there is its best, and is run with the other seeds too. The bold "
      "number is the mean over all seeds at the best learning rate (each seed's value in "
      "brackets); the gap to adamw compares those means. Loss is nats per byte; perplexity "
      "is per byte; tokens/s were measured on the 2-core CPU the runs shared (other work "
      "ran alongside some of them, so they are indicative only). `runs from cache` counts the "
      "runs reused from an earlier command (same configuration) rather than trained by this "
      "one. `seeds`: those of the bold mean (a command stopped early leaves some rows with "
      "fewer). `code` is the commit whose code ran the row (rows from different commits are "
      "compared as they are; a row from before runs recorded their commit names the commit "
      "that added its results), and any of its runs that a later commit ran again with "
      "the same trajectory: the same validation losses and embedding norms bit for bit, "
      "training losses within float32 rounding.\n\n")
  (out / "compare.md").write_text(header + table(all_cells, lrs, select_seeds, cached) + "\n"
                                  + targets(best_per_variant(all_cells, select_seeds)))
  plot(all_cells, out / "compare.png", select_seeds)
  best = {v: {"lr": c.lr, "seeds": [r["seed"] for r in c.runs], "code": provenance(all_cells, v),
              "val_loss_mean": c.val_loss, "val_losses": c.val_losses,
              **{k: c.mean(k) for k in ("state_bytes_per_param", "tokens_per_s",
                                         "embed_norm")}}
          for v, c in best_per_variant(all_cells, select_seeds).items()}
  (out / "compare.json").write_text(json.dumps(best, indent=1) + "\n")
  print((out / "compare.md").read_text())


def fresh_out() -> pathlib.Path:
  """A new, empty directory under :data:`FRESH_OUT_PARENT`."""
  FRESH_OUT_PARENT.mkdir(parents=True, exist_ok=True)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  for n in range(1000):
    out = FRESH_OUT_PARENT / (stamp if n == 0 else f"{stamp}-{n}")
    try:
      out.mkdir()
      return out
    except FileExistsError:
      continue
  raise RuntimeError(f"no fresh directory under {FRESH_OUT_PARENT}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      epilog="Other flags are passed to examples/train.py for every run.")
  parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                      help="each a quoted string of examples/train.py flags")
  parser.add_argument("--lrs", nargs="+", type=float, default=list(DEFAULT_LRS))
  parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
  parser.add_argument("--select-seeds", nargs="+", type=int, default=None,
                      help="seeds that run the whole lr grid (default: the first of --seeds)")
  parser.add_argument("--out", type=pathlib.Path,
                      help="results directory; repeated commands into one --out reuse its "
                           "runs of the same configuration (default: a fresh directory under "
                           "runs/compare/; the committed one is benchmarks/results/compare)")
  parser.add_argument("--report-only", action="store_true",
                      help="redraw the table and plot of --out's finished runs")
  args, train_flags = parser.parse_known_args(argv)
  train_flags = [*DEFAULT_TRAIN_FLAGS, *train_flags]  # later flags win
  train_lib.build_parser().parse_args(train_flags)  # a typo or bad value fails here, naming it
  select = args.select_seeds or args.seeds[:1]
  if args.report_only:
    if args.out is None:
      parser.error("--report-only needs --out (the directory of the runs to report)")
    records = finished_runs(args.out)
    report(args.out, records, {r["name"] for r in records}, args.lrs, select)
    return
  out = args.out or fresh_out()
  out.mkdir(parents=True, exist_ok=True)
  print(f"[compare] results in {out}", flush=True)
  runs: dict[str, dict] = {}  # this command's runs, by name
  cached: set[str] = set()

  def run(variant: str, lr: float, seed: int) -> None:
    try:
      record, from_cache = run_one(variant, lr, seed, train_flags, out)
    except train_lib.Stopped as stopped:
      print(f"\n[compare] stopped by {stopped}; the same command with --out {out} continues "
            "(finished runs come from the cache, this one resumes)", file=sys.stderr)
      sys.exit(128 + stopped.signum)
    except (train_lib.Diverged, run_lock.LockError) as err:
      sys.exit(f"error: {variant_name(variant)} at lr {lr:g}, seed {seed}: {err}")
    runs[record["name"]] = record
    if from_cache:
      cached.add(record["name"])

  for seed in select:
    for variant in args.variants:
      for lr in variant_lrs(variant, args.lrs):
        run(variant, lr, seed)
  best = best_per_variant(cells(list(runs.values())), select)
  for seed in [s for s in args.seeds if s not in select]:
    for variant in args.variants:
      run(variant, best[variant_name(variant)].lr, seed)
  print(f"[compare] {len(cached)} of {len(runs)} runs came from the cache"
        + (f": {', '.join(sorted(cached))}" if cached else ""), flush=True)
  report(out, list(runs.values()), cached, args.lrs, select)


if __name__ == "__main__":
  main()
