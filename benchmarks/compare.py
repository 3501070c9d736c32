"""Train several optimizers on the same data, seed and budget; plot and tabulate.

Every variant (a set of ``examples/train.py`` flags, e.g. ``--optimizer adamw``)
is trained at every learning rate of one grid with everything else equal, and
reported at its best learning rate (lowest final validation loss). From the
repository root::

    python benchmarks/compare.py                     # the committed comparison
    python benchmarks/compare.py --steps 200 --lrs 3e-3 --out /tmp/quick
    python benchmarks/compare.py --report-only       # redraw from finished runs

Flags that ``examples/train.py`` understands (``--model``, ``--dim``,
``--batch-size``, ``--data``...) apply to every run. Each finished run writes
``<out>/runs/<name>.json`` (its summary and curves) and is skipped when the
command is repeated; an interrupted run resumes from its checkpoint in
``runs/compare/<name>/``. Then ``<out>/compare.md`` (the table),
``compare.png`` (validation loss at each variant's best learning rate, and the
embedding norm) and ``compare.json`` are (re)written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import shlex
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import train as train_lib  # noqa: E402  (examples/, added above)

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "compare"
DEFAULT_VARIANTS = ("--optimizer adamw", "--optimizer adam_mini", "--optimizer q_adam_mini",
                    "--optimizer q_adam_mini --no-stochastic-rounding")
DEFAULT_LRS = (1e-3, 3e-3, 6e-3)
BASELINE = "adamw"  # the variant others are compared with
#: The model and budget of the committed comparison (flags of examples/train.py).
DEFAULT_TRAIN_FLAGS = ("--model", "tiny", "--dim", "192", "--layers", "4", "--heads", "6",
                       "--kv-heads", "2", "--ffn-dim", "512", "--steps", "1000",
                       "--batch-size", "16", "--seq-len", "128", "--eval-every", "100")


def variant_name(flags: str) -> str:
  """``"--optimizer q_adam_mini --no-stochastic-rounding"`` -> ``"q_adam_mini-no-stochastic-rounding"``."""
  words = shlex.split(flags)
  name = words[words.index("--optimizer") + 1] if "--optimizer" in words else "q_adam_mini"
  rest = [w.lstrip("-") for i, w in enumerate(words)
          if w != "--optimizer" and (i == 0 or words[i - 1] != "--optimizer")]
  return "-".join([name, *rest])


def run_one(variant: str, lr: float, train_flags: list[str], out: pathlib.Path) -> dict:
  """Train one (variant, lr) unless its result exists; return the result record."""
  name = f"{variant_name(variant)}_lr{lr:g}"
  result_path = out / "runs" / f"{name}.json"
  if result_path.exists():
    return json.loads(result_path.read_text())
  run_dir = ROOT / "runs" / "compare" / out.name / name
  argv = [*train_flags, *shlex.split(variant), "--lr", str(lr), "--out-dir", str(run_dir),
          "--no-progress", "--resume"]
  model_cfg, opt_cfg, cfg = train_lib.configs_from_args(train_lib.build_parser().parse_args(argv))
  print(f"[compare] {name}", flush=True)
  summary = train_lib.train(model_cfg, opt_cfg, dataclasses.replace(cfg, verbose=False)).summary
  curve = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  record = {"name": name, "variant": variant_name(variant), "flags": variant, "lr": lr,
            "train_flags": train_flags, "summary": summary, "curve": curve}
  result_path.parent.mkdir(parents=True, exist_ok=True)
  result_path.write_text(json.dumps(record) + "\n")
  print(f"[compare] {name}: val loss {summary['val_loss']:.4f}, "
        f"{summary['tokens_per_s']:,.0f} tokens/s", flush=True)
  return record


def _final_val(record: dict) -> float:
  loss = record["summary"]["val_loss"]
  return loss if loss is not None and math.isfinite(loss) else math.inf


def best_per_variant(records: list[dict]) -> dict[str, dict]:
  """Variant -> its record at the learning rate with the lowest final validation loss."""
  best: dict[str, dict] = {}
  for r in records:
    if r["variant"] not in best or _final_val(r) < _final_val(best[r["variant"]]):
      best[r["variant"]] = r
  return best


def table(records: list[dict], lrs: list[float]) -> str:
  """Markdown: per variant the loss at every lr, and the best run's numbers."""
  best = best_per_variant(records)
  by_key = {(r["variant"], r["lr"]): r for r in records}
  base = best.get(BASELINE)
  head = ["optimizer", *[f"val loss @ lr {lr:g}" for lr in lrs], "best lr", "final val loss",
          "perplexity", f"vs {BASELINE}", "state B/param", "state bytes", "tokens/s",
          "embedding norm"]
  rows = [head, ["---"] + ["---:"] * (len(head) - 1)]
  for variant, r in best.items():
    s = r["summary"]
    cells = [f"{_final_val(by_key[variant, lr]):.4f}" if (variant, lr) in by_key else "-"
             for lr in lrs]
    gap = (f"{100 * (_final_val(r) / _final_val(base) - 1):+.2f}%" if base else "-")
    rows.append([f"`{variant}`", *cells, f"{r['lr']:g}", f"**{_final_val(r):.4f}**",
                 f"{math.exp(_final_val(r)):.3f}", gap, f"{s['state_bytes_per_param']:.3f}",
                 f"{s['state_bytes']:,}", f"{s['tokens_per_s']:,.0f}", f"{s['embed_norm']:.2f}"])
  return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def plot(records: list[dict], path: pathlib.Path) -> None:
  """Validation loss (best lr per variant) and embedding norm against steps."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(12, 4.5))
  for variant, r in best_per_variant(records).items():
    evals = [p for p in r["curve"] if "val_loss" in p]
    label = f"{variant} (lr {r['lr']:g})"
    ax_loss.plot([p["step"] for p in evals], [p["val_loss"] for p in evals], marker=".",
                 label=label)
    ax_norm.plot([p["step"] for p in r["curve"]], [p["embed_norm"] for p in r["curve"]],
                 label=label)
  ax_loss.set(xlabel="step", ylabel="validation loss (nats/byte)",
              title="validation loss, each optimizer at its best lr")
  finals = [_final_val(r) for r in best_per_variant(records).values()]
  if finals and all(math.isfinite(f) for f in finals):
    ax_loss.set_ylim(min(finals) - 0.05, min(finals) + 1.0)
  ax_norm.set(xlabel="step", ylabel="||embedding||_F", title="embedding weight norm")
  for ax in (ax_loss, ax_norm):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def report(out: pathlib.Path, lrs: list[float]) -> None:
  """(Re)write compare.md, compare.png and compare.json from ``<out>/runs/*.json``."""
  records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
  if not records:
    sys.exit(f"no finished runs in {out / 'runs'}")
  lrs = sorted({r["lr"] for r in records} | set(lrs))
  first = records[0]
  s = first["summary"]
  header = (
      f"# Optimizer comparison\n\nCommand: `python benchmarks/compare.py`; the budget: "
      f"`{' '.join(first['train_flags'])}`: a {s['params']:,}-parameter byte-level LLaMA "
      f"({s['model']['num_layers']} layers, dim {s['model']['dim']}), trained on "
      f"{s['data']} with the same data order, seed, warmup + cosine schedule, clipping "
      "and weight decay for every optimizer. Each optimizer is run at every learning rate "
      "of the grid and reported at its best (lowest final validation loss; bold). "
      "Loss is nats per byte; perplexity is per byte.\n\n")
  (out / "compare.md").write_text(header + table(records, lrs) + "\n")
  plot(records, out / "compare.png")
  best = {v: {"lr": r["lr"], **r["summary"]} for v, r in best_per_variant(records).items()}
  (out / "compare.json").write_text(json.dumps(best, indent=1) + "\n")
  print((out / "compare.md").read_text())


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      epilog="Other flags are passed to examples/train.py for every run.")
  parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                      help="each a quoted string of examples/train.py flags")
  parser.add_argument("--lrs", nargs="+", type=float, default=list(DEFAULT_LRS))
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  parser.add_argument("--report-only", action="store_true")
  args, train_flags = parser.parse_known_args(argv)
  train_flags = [*DEFAULT_TRAIN_FLAGS, *train_flags]  # later flags win
  train_lib.build_parser().parse_args(train_flags)  # fail early on a typo
  args.out.mkdir(parents=True, exist_ok=True)
  if not args.report_only:
    for variant in args.variants:
      for lr in args.lrs:
        run_one(variant, lr, train_flags, args.out)
  report(args.out, args.lrs)


if __name__ == "__main__":
  main()
