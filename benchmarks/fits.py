"""Peak training-step memory per optimizer, and the largest LLaMA that fits in 16 to 80 GiB.

    python benchmarks/fits.py                    # 60M, 1B, 7B, 13B
    python benchmarks/fits.py --model 60M 1B
    XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false \
        python benchmarks/fits.py --name fits_cpu_memory_scheduler

Each row builds the example LLaMA's full train step (forward, backward with
every block under ``nnx.remat``, optimizer update; state donated as in
``examples/train.py``) for abstract arguments (``jax.eval_shape``: nothing is
allocated), lowers and compiles it, and reads XLA's
``compiled.memory_analysis()``: peak = argument + output - alias + temp.
The blocks are stacked and scanned (``scan_layers``) to keep compile times
short; ``UNROLLED_CHECK`` is also compiled with them unrolled. One batch
(``BATCH``) and bf16 compute for every row. Results go to
``benchmarks/results/fits_<backend>.md`` and a ``.json`` beside it, rewritten
after each model (a run cut short keeps the sizes it finished).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import re
import shlex
import sys
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import qadam_mini_jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import compile_time  # noqa: E402  (benchmarks/, beside this script)
import llama_shapes  # noqa: E402
import results_file  # noqa: E402
import train  # noqa: E402  (examples/, added above)
from llama_model import CONFIGS, Llama, LlamaConfig, pieces  # noqa: E402

MODELS = ("60M", "1B", "7B", "13B")
UNROLLED_CHECK = "60M"  # also compiled with unrolled blocks: the scan's figures hold?
BATCH = (1, 2048)  # sequences x tokens
COMPUTE_DTYPE = jnp.bfloat16  # activations and matmuls; parameters keep their own dtype
BUDGETS_GIB = (16, 24, 40, 80)
LEARNING_RATE = 1e-3

#: ``row(config, batch) -> (init, train_step, tokens)``: ``init() -> state`` (any
#: structure; ``jax.eval_shape`` of it allocates nothing), ``tokens`` abstract,
#: ``train_step(state, tokens) -> (state, metrics)`` jitted and donating ``state``.
Row = Callable[[LlamaConfig, tuple[int, int]], tuple[Any, Any, jax.ShapeDtypeStruct]]


def partition(c: LlamaConfig) -> qadam_mini_jax.BlockPartition:
  return qadam_mini_jax.BlockPartition(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                                       layers={"layers": 0} if c.scan_layers else None)


def optax_row(make_tx: Callable[[LlamaConfig], Any], param_dtype=jnp.float32,
              int8_weights: bool = False, in_backward: bool = False,
              clip_global_norm: float | None = None) -> Row:
  """The row of ``examples/train.py``'s train step with ``make_tx(config)``,
  parameters stored in ``param_dtype``; with ``int8_weights`` the weight
  matrices are INT8 (``quantize_params``) and ``make_tx`` gives a
  ``FusedOptimizer`` (``fused_q_adam_mini``, ``fused_q_galore``), whose step
  writes them (``--weight-quant``). With
  ``in_backward`` each layer is updated inside the backward pass
  (``--update-in-backward``, ``qadam_mini_jax.in_backward``; stacked blocks only,
  clipped by ``clip_global_norm`` if given): ``make_tx`` gives an optimizer
  ``in_backward.train_step`` takes, whose state sits where the example's
  clipping chain keeps it."""
  def build(config, batch):
    if in_backward and not config.scan_layers:
      raise ValueError("updates inside the backward pass need stacked (scanned) blocks.")
    tx = make_tx(config)
    create = lambda: Llama(config, nnx.Rngs(0), dtype=COMPUTE_DTYPE)
    model = nnx.eval_shape(create)
    graphdef, _ = nnx.split(model, nnx.Param)

    def init():
      params = nnx.to_pure_dict(nnx.state(create(), nnx.Param))
      params = jax.tree.map(lambda p: p.astype(param_dtype), params)
      if int8_weights:
        params = qadam_mini_jax.quantize_params(params, partition(config))
      state = tx.init(params)
      return {"params": params, "opt_state": (optax.EmptyState(), state) if in_backward else state}

    if in_backward:
      step = qadam_mini_jax.in_backward.train_step(*pieces(model), tx,
                                                   clip_global_norm=clip_global_norm)
      train_step, _ = train.make_step_fns(graphdef, None, in_backward_step=step)
    else:
      train_step, _ = train.make_step_fns(graphdef, tx,
                                          fused_step=tx.step if int8_weights else None)
    return init, train_step, jax.ShapeDtypeStruct(batch, jnp.int32)
  return build


def in_backward_row(make_tx: Callable[[LlamaConfig], Any], int8_weights: bool = False) -> Row:
  """:func:`optax_row` with each layer updated inside the backward pass, unclipped
  as the other rows."""
  return optax_row(make_tx, int8_weights=int8_weights, in_backward=True)


IN_BACKWARD = ", in backward"  # the suffix of the rows of in_backward_row
CHUNKED = ", attention in chunks"  # the suffix of the rows of chunked_attention_row
ATTENTION_CHUNK = 512  # queries per chunk in those rows


def chunked_attention_row(row: Row) -> Row:
  """``row`` on the model that computes attention ``ATTENTION_CHUNK`` queries at a
  time (``LlamaConfig.attention_chunk``, ``examples/train.py --attention-chunk``)."""
  return lambda config, batch: row(
      dataclasses.replace(config, attention_chunk=ATTENTION_CHUNK), batch)

#: The table's rows, name -> :data:`Row`: adding a row is adding an entry here.
#: An optimizer in the example's train step is ``optax_row(make_tx)``; a row
#: with its own parameter storage and train step is any function of the config
#: and batch that builds them (bytes per parameter always count the config's
#: parameters, whatever the state holds).
ROWS: dict[str, Row] = {
    "optax.adamw": optax_row(lambda c: optax.adamw(LEARNING_RATE)),
    "optax.adamw, bf16 params": optax_row(lambda c: optax.adamw(LEARNING_RATE), jnp.bfloat16),
    "adam_mini": optax_row(
        lambda c: qadam_mini_jax.adam_mini(LEARNING_RATE, partition=partition(c))),
    "q_adam_mini": optax_row(
        lambda c: qadam_mini_jax.q_adam_mini(LEARNING_RATE, partition=partition(c))),
    "q_adam_mini + INT8 weights": optax_row(
        lambda c: qadam_mini_jax.fused_q_adam_mini(LEARNING_RATE, partition=partition(c)),
        int8_weights=True),
    "q_galore": optax_row(lambda c: qadam_mini_jax.q_galore(
        LEARNING_RATE, rank=llama_shapes.galore_rank(c), partition=partition(c))),
    "q_galore + INT8 weights": optax_row(lambda c: qadam_mini_jax.fused_q_galore(
        LEARNING_RATE, rank=llama_shapes.galore_rank(c), partition=partition(c)),
        int8_weights=True),
    # MicroAdam's m = 10, 1% of each block of 1024.
    "micro_adam": optax_row(
        lambda c: qadam_mini_jax.micro_adam(LEARNING_RATE, partition=partition(c))),
    "optax.adamw" + IN_BACKWARD: in_backward_row(
        lambda c: qadam_mini_jax.in_backward.per_leaf(optax.adamw(LEARNING_RATE))),
    "adam_mini" + IN_BACKWARD: in_backward_row(
        lambda c: qadam_mini_jax.adam_mini(LEARNING_RATE, partition=partition(c))),
    "q_adam_mini" + IN_BACKWARD: in_backward_row(
        lambda c: qadam_mini_jax.q_adam_mini(LEARNING_RATE, partition=partition(c))),
    "q_adam_mini + INT8 weights" + IN_BACKWARD: in_backward_row(
        lambda c: qadam_mini_jax.fused_q_adam_mini(LEARNING_RATE, partition=partition(c)),
        int8_weights=True),
    "q_galore" + IN_BACKWARD: in_backward_row(
        lambda c: qadam_mini_jax.in_backward.per_leaf(qadam_mini_jax.q_galore(
            LEARNING_RATE, rank=llama_shapes.galore_rank(c), partition=partition(c)))),
    "micro_adam" + IN_BACKWARD: in_backward_row(lambda c: qadam_mini_jax.in_backward.per_leaf(
        qadam_mini_jax.micro_adam(LEARNING_RATE, partition=partition(c)))),
    # Q-GaLore's whole recipe, its "LLaMA-7B on a 16 GB GPU" row.
    "q_galore + INT8 weights" + IN_BACKWARD: in_backward_row(
        lambda c: qadam_mini_jax.in_backward.per_leaf(qadam_mini_jax.fused_q_galore(
            LEARNING_RATE, rank=llama_shapes.galore_rank(c), partition=partition(c))),
        int8_weights=True),
}
ROWS.update({name + CHUNKED: chunked_attention_row(ROWS[name]) for name in (
    "optax.adamw", "q_adam_mini + INT8 weights" + IN_BACKWARD,
    "q_galore + INT8 weights" + IN_BACKWARD)})


def num_params(config: LlamaConfig) -> int:
  model = nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def measure(row: Row, config: LlamaConfig, batch: tuple[int, int] = BATCH) -> dict[str, Any]:
  """Parameters, XLA's memory figures (bytes), peak and compile seconds of one row."""
  init, train_step, tokens = row(config, batch)
  compiled, seconds = train.compile_step(train_step, jax.eval_shape(init), tokens)
  mem = train.memory_report(compiled)
  n = num_params(config)
  peak = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
  return {"params": n, **mem, "peak": peak, "peak_bytes_per_param": peak / n,
          "compile_s": seconds}


def configs(model: str) -> dict[str, LlamaConfig]:
  """Layout -> config of ``model`` with remat: scanned, and unrolled for ``UNROLLED_CHECK``."""
  scanned = dataclasses.replace(CONFIGS[model], scan_layers=True, remat=True)
  out = {"scanned": scanned}
  if model == UNROLLED_CHECK:
    out["unrolled"] = dataclasses.replace(scanned, scan_layers=False)
  return out


def gib(n: float) -> str:
  return f"{n / 2**30:.2f}"


def largest_fits(records: list[dict[str, Any]]) -> list[str]:
  """Per optimizer, the largest measured model whose peak fits each budget."""
  lines = ["| optimizer | " + " | ".join(f"{b} GiB" for b in BUDGETS_GIB) + " |",
           "|---" * (len(BUDGETS_GIB) + 1) + "|"]
  for name in ROWS:
    rows = sorted((r for r in records if r["optimizer"] == name and r["layers"] == "scanned"),
                  key=lambda r: r["params"])
    if not rows:  # not measured in this table
      continue
    cells = []
    for budget in BUDGETS_GIB:
      fit = [r for r in rows if r["peak"] <= budget * 2**30]
      cells.append(f"{fit[-1]['model']} ({gib(fit[-1]['peak'])})" if fit else "none")
    lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
  return lines


def int8_m_extra(records: list[dict[str, Any]]) -> list[str]:
  """``q_adam_mini``'s temp minus ``adam_mini``'s, per model (scanned)."""
  temp = {(r["model"], r["optimizer"]): r["temp"] for r in records if r["layers"] == "scanned"}
  models = [m for m in dict.fromkeys(r["model"] for r in records)
            if (m, "q_adam_mini") in temp and (m, "adam_mini") in temp]
  if not models:
    return []
  lines = ["", "## INT8 m against float m: the update's extra temporaries", "",
           "`adam_mini` updates its float32 `m` in place; `q_adam_mini` dequantizes `m`, updates "
           "it and rounds it back, one stacked layer at a time (the embedding and output layer "
           "whole), so one layer's gradient, `m` and rounding temporaries are alive beside the "
           "rest. The difference of the two steps' temp, beside one layer's float32 "
           "`m` of the largest stacked leaf (the FFN kernel, 4 x dim x ffn bytes) for scale: "
           "positive where those temporaries add to the step's peak, negative where XLA "
           "scheduled the INT8 step's peak lower. The train step computes its gradient norm "
           "before the update, which waits for it (`qadam_mini_jax.updates_wait_for`): "
           "otherwise XLA copied every stacked gradient that the update writes its direction "
           "over, and read each stack's first layer at the step's start (1B: +156 MiB instead "
           "of +54; 7B and 13B: temp 2.1 and 6.2 GiB higher). What is left at 1B (default "
           "scheduler), buffer by buffer in `benchmarks/results/peak_breakdown_cpu.md`: at both "
           "steps' peak the same activations and gradients, and beside them in `q_adam_mini` "
           "only XLA's copies of the embedding's and output layer's INT8 `m` codes (62.5 MiB "
           "each, made at the step's start: the parameter update, outside the optimizer, reads "
           "the old codes and might run after the new ones are written). One buffer of that "
           "size is what the optax interface needs: the direction and the new `m` both read the "
           "old `m` and the gradient, the direction is read after the transformation returns, "
           "and each written over one of its inputs would destroy the other's (a step that "
           "writes the parameters itself writes them first and copies none of the old codes: "
           "`fused_q_adam_mini`, updates in the backward pass). Writing those two "
           "leaves' float32 `m` once, so that the old codes are read once, before the new ones "
           "are written, took the copies off and left the same buffers live at both peaks, "
           "and the 1B temp where it was (8,074 against 8,073 MiB; `adam_mini` 8,019): the "
           "54 MiB left are how XLA packs the temp allocation around the same live buffers, "
           "the backend's. It raised the 7B and 13B temp by 0.4-0.5 GiB, so it is not kept; "
           "other ways tried raised the 1B temp too (updating those leaves in row parts through "
           "the layer loop: 8,244 MiB; copying their codes late, once the gradient exists: 8,306 "
           "MiB; writing the new codes into a buffer of their own: 8,573 MiB). "
           "Under the memory-minimizing scheduler `q_adam_mini`'s temp is 3.7 GiB below "
           "`adam_mini`'s at 1B (`fits_cpu_memory_scheduler.md`).", "",
           "| model | q_adam_mini temp - adam_mini temp (MiB) | one FFN layer's float32 m (MiB) |",
           "|---|---:|---:|"]
  for model in models:
    c = CONFIGS[model]
    extra = temp[(model, "q_adam_mini")] - temp[(model, "adam_mini")]
    lines.append(f"| {model} | {extra / 2**20:,.1f} | {4 * c.dim * c.ffn_dim / 2**20:,.1f} |")
  return lines


def in_backward_notes(records: list[dict[str, Any]]) -> list[str]:
  """The rows updated inside the backward pass against their ordinary twins."""
  peak = {(r["model"], r["optimizer"]): r["peak"] for r in records if r["layers"] == "scanned"}
  pairs = [(m, o) for (m, o) in peak if o.endswith(IN_BACKWARD)]
  if not pairs:
    return []
  lines = ["", "## Updates inside the backward pass", "",
           "Rows `, in backward`: `qadam_mini_jax.in_backward.train_step` (`examples/train.py "
           "--update-in-backward`): each layer recomputed, differentiated and updated in place "
           "in the backward pass, so one layer's gradient is alive instead of the whole tree; "
           "same arguments as the ordinary row. What is alive at such a step's peak, buffer by "
           "buffer (XLA's live ranges): `benchmarks/results/peak_breakdown_cpu.md` "
           "(`benchmarks/peak_breakdown.py`). On XLA:CPU the temp allocation exceeds the live "
           "bytes at the peak by the packing of its buffers (at 7B with INT8 weights and "
           "attention in chunks: 1.3 GiB under either scheduler), which is the backend's.", "",
           "| model | optimizer | ordinary peak GiB | in backward peak GiB | saved GiB |",
           "|---|---|---:|---:|---:|"]
  for model, optimizer in pairs:
    base = optimizer[:-len(IN_BACKWARD)]
    if (model, base) in peak:
      a, b = peak[(model, base)], peak[(model, optimizer)]
      lines.append(f"| {model} | `{base}` | {gib(a)} | {gib(b)} | {gib(a - b)} |")
  return lines


def chunked_attention_notes(records: list[dict[str, Any]]) -> list[str]:
  """The rows with attention in chunks against the same rows without."""
  peak = {(r["model"], r["optimizer"]): r["peak"] for r in records if r["layers"] == "scanned"}
  pairs = [(m, o) for (m, o) in peak if o.endswith(CHUNKED) and (m, o[:-len(CHUNKED)]) in peak]
  if not pairs:
    return []
  lines = ["", "## Attention in chunks", "",
           f"Rows `{CHUNKED}`: the same step on the model that computes attention "
           f"{ATTENTION_CHUNK} queries at a time, each chunk recomputed in the backward pass "
           "(`LlamaConfig.attention_chunk`, `examples/train.py --attention-chunk`): XLA:CPU "
           "materialises the float32 attention scores and probabilities, (heads, seq, seq) "
           f"each, {BATCH[1] // ATTENTION_CHUNK}x smaller in chunks; a GPU's fused attention "
           "kernel (cuDNN) keeps none. Same arithmetic and losses up to float rounding.", "",
           "| model | optimizer | peak GiB | with attention in chunks, peak GiB | saved GiB |",
           "|---|---|---:|---:|---:|"]
  for model, optimizer in pairs:
    base = optimizer[:-len(CHUNKED)]
    a, b = peak[(model, base)], peak[(model, optimizer)]
    lines.append(f"| {model} | `{base}` | {gib(a)} | {gib(b)} | {gib(a - b)} |")
  return lines


def report(records: list[dict[str, Any]], models: list[str]) -> str:
  device = jax.devices()[0]
  machine = (f"{getattr(device, 'device_kind', jax.default_backend())} "
             f"({compile_time.cpu_name()}, {os.cpu_count()} cores)")
  cpu_note = [] if jax.default_backend() != "cpu" else [
      "**CPU backend**: its temporaries are not a GPU's. The CPU adds some (e.g. transposed "
      "weight copies for the backward matmuls), and its default scheduler favours concurrency "
      "over memory (`XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false` "
      "schedules for memory instead, and moves temp by several bytes per parameter, not the "
      "same way for every optimizer). The argument column holds on any backend; take temp "
      "and peak from a GPU run of this script.", ""]
  lines = [
      f"Produced by `{' '.join(['python benchmarks/fits.py', *sys.argv[1:]])}` on the "
      f"{jax.default_backend().upper()} backend, {machine}; {environment()}", "",
      f"The example LLaMA's full train step (batch {BATCH[0]} x {BATCH[1]} tokens, bf16 "
      "compute, fp32 logits and loss; every block under `nnx.remat`, blocks scanned; "
      "parameters and optimizer state donated) compiled for abstract arguments, not run. "
      "XLA's `memory_analysis()`: argument (parameters, optimizer state, tokens), temp "
      "(activations, gradients, the update's intermediates); peak = argument + output - "
      "alias + temp. Parameters are fp32 except in the bf16-params row, where `optax.adamw`'s "
      "state follows them into bf16.", "",
      *cpu_note,
      "| model | parameters | optimizer | argument GiB | temp GiB | peak GiB | peak B/param "
      "| compile s |", "|---|---:|---|---:|---:|---:|---:|---:|"]
  for r in records:
    if r["layers"] == "scanned":
      lines.append(f"| {r['model']} | {r['params'] / 1e6:,.0f}M | `{r['optimizer']}` | "
                   f"{gib(r['argument'])} | {gib(r['temp'])} | {gib(r['peak'])} | "
                   f"{r['peak_bytes_per_param']:.2f} | {r['compile_s']:.1f} |")
  lines += ["", f"## Largest config that fits (of {', '.join(models)}; peak GiB)", "",
            "Peak <= budget. A GPU needs some headroom beyond XLA's peak (runtime, allocator; "
            "see JAX's notes on GPU memory allocation).", "", *largest_fits(records)]
  lines += int8_m_extra(records)
  lines += in_backward_notes(records)
  lines += chunked_attention_notes(records)
  unrolled = [r for r in records if r["layers"] == "unrolled"]
  if unrolled:
    peaks = {(r["optimizer"], r["layers"]): r for r in records if r["model"] == UNROLLED_CHECK}
    lines += ["", f"## {UNROLLED_CHECK}: blocks scanned or unrolled (both under `nnx.remat`)",
              "", "With the blocks unrolled, XLA's scheduler may run a block's recomputation "
              "early, before the backward pass needs it, and keep its activations alive: remat "
              "then saves nothing, and the unrolled temp is far above the scanned one. Scanned, "
              "each recomputation runs inside its iteration of the backward loop.",
              "", "| optimizer | scanned temp GiB | unrolled temp GiB | scanned peak GiB "
              "| unrolled peak GiB |", "|---|---:|---:|---:|---:|"]
    for r in unrolled:
      s = peaks[(r["optimizer"], "scanned")]
      lines.append(f"| `{r['optimizer']}` | {gib(s['temp'])} | {gib(r['temp'])} | "
                   f"{gib(s['peak'])} | {gib(r['peak'])} |")
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", nargs="+", default=list(MODELS), choices=CONFIGS)
  parser.add_argument("--name", default=f"fits_{jax.default_backend()}",
                      help="results file name, without .md/.json (default fits_<backend>)")
  parser.add_argument("--render", action="store_true",
                      help="rewrite <name>.md from <name>.json (a run's records), compiling nothing")
  parser.add_argument("--rows", nargs="+", choices=ROWS, metavar="ROW",
                      help="measure only these rows and merge them into <name>.json's records "
                           "(refused unless that run named the same jax, flax, optax and XLA_FLAGS)")
  args = parser.parse_args()
  name = args.name
  if args.render:  # the same records, the current report's text (its first line kept)
    records = json.loads((results_file.RESULTS / f"{name}.json").read_text())
    first = (results_file.RESULTS / f"{name}.md").read_text().splitlines()[0]
    models = list(dict.fromkeys(r["model"] for r in records))
    records.sort(key=functools.partial(record_order, models))
    text = report(records, models)
    results_file.write(f"{name}.md", "\n".join([first, *text.splitlines()[1:]]) + "\n")
    return
  records, models, first = [], args.model, None
  if args.rows:
    records, models, first = merged_records(name, args.rows, args.model)
  for model in args.model:
    for layers, config in configs(model).items():
      for optimizer, row in ROWS.items():
        if ((layers == "unrolled" and (IN_BACKWARD in optimizer or CHUNKED in optimizer))
            or (args.rows and optimizer not in args.rows)):
          continue
        records.append({"model": model, "optimizer": optimizer, "layers": layers,
                        **measure(row, config)})
        r = records[-1]
        print(f"{model} {layers} {optimizer}: peak {gib(r['peak'])} GiB "
              f"({r['peak_bytes_per_param']:.2f} B/param), compiled in {r['compile_s']:.1f} s",
              flush=True)
    records.sort(key=functools.partial(record_order, models))
    text = report(records, models)
    if first is not None:  # the table's own first line, and what this command measured again
      text = "\n".join([first + f" Rows {', '.join(f'`{r}`' for r in args.rows)} of "
                         f"{', '.join(args.model)} measured later, in the same environment, by "
                         f"`{shlex.join(['python', 'benchmarks/fits.py', *sys.argv[1:]])}`.",
                         *text.splitlines()[1:]]) + "\n"
    results_file.write(f"{name}.md", text)
    results_file.write(f"{name}.json", json.dumps(records, indent=1) + "\n")


def record_order(models: list[str], record: dict[str, Any]) -> tuple[int, int, int]:
  """Where a record goes in the table: by model, layers (scanned first), row."""
  rows = list(ROWS)
  return (models.index(record["model"]), record["layers"] != "scanned",
          rows.index(record["optimizer"]) if record["optimizer"] in rows else len(rows))


def environment() -> str:
  """What a run's first line names of the software and flags its numbers depend on."""
  flags = f", `XLA_FLAGS={os.environ['XLA_FLAGS']}`" if os.environ.get("XLA_FLAGS") else ""
  return f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}{flags}."


def merged_records(name: str, rows: list[str],
                   models: list[str]) -> tuple[list[dict], list[str], str]:
  """``<name>.json``'s records without ``rows`` of ``models`` (to be measured
  again), its models and the first line of its table (the command that made
  it, and the notes of rows measured later but for those measured again now);
  SystemExit unless its run had this environment."""
  first = (results_file.RESULTS / f"{name}.md").read_text().splitlines()[0]
  if environment() not in first:
    raise SystemExit(f"{name}.md was measured under another environment ({first!r}); "
                     f"this one is {environment()!r}: run the whole table again.")
  end = first.index(environment()) + len(environment())
  kept_notes = [note.group(0) for note in re.finditer(
      r" Rows (.*?) of (.*?) measured later, in the same environment, by `.*?`\.", first[end:])
                if not (set(re.findall(r"`([^`]*)`", note.group(1))) <= set(rows)
                        and set(note.group(2).split(", ")) <= set(models))]
  first = first[:end] + "".join(kept_notes)
  records = json.loads((results_file.RESULTS / f"{name}.json").read_text())
  kept = [r for r in records if not (r["optimizer"] in rows and r["model"] in models)]
  return kept, list(dict.fromkeys([r["model"] for r in records] + models)), first


if __name__ == "__main__":
  main()
