"""Pretrain a byte-level LLaMA (Flax NNX) with Adam-mini, Q-Adam-mini or an optax baseline.

Runs offline on the Python documentation text that ships with CPython (or on
``--data`` files), with a progress bar (loss, tokens/s), validation loss and
perplexity, a JSON-lines metrics log, Orbax checkpoints that ``--resume``
continues bit for bit, and a report of optimizer-state bytes and of the
compiled step's memory. From the repository root::

    python examples/train.py                              # tiny model, q_adam_mini
    python examples/train.py --optimizer adamw --out-dir runs/adamw
    python examples/train.py --no-stochastic-rounding     # watch the embedding norm grow
    python examples/train.py --model 20M --data my_texts/ --steps 5000 --dtype bfloat16
    python examples/train.py --mesh data=2,fsdp=4         # sharded over 8 devices
    python examples/train.py --model 1B --scan-layers     # blocks stacked, run by nnx.scan
    python examples/train.py --weight-quant               # INT8 weights, no float master copy
    python examples/train.py --mesh data=2,fsdp=4 --coordinator-address host0:1234 \\
        --num-processes 2 --process-id 0                 # one of 2 processes (hosts)

Outputs (in ``--out-dir``): ``metrics.jsonl`` (one JSON object per logged
step), ``summary.json`` (final numbers), ``checkpoints/`` and, while the run
lasts, ``run.lock`` (one writer per directory, :mod:`run_lock`).

Bad flags stop it before anything is built, naming the flag. A non-finite
loss, gradient norm or state stops it (exit code 1) without saving anything
non-finite; ``--skip-nonfinite`` skips such updates instead
(``optax.apply_if_finite``). SIGINT and SIGTERM save the step in progress and
exit with 130 / 143 after printing the ``--resume`` command.

With ``--mesh`` (e.g. ``data=2,fsdp=4`` or ``data=2,tensor=4``) the run is
sharded over a device mesh: the batch over ``data`` and ``fsdp``, the weights
by :func:`sharding_rules.param_shardings`, the optimizer state following them
(:func:`qadam_mini_jax.state_shardings`). It computes what the unsharded run
computes, up to float summation order, and a checkpoint resumes on any mesh
or on none.

With ``--distributed`` (or ``--coordinator-address``, ``--num-processes``,
``--process-id``) the run spans several processes, one per host, each started
with the same flags (:mod:`multihost`): ``--mesh`` spans all their devices,
each process feeds the rows of the global batch its devices hold, process 0
alone logs and writes the metrics, summary and run lock, and every process
writes its shards of each checkpoint (which resumes on any number of processes).

With ``--weight-quant`` (``q_adam_mini`` or ``q_galore``) the weight matrices are
stored in INT8 (``qadam_mini_jax.weights``): the model dequantizes each where it
uses it, and ``fused_q_adam_mini`` (``fused_q_galore``: Q-GaLore's whole recipe)
adds each update and re-quantizes it with
stochastic rounding (``--stochastic-rounding none``: to nearest). The setup
printout gives weights + optimizer state + gradient bytes per parameter.

With ``--scan-layers`` the blocks are stacked on a leading layer axis and run by
``nnx.scan``: the step compiles one block instead of one per layer (the setup
printout gives the compile time), from the same initial weights, and trains to
the same losses up to float summation order. Its checkpoints resume only with
``--scan-layers``.

With ``--update-in-backward`` (and ``--scan-layers``) each layer is updated
inside the backward pass as soon as its gradient exists
(``qadam_mini_jax.in_backward``): the whole gradient is never held, the
losses are those of the ordinary step up to float rounding, and checkpoints
are interchangeable with it. Clipping by global norm stays exact at the cost
of one more backward pass; ``--grad-accum``, ``--skip-nonfinite`` and
Adafactor are refused.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import pathlib
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

import qadam_mini_jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import checkpointing  # noqa: E402  (the examples directory, added above)
import data as data_lib  # noqa: E402
import multihost  # noqa: E402
import optimizers  # noqa: E402
import run_lock  # noqa: E402
import sharding_rules  # noqa: E402
import stop_signals  # noqa: E402
from llama_model import CONFIGS, Llama, LlamaConfig, next_token_loss, pieces  # noqa: E402

DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
#: ``--mesh`` axes, in the mesh's order: the batch splits over data and fsdp,
#: weights over fsdp and tensor (sharding_rules.py).
MESH_AXES = ("data", "fsdp", "tensor")
#: ``(flag, LlamaConfig field)`` of the model overrides.
MODEL_FLAGS = (("--dim", "dim"), ("--layers", "num_layers"), ("--heads", "num_heads"),
               ("--kv-heads", "num_kv_heads"), ("--ffn-dim", "ffn_dim"),
               ("--head-dim", "head_dim"))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop's settings (the model and optimizer have their own)."""

  data: tuple[str, ...] = ()
  val_fraction: float = 0.1
  seq_len: int = 128
  batch_size: int = 16
  dtype: str = "float32"
  seed: int = 0
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 32
  out_dir: str = "runs/default"
  checkpoint_every: int = 250
  keep_checkpoints: int = 2
  resume: bool = False
  resume_step: int | None = None
  stop_at: int | None = None
  progress: bool = True  # a tqdm progress bar
  verbose: bool = True  # print the setup and final numbers
  mesh: str | None = None  # --mesh, e.g. "data=2,fsdp=4"; None: one device, unsharded
  update_in_backward: bool = False  # each layer updated inside the backward pass


@dataclasses.dataclass
class Result:
  """What :func:`train` hands back: the final state and the summary it wrote."""

  state: dict[str, Any]
  summary: dict[str, Any]


def parse_mesh(text: str) -> dict[str, int]:
  """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4, "tensor": 1}``.

  Raises ValueError naming the problem (syntax, unknown or repeated axis, size).
  """
  sizes: dict[str, int] = {}
  example = "comma-separated AXIS=SIZE items such as data=2,fsdp=4"
  for item in text.split(","):
    name, eq, size = (part.strip() for part in item.partition("="))
    if not eq or not name:
      raise ValueError(f"--mesh {text!r}: cannot read {item.strip()!r}; expected {example}.")
    if name not in MESH_AXES:
      raise ValueError(f"--mesh {text!r}: unknown mesh axis {name!r}; the axes are "
                       f"{', '.join(MESH_AXES)}.")
    if name in sizes:
      raise ValueError(f"--mesh {text!r}: axis {name!r} is given twice.")
    if not size.isdigit() or int(size) < 1:
      raise ValueError(f"--mesh {text!r}: the size of {name!r} must be a positive integer, "
                       f"not {size!r}.")
    sizes[name] = int(size)
  return {name: sizes.get(name, 1) for name in MESH_AXES}


def make_mesh(cfg: TrainConfig) -> Mesh | None:
  """The ``jax.sharding.Mesh`` of ``cfg.mesh`` (Auto axes), or None.

  Raises ValueError for a bad ``--mesh``, a device count other than the
  product of its sizes, or a batch that does not split over data * fsdp.
  """
  if cfg.mesh is None:
    return None
  sizes = parse_mesh(cfg.mesh)
  n = math.prod(sizes.values())
  if n != jax.device_count():
    raise ValueError(
        f"--mesh {cfg.mesh!r} needs {n} devices, but JAX sees {jax.device_count()} "
        f"({jax.default_backend()}); the sizes must multiply to the device count. On CPU, "
        f"simulate {n} devices with XLA_FLAGS=--xla_force_host_platform_device_count={n} "
        "(set before Python starts JAX).")
  batch_ways = sizes["data"] * sizes["fsdp"]
  if cfg.batch_size % batch_ways:
    raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by data * fsdp = "
                     f"{batch_ways} (--mesh {cfg.mesh!r}): the batch is split over both.")
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES))


@dataclasses.dataclass(frozen=True)
class MeshLayout:
  """Where a sharded run's arrays live (``--mesh``)."""

  mesh: Mesh
  state: Any  # NamedShardings like {"params": ..., "opt_state": ...}
  batch: NamedSharding  # token batches: rows over ("data", "fsdp")

  def put(self, shape: tuple[int, int], rows: Callable[[slice], np.ndarray]) -> jax.Array:
    """A token batch of ``shape`` on the mesh, from ``rows(slice)`` (those rows of the batch).

    Each process makes only the rows its own devices hold. Replicated when the
    rows do not split evenly.
    """
    rows_split = shape[0] % (self.mesh.shape["data"] * self.mesh.shape["fsdp"]) == 0
    sharding = self.batch if rows_split else NamedSharding(self.mesh, PartitionSpec())
    return jax.make_array_from_callback(shape, sharding, lambda index: rows(index[0]))


def model_factory(model_cfg: LlamaConfig, seed: int, dtype: str):
  """``create() -> Llama``, the same initialisation wherever it is called."""
  return lambda: Llama(model_cfg, nnx.Rngs(seed), dtype=DTYPES[dtype])


def optimizer_and_layout(model_cfg: LlamaConfig, opt_cfg: optimizers.OptimizerConfig,
                         cfg: TrainConfig, mesh: Mesh | None
                         ) -> tuple[optax.GradientTransformation, MeshLayout | None]:
  """The optimizer and, on a mesh, the shardings of the state and the batches.

  Raises ``qadam_mini_jax.ShardingError`` (naming the parameter) when the
  parameter shardings would cut INT8 quantization groups.
  """
  if mesh is None:
    return optimizers.make(opt_cfg, model_cfg), None
  create = model_factory(model_cfg, cfg.seed, cfg.dtype)
  params = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(create(), nnx.Param)))
  param_shardings = sharding_rules.param_shardings(params, mesh)
  try:
    tx = optimizers.make(opt_cfg, model_cfg, shardings=param_shardings)
    opt_shardings = qadam_mini_jax.state_shardings(
        jax.eval_shape(tx.init, params), params, param_shardings)
  except qadam_mini_jax.ShardingError as err:
    raise qadam_mini_jax.ShardingError(
        f"--mesh {cfg.mesh!r} does not suit {opt_cfg.name} on this model: {err} Here: fsdp "
        "splits never cut INT8 groups, tensor splits of o_proj/down_proj inputs do unless "
        "each shard holds a multiple of 256 rows; use fewer tensor ways or fsdp.") from None
  return tx, MeshLayout(mesh, {"params": param_shardings, "opt_state": opt_shardings},
                        NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))


def init_fn(model_cfg: LlamaConfig, tx: optax.GradientTransformation, seed: int,
            dtype: str, layout: MeshLayout | None = None,
            prepare: Callable[[Any], Any] = lambda params: params) -> tuple[nnx.GraphDef, Any]:
  """The model's graph definition and a jitted ``init() -> {"params", "opt_state"}``.

  The state is plain pytrees, created inside one ``jax.jit`` (one compilation
  instead of one per operation), directly in its shards on a mesh;
  ``jax.eval_shape(init)`` gives its shapes (and shardings) for free, which is
  all a restore needs. ``prepare`` turns the initial parameters into the
  stored ones (INT8 weights: ``optimizers.quantize_weights``).
  """
  create = model_factory(model_cfg, seed, dtype)
  graphdef, _ = nnx.split(nnx.eval_shape(create), nnx.Param)

  def init():
    params = prepare(nnx.to_pure_dict(nnx.state(create(), nnx.Param)))
    return {"params": params, "opt_state": tx.init(params)}

  if layout is None:
    return graphdef, jax.jit(init)
  return graphdef, jax.jit(init, out_shardings=layout.state)


def make_step_fns(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                  layout: MeshLayout | None = None, fused_step: Callable[..., Any] | None = None,
                  in_backward_step: Callable[..., Any] | None = None):
  """Jitted ``train_step(state, tokens) -> (state, metrics)`` and ``eval_loss(params, tokens)``.

  With ``fused_step`` (INT8 weights, ``optimizers.fused_step``) the gradients
  come from ``qadam_mini_jax.weights.value_and_grad`` and ``fused_step``
  writes the new parameters; with ``in_backward_step``
  (``qadam_mini_jax.in_backward.train_step``) each layer is updated inside the
  backward pass; else ``tx.update`` and ``optax.apply_updates``.
  """
  def loss_fn(params, tokens):
    return next_token_loss(nnx.merge(graphdef, params)(tokens), tokens)

  def train_step(state, tokens):
    if in_backward_step is not None:  # the state of make(): (clipping's, the optimizer's)
      clip_state, opt_state = state["opt_state"]
      (loss, grad_norm), params, opt_state = in_backward_step(state["params"], opt_state, tokens)
      return {"params": params, "opt_state": (clip_state, opt_state)}, {
          "loss": loss, "grad_norm": grad_norm}
    if fused_step is None:
      loss, grads = jax.value_and_grad(loss_fn)(state["params"], tokens)
    else:
      loss, grads = qadam_mini_jax.weights.value_and_grad(loss_fn)(state["params"], tokens)
    # Computed before the update, which waits for it: the layer-by-layer updates
    # write over the gradients, and XLA would otherwise copy each stacked gradient
    # for the norm to read later (qadam_mini_jax.updates_wait_for).
    grad_norm = optax.tree.norm(grads)
    with qadam_mini_jax.updates_wait_for(grad_norm):
      if fused_step is None:
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
      else:
        params, opt_state = fused_step(grads, state["opt_state"], state["params"])
    metrics = {"loss": loss, "grad_norm": grad_norm}
    return {"params": params, "opt_state": opt_state}, metrics

  if layout is None:
    return jax.jit(train_step, donate_argnums=0), jax.jit(loss_fn)
  replicated = NamedSharding(layout.mesh, PartitionSpec())
  step = jax.jit(train_step, donate_argnums=0, in_shardings=(layout.state, layout.batch),
                 out_shardings=(layout.state, replicated))
  return step, jax.jit(loss_fn)


def compile_step(train_step, state: Any, tokens: Any) -> tuple[Any, float]:
  """``(compiled, seconds)``: ``train_step`` lowered and compiled, not run.

  ``state`` and ``tokens`` may be arrays or ``jax.ShapeDtypeStruct``s.
  """
  start = time.perf_counter()
  compiled = train_step.lower(state, tokens).compile()
  return compiled, time.perf_counter() - start


def memory_report(compiled: Any) -> dict[str, int]:
  """Argument, output, aliased and temporary bytes of a compiled step (XLA's analysis)."""
  stats = compiled.memory_analysis()
  if stats is None:  # some backends do not report
    return {}
  return {name: int(getattr(stats, f"{name}_size_in_bytes"))
          for name in ("argument", "output", "alias", "temp", "generated_code")}


@jax.jit
def embed_norm(params) -> jax.Array:
  """The embedding's norm, logged. Its own function, not a metric of the step: read
  from the new INT8 weights in the step, XLA recomputed the embedding's update
  for it from the old codes and kept a copy of those through the step (125 MiB at 7B)."""
  embedding = qadam_mini_jax.weights.dequantize(params["embed"]["embedding"])
  return jnp.linalg.norm(embedding.astype(jnp.float32))


def evaluate(eval_loss, params, batches: list[np.ndarray]) -> float:
  """Mean next-token loss over fixed validation batches (weighted by batch size)."""
  total = sum(float(eval_loss(params, b)) * len(b) for b in batches)
  return total / sum(len(b) for b in batches)


class MetricsLog:
  """``metrics.jsonl``: one JSON object per logged step; a resume drops later lines."""

  def __init__(self, path: pathlib.Path, resume_step: int | None):
    self.path = path
    kept = []
    if resume_step is not None and path.exists():
      kept = [line for line in path.read_text().splitlines()
              if line.strip() and json.loads(line)["step"] <= resume_step]
    path.write_text("".join(line + "\n" for line in kept))

  def write(self, record: dict[str, Any]) -> None:
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "kB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
    n /= 1000
  raise AssertionError


def run_metadata(model_cfg: LlamaConfig, opt_cfg: optimizers.OptimizerConfig, cfg: TrainConfig,
                 corpus: data_lib.Corpus) -> dict[str, Any]:
  """What a checkpoint records about its run: ``model`` and ``optimizer`` must match on resume.

  The mesh is recorded but not compared: a run resumes on any mesh (or none).
  """
  return {
      # remat and attention chunks change no array: a checkpoint resumes with or without
      "model": {k: v for k, v in dataclasses.asdict(model_cfg).items()
                if k not in ("remat", "attention_chunk")},
      "mesh": cfg.mesh,
      "optimizer": {k: getattr(opt_cfg, k) for k in optimizers.STRUCTURAL_FIELDS},
      "settings": {"optimizer": dataclasses.asdict(opt_cfg),
                   "train": {k: getattr(cfg, k) for k in ("seq_len", "batch_size", "dtype", "seed")},
                   "data": {"name": corpus.name, "fingerprint": corpus.fingerprint}},
  }


def same_layer_layout(ckpts: checkpointing.Checkpoints, step: int | None,
                      model: dict[str, Any]) -> dict[str, Any]:
  """The ``model`` metadata a checkpoint must match; raises CheckpointError, naming
  ``--scan-layers``, when its layers are stacked and this run's are not, or the reverse.
  """
  step = ckpts.steps()[-1] if step is None else step
  if step not in ckpts.steps():
    return model  # restore() says which steps there are
  stored = ckpts.read_meta(step)["model"]
  if stored.get("scan_layers", False) != model["scan_layers"]:
    saved, this = ("without", "with") if model["scan_layers"] else ("with", "without")
    raise checkpointing.CheckpointError(
        f"checkpoint step {step} in {ckpts.directory} was saved by a run {saved} "
        f"--scan-layers, and this run is {this} it: the layers' arrays differ. Resume it "
        f"{saved} --scan-layers.")
  if "scan_layers" not in stored:  # saved before --scan-layers existed: unscanned
    return {k: v for k, v in model.items() if k != "scan_layers"}
  return model


def initial_state(ckpts: checkpointing.Checkpoints, init, meta: dict[str, Any], cfg: TrainConfig,
                  last_step: int, say) -> tuple[dict[str, Any], int]:
  """``(state, step)``: restored with ``--resume``/``--resume-step``, else freshly initialised.

  Raises CheckpointError, before reading any array, for a checkpoint past
  ``last_step`` (the run would report a step it never reached).
  """
  resuming = cfg.resume or cfg.resume_step is not None
  if not resuming and ckpts.steps():
    raise checkpointing.CheckpointError(
        f"{ckpts.directory} already holds checkpoints (steps {ckpts.steps()}); pass --resume "
        "to continue that run, or choose another --out-dir.")
  if not (resuming and ckpts.steps()):
    if resuming:
      say(f"no checkpoint in {ckpts.directory}: starting from scratch")
    return init(), 0
  step = cfg.resume_step or ckpts.steps()[-1]
  if step in ckpts.steps() and step > last_step:  # restore() reports a missing step
    flag = (f"--stop-at {cfg.stop_at}" if cfg.stop_at == last_step else f"--steps {last_step}")
    raise checkpointing.CheckpointError(
        f"{flag} is before step {step}, where the checkpoint to resume in {ckpts.directory} "
        f"stands (steps there: {ckpts.steps()}): give a later {flag.split()[0]}, or an "
        "earlier checkpoint with --resume-step.")
  model = same_layer_layout(ckpts, cfg.resume_step, meta["model"])
  # Restore straight into this run's shards (one device without --mesh),
  # whatever mesh, if any, the checkpoint was saved from.
  device = SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding or device),
      jax.eval_shape(init))
  state, old = ckpts.restore(target, {"model": model, "optimizer": meta["optimizer"]},
                             cfg.resume_step)
  changed = [k for k in meta["settings"] if old["settings"].get(k) != meta["settings"][k]]
  if changed and multihost.is_primary():
    print(f"note: {', '.join(changed)} settings differ from the checkpoint's; "
          "the run continues, but not on the original trajectory.", file=sys.stderr)
  mesh_note = (f", saved on mesh {old.get('mesh') or 'none'}"
               if old.get("mesh") != meta["mesh"] else "")
  say(f"resumed from step {old['step']} ({ckpts.directory}{mesh_note})")
  for path in ckpts.set_aside_after(old["step"]):
    say(f"moved the newer checkpoint {path.name} to {path.parent}")
  return state, old["step"]


class Diverged(RuntimeError):
  """A non-finite loss, gradient norm or state stopped training; nothing non-finite was saved."""


class Stopped(Exception):
  """SIGINT or SIGTERM stopped training after ``step``, which was saved to ``checkpoint``."""

  def __init__(self, signum: int, step: int, checkpoint: pathlib.Path):
    super().__init__(f"{signal.Signals(signum).name} after step {step}")
    self.signum, self.step, self.checkpoint = signum, step, checkpoint


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """Whether every float leaf of ``tree`` is free of NaN and infinity."""
  return jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
                    if jnp.issubdtype(x.dtype, jnp.inexact)]).all()


@contextlib.contextmanager
def locked(out: pathlib.Path):
  """The run lock of ``out`` (:mod:`run_lock`), held by process 0 for all processes of a run.

  Yields the ``RunLock`` (None on other processes). When process 0 is refused,
  every process raises ``LockError`` at once: none waits for one that stopped.
  """
  with contextlib.ExitStack() as stack:
    lock, refused = None, None
    if multihost.is_primary():
      try:
        lock = stack.enter_context(run_lock.RunLock(out))
      except run_lock.LockError as err:
        refused = err
    if multihost.largest(refused is not None):
      raise refused or run_lock.LockError(
          f"process 0 of this run could not take the run lock of {out}: see its error.")
    yield lock


def train(model_cfg: LlamaConfig, opt_cfg: optimizers.OptimizerConfig,
          cfg: TrainConfig) -> Result:
  """Train, evaluate, log and checkpoint; see the module docstring.

  Raises:
    run_lock.LockError: another live run writes to ``cfg.out_dir``.
    Diverged: at the first non-finite loss or gradient norm (with
      ``skip_nonfinite``: more in a row than ``optax.apply_if_finite`` skips),
      validation loss or saved state; checkpoints saved before stay.
    Stopped: SIGINT or SIGTERM arrived; the step it arrived in was saved.
  """
  primary = multihost.is_primary()  # the process that logs and writes all but checkpoints
  verbose = cfg.verbose and primary
  say = print if verbose else (lambda *a, **k: None)
  corpus = data_lib.load_corpus(cfg.data, cfg.seq_len, cfg.val_fraction)
  tx, layout = optimizer_and_layout(model_cfg, opt_cfg, cfg, make_mesh(cfg))
  out = pathlib.Path(cfg.out_dir)
  with locked(out) as lock, stop_signals.StopRequests() as stop:
    if lock and lock.stale_holder:
      print(f"note: took over the stale lock of {out} from {lock.stale_holder} (that process "
            "has ended)", file=sys.stderr)
    ckpts = checkpointing.Checkpoints(out / "checkpoints", keep=cfg.keep_checkpoints)
    graphdef, init = init_fn(model_cfg, tx, cfg.seed, cfg.dtype, layout,
                             functools.partial(optimizers.quantize_weights, opt_cfg, model_cfg))
    meta = run_metadata(model_cfg, opt_cfg, cfg, corpus)
    last_step = min(opt_cfg.total_steps, cfg.stop_at or opt_cfg.total_steps)
    state, start_step = initial_state(ckpts, init, meta, cfg, last_step, say)

    in_backward_step = None
    if cfg.update_in_backward:
      in_backward_step = qadam_mini_jax.in_backward.train_step(
          *pieces(nnx.eval_shape(model_factory(model_cfg, cfg.seed, cfg.dtype))),
          optimizers.in_backward_optimizer(opt_cfg, model_cfg), clip_global_norm=opt_cfg.clip_norm)
    train_step, eval_loss = make_step_fns(
        graphdef, tx, layout,
        optimizers.fused_step(opt_cfg, model_cfg) if opt_cfg.weight_quant else None,
        in_backward_step)
    accum = opt_cfg.grad_accum
    put = (lambda shape, rows: rows(slice(None))) if layout is None else layout.put
    micro_batch = lambda index: put((cfg.batch_size, cfg.seq_len), functools.partial(
        data_lib.train_batch, corpus.train, index, cfg.batch_size, cfg.seq_len, cfg.seed))
    compiled, compile_seconds = compile_step(train_step, state, micro_batch(0))
    memory = memory_report(compiled)
    val = [put(b.shape, b.__getitem__) for b in
           data_lib.val_batches(corpus.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)]
    float_params = qadam_mini_jax.weights.float_like(state["params"])
    n_params = sum(x.size for x in jax.tree.leaves(float_params))
    state_bytes = optimizers.state_nbytes(opt_cfg, model_cfg, state["params"])
    weight_bytes = qadam_mini_jax.tree_nbytes(state["params"])
    grad_bytes = sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(float_params))
    if cfg.update_in_backward:  # the gradient of one layer and of the embedding and head
      grad_bytes -= (1 - 1 / model_cfg.num_layers) * sum(
          x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(float_params["layers"]))
    tokens_per_step = accum * cfg.batch_size * cfg.seq_len
    say(f"data: {corpus.name}: {len(corpus.train):,} training and {len(corpus.val):,} "
        f"validation bytes (byte-level tokens, vocabulary {data_lib.VOCAB_SIZE})")
    say(f"model: {n_params:,} parameters {model_cfg}")
    say(f"optimizer: {opt_cfg.name}{' with INT8 weights' if opt_cfg.weight_quant else ''}: "
        f"state {state_bytes:,} bytes ({state_bytes / n_params:.3f} B/param)")
    say(f"bytes per parameter: weights {weight_bytes / n_params:.3f} + optimizer state "
        f"{state_bytes / n_params:.3f} + gradient {grad_bytes / n_params:.3f} = "
        f"{(weight_bytes + state_bytes + grad_bytes) / n_params:.3f}")
    per_device = {}
    if layout is not None:
      per_device = {
          "state_bytes_per_device": max(qadam_mini_jax.tree_nbytes_per_device(
              optimizers.core_state(opt_cfg, state["opt_state"])).values()),
          "params_bytes_per_device": max(
              qadam_mini_jax.tree_nbytes_per_device(state["params"]).values())}
      say(f"mesh: {', '.join(f'{k}={v}' for k, v in layout.mesh.shape.items())} "
          f"({layout.mesh.size} devices): per device (at most) optimizer state "
          f"{per_device['state_bytes_per_device']:,} bytes, parameters "
          f"{per_device['params_bytes_per_device']:,} bytes")
    sizes = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in memory.items() if k != "generated_code")
    say(f"compiled train step in {compile_seconds:.1f} s "
        f"({'--scan-layers' if model_cfg.scan_layers else 'layers unrolled'}"
        f"{', --update-in-backward' if cfg.update_in_backward else ''})"
        + (f"; {'per device: ' if layout else ''}{sizes}" if memory else ""))

    def diverged(step: int, problem: str) -> Diverged:
      saved = ckpts.steps()
      kept = (f"the checkpoint of step {saved[-1]} in {ckpts.directory} is the last good one "
              f"(--resume-step {saved[-1]})" if saved else "no checkpoint was saved")
      advice = "" if opt_cfg.skip_nonfinite else (
          ", or --skip-nonfinite to skip updates whose gradients are not finite "
          "(optax.apply_if_finite)")
      return Diverged(f"step {step}: {problem}: training diverged and stops without saving; "
                      f"{kept}. Try a lower --lr (this run: {opt_cfg.lr:g}){advice}.")

    log = MetricsLog(out / "metrics.jsonl", start_step if start_step else None) if primary else None
    schedule = optimizers.schedule(opt_cfg)
    progress = _progress_bar(cfg.progress and primary, opt_cfg.total_steps, start_step)
    skippable = optimizers.MAX_SKIPPED_IN_A_ROW if opt_cfg.skip_nonfinite else 0
    window, window_start, train_time, nonfinite_in_a_row = [], time.perf_counter(), 0.0, 0
    val_loss = None
    for step in range(start_step + 1, last_step + 1):
      for k in range(accum):
        state, metrics = compiled(state, micro_batch((step - 1) * accum + k))
        window.append((step, metrics))
      evaluating = step % cfg.eval_every == 0 or step == last_step
      scheduled = (evaluating or step % cfg.checkpoint_every == 0
                   or step % cfg.log_every == 0)
      signum = stop.signum or 0
      if jax.process_count() > 1:  # processes stop together, at the next logged step
        signum = multihost.largest(signum) if scheduled else 0
      stopping = signum != 0 and step < last_step
      saving = step % cfg.checkpoint_every == 0 or step == last_step or stopping
      if not (scheduled or stopping):
        continue
      fetched = jax.device_get([m for _, m in window])
      finite = [math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in fetched]
      for (at, _), m, ok in zip(window, fetched, finite):
        nonfinite_in_a_row = 0 if ok else nonfinite_in_a_row + 1
        if nonfinite_in_a_row > skippable:
          raise diverged(at, f"loss {m['loss']}, gradient norm {m['grad_norm']}" + (
              f" ({nonfinite_in_a_row} micro-batches in a row, more than --skip-nonfinite "
              "skips)" if skippable else ""))
      kept = [m for m, ok in zip(fetched, finite) if ok] or fetched
      elapsed = time.perf_counter() - window_start
      train_time += elapsed
      record = {"step": step, "tokens": step * tokens_per_step,
                "loss": float(np.mean([m["loss"] for m in kept])),
                "lr": float(schedule(step - 1)),
                "grad_norm": float(np.mean([m["grad_norm"] for m in kept])),
                "embed_norm": float(embed_norm(state["params"])),
                "tokens_per_s": len(fetched) * cfg.batch_size * cfg.seq_len / elapsed}
      if skippable:
        record["skipped"] = finite.count(False)
      progress.update(step - progress.n)
      progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
      if evaluating:
        val_loss = evaluate(eval_loss, state["params"], val)
        if not math.isfinite(val_loss):
          raise diverged(step, f"validation loss {val_loss}")
        record.update(val_loss=val_loss, val_ppl=math.exp(val_loss))
        if verbose:
          progress.write(f"step {step:6d}  loss {record['loss']:.4f}  val loss {val_loss:.4f}  "
                         f"val ppl {math.exp(val_loss):.3f}  embedding norm "
                         f"{record['embed_norm']:.2f}  {record['tokens_per_s']:,.0f} tokens/s")
      if log:
        log.write(record)
      if saving:
        if not all_finite(state):
          raise diverged(step, "the parameters or optimizer state hold NaN or infinity")
        ckpts.save(step, state, {**meta, "step": step, "batches_consumed": step * accum})
      window, window_start = [], time.perf_counter()
      if stopping:
        progress.close()
        raise Stopped(signum, step, ckpts.directory / str(step))
    progress.close()
    if val_loss is None:  # nothing left to train: report the restored state
      val_loss = evaluate(eval_loss, state["params"], val)

    summary = {
        "optimizer": opt_cfg.name, "lr": opt_cfg.lr, "partition": opt_cfg.partition,
        "stochastic_rounding": opt_cfg.stochastic_rounding, "step": last_step,
        "params": n_params, "state_bytes": state_bytes,
        "state_bytes_per_param": state_bytes / n_params, "compiled_step_memory": memory,
        "compile_seconds": compile_seconds,
        "val_loss": val_loss, "val_ppl": math.exp(val_loss),
        "embed_norm": float(embed_norm(state["params"])),
        "tokens_per_s": ((last_step - start_step) * tokens_per_step / train_time
                         if train_time else None),
        "data": corpus.name, "model": dataclasses.asdict(model_cfg),
    }
    if layout is not None:
      summary.update(mesh=dict(layout.mesh.shape), **per_device)
    if primary:
      (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  speed = f"{summary['tokens_per_s']:,.0f} tokens/s; " if summary["tokens_per_s"] else ""
  say(f"step {last_step}: validation loss {val_loss:.4f} (perplexity {math.exp(val_loss):.3f}, "
      f"{val_loss / math.log(2):.3f} bits/byte); embedding norm {summary['embed_norm']:.2f}; "
      f"{speed}logs in {out}")
  return Result(state, summary)


def _progress_bar(enabled: bool, total: int, initial: int):
  """A tqdm bar, or a stand-in with the same methods when disabled or tqdm is absent."""
  try:
    from tqdm.auto import tqdm
  except ImportError:
    enabled = False
  if enabled:
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

  class _Silent:
    n = initial

    def update(self, k):
      self.n += k

    def set_postfix(self, **_):
      pass

    def write(self, line):
      print(line)

    def close(self):
      pass

  return _Silent()


def checked(kind: type, requirement: str, test) -> Any:
  """An argparse ``type``: ``kind(text)``, refused unless ``test(value)``.

  argparse then stops with one line naming the flag, before anything is built:
  ``argument --b1: must be in [0, 1), got 1.0``.
  """
  def parse(text: str):
    value = kind(text)
    if not test(value):
      raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
    return value

  parse.__name__ = kind.__name__  # for argparse's "invalid int value: 'x'"
  return parse


POSITIVE_INT = checked(int, "a positive integer", lambda v: v >= 1)
NON_NEGATIVE_INT = checked(int, "an integer >= 0", lambda v: v >= 0)
POSITIVE = checked(float, "a finite number > 0", lambda v: 0 < v < math.inf)
NON_NEGATIVE = checked(float, "a finite number >= 0", lambda v: 0 <= v < math.inf)
DECAY = checked(float, "in [0, 1)", lambda v: 0 <= v < 1)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  g = p.add_argument_group("model")
  g.add_argument("--model", default="tiny", choices=CONFIGS,
                 help="LLaMA size (default tiny; the vocabulary is always 256 bytes)")
  for flag, field in MODEL_FLAGS:
    g.add_argument(flag, dest=field, type=POSITIVE_INT, help=f"override the config's {field}")
  g.add_argument("--attention-chunk", type=POSITIVE_INT, metavar="QUERIES",
                 help="compute attention QUERIES queries at a time (must divide --seq-len): "
                      "its float32 scores shrink seq-len/QUERIES times; same losses up to "
                      "float rounding")
  g.add_argument("--scan-layers", action="store_true",
                 help="stack the blocks on a leading layer axis and run them with nnx.scan: "
                      "one block to compile instead of one per layer, same weights and losses")
  g.add_argument("--dtype", default="float32", choices=DTYPES,
                 help="compute dtype (default float32; parameters and optimizer state "
                      "stay float32)")
  g = p.add_argument_group("data")
  g.add_argument("--data", nargs="+", default=(),
                 help="text files/directories, or hf:NAME[:CONFIG]; default: the Python "
                      "documentation shipped with CPython (pydoc_data)")
  g.add_argument("--val-fraction", type=checked(float, "in (0, 1)", lambda v: 0 < v < 1),
                 default=0.1, help="default 0.1")
  g.add_argument("--seq-len", type=checked(int, "an integer >= 2", lambda v: v >= 2),
                 default=128, help="default 128")
  g.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="default 16")
  g = p.add_argument_group("optimizer")
  g.add_argument("--optimizer", default="q_adam_mini", choices=optimizers.OPTIMIZERS,
                 help="default q_adam_mini")
  g.add_argument("--lr", type=POSITIVE, default=optimizers.OptimizerConfig.lr,
                 help="peak learning rate (default 3e-3)")
  g.add_argument("--steps", type=POSITIVE_INT, default=1000,
                 help="optimizer steps (default 1000)")
  g.add_argument("--warmup-steps", type=NON_NEGATIVE_INT, help="default 10%% of --steps")
  g.add_argument("--min-lr-ratio", type=NON_NEGATIVE, default=0.1,
                 help="final / peak learning rate of the cosine decay (default 0.1)")
  g.add_argument("--b1", type=DECAY, default=0.9, help="default 0.9")
  g.add_argument("--b2", type=DECAY, default=0.95, help="default 0.95")
  g.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.1, help="default 0.1")
  g.add_argument("--clip-norm", type=POSITIVE, default=1.0,
                 help="global gradient-norm clipping (default 1.0)")
  g.add_argument("--grad-accum", type=POSITIVE_INT, default=1,
                 help="micro-batches per optimizer step, with optax.MultiSteps (default 1)")
  g.add_argument("--partition", default=optimizers.DEFAULT_PARTITION,
                 choices=optimizers.PARTITIONS,
                 help=f"Adam-mini block partition (default {optimizers.DEFAULT_PARTITION})")
  g.add_argument("--stochastic-rounding", default="auto", choices=optimizers.ROUNDINGS,
                 help="q_adam_mini: which INT8 leaves of m round stochastically (default auto: "
                      "the embedding and output layers; the rest round to nearest)")
  g.add_argument("--no-stochastic-rounding", dest="stochastic_rounding", action="store_const",
                 const="none", help="same as --stochastic-rounding none: round m to nearest "
                                    "everywhere, also in the embedding and output layers")
  g.add_argument("--weight-quant", action="store_true",
                 help="q_adam_mini, q_galore: store the weights themselves in INT8 (groups of 256, no "
                      "float master copy; norms stay float), re-quantized after each update "
                      "with stochastic rounding (round to nearest with --stochastic-rounding "
                      "none)")
  g.add_argument("--mu-dtype", choices=optimizers.MU_DTYPES,
                 help=f"{', '.join(optimizers.MU_DTYPE_OPTIMIZERS)}: the first moment's dtype "
                      "(default: the parameters', float32)")
  g.add_argument("--rank", type=POSITIVE_INT,
                 help="galore, q_galore: rank of the gradient projections (default: the "
                      "model's dim / 4)")
  g.add_argument("--update-proj-gap", type=POSITIVE_INT, default=200,
                 help="galore, q_galore: steps between projector refreshes (q_galore doubles "
                      "a layer's gap while its subspace stays put; default 200)")
  g.add_argument("--update-in-backward", action="store_true",
                 help="with --scan-layers: update each layer inside the backward pass, as "
                      "soon as its gradient exists, so the whole gradient is never held; "
                      "global-norm clipping stays exact at one more backward pass")
  g.add_argument("--skip-nonfinite", action="store_true",
                 help="skip updates whose gradients hold NaN or infinity (optax.apply_if_finite, "
                      f"up to {optimizers.MAX_SKIPPED_IN_A_ROW} in a row) instead of stopping")
  g.add_argument("--seed", type=NON_NEGATIVE_INT, default=0,
                 help="model initialisation, data order and rounding noise (default 0)")
  g = p.add_argument_group("run")
  g.add_argument("--out-dir", help="default: runs/<optimizer>")
  g.add_argument("--log-every", type=POSITIVE_INT, default=10, help="default 10 steps")
  g.add_argument("--eval-every", type=POSITIVE_INT, default=100, help="default 100 steps")
  g.add_argument("--eval-batches", type=POSITIVE_INT, default=32,
                 help="validation batches, at most (default 32; the default corpus has 22)")
  g.add_argument("--checkpoint-every", type=POSITIVE_INT, default=250,
                 help="default 250 steps")
  g.add_argument("--keep-checkpoints", type=POSITIVE_INT, default=2, help="default 2")
  g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
  g.add_argument("--resume-step", type=POSITIVE_INT, help="continue from this checkpoint step")
  g.add_argument("--stop-at", type=POSITIVE_INT,
                 help="stop (with a checkpoint) after this step")
  g.add_argument("--no-progress", dest="progress", action="store_false")
  g.add_argument("--mesh",
                 help="train sharded over a device mesh, e.g. data=2,fsdp=4 or data=2,tensor=4 "
                      "(axes data, fsdp, tensor; sizes multiply to the device count): the "
                      "batch splits over data*fsdp, the weights over fsdp (FSDP) and tensor "
                      "(Megatron), the optimizer state like the weights; default: one device")
  g = p.add_argument_group(
      "processes", "one run over several processes (one per host), each started with the same "
      "flags: jax.distributed.initialize() joins them and --mesh spans all their devices; "
      "values not given are detected by JAX from the launcher (SLURM, Open MPI; "
      "JAX_COORDINATOR_ADDRESS for the address)")
  g.add_argument("--distributed", action="store_true",
                 help="run as one process of a multi-process run (implied by the flags below)")
  g.add_argument("--coordinator-address", metavar="HOST:PORT",
                 help="where process 0 serves the coordination service")
  g.add_argument("--num-processes", type=POSITIVE_INT, help="how many processes the run has")
  g.add_argument("--process-id", type=NON_NEGATIVE_INT,
                 help="this process's index, 0 to --num-processes - 1 (0 logs and writes)")
  g.add_argument("--heartbeat-timeout", type=POSITIVE_INT, default=100, metavar="SECONDS",
                 help="when one process has died, the others stop after this long "
                      "(default 100, JAX's)")
  return p


def configs_from_args(args: argparse.Namespace):
  """``(LlamaConfig, OptimizerConfig, TrainConfig)``.

  Raises ValueError, naming the flags, on a bad combination of flags (each
  flag's own range is checked by the parser).
  """
  overrides = {field: getattr(args, field) for _, field in MODEL_FLAGS
               if getattr(args, field) is not None}
  try:
    model_cfg = dataclasses.replace(CONFIGS[args.model], vocab=data_lib.VOCAB_SIZE,
                                    scan_layers=args.scan_layers,
                                    attention_chunk=args.attention_chunk, **overrides)
  except ValueError as err:  # LlamaConfig names its fields: name the flags instead
    message = str(err)
    for flag, field in MODEL_FLAGS:
      message = re.sub(rf"(?<![\w-]){field}(?![\w-])", flag, message)
    raise ValueError(f"--model {args.model}: {message}") from None
  if args.attention_chunk is not None and args.seq_len % args.attention_chunk:
    raise ValueError(f"--attention-chunk {args.attention_chunk} must divide --seq-len "
                     f"{args.seq_len}.")
  warmup = args.steps // 10 if args.warmup_steps is None else args.warmup_steps
  if warmup > args.steps:
    raise ValueError(f"--warmup-steps {warmup} must not exceed --steps {args.steps}.")
  opt_cfg = optimizers.OptimizerConfig(
      name=args.optimizer, lr=args.lr, total_steps=args.steps, warmup_steps=warmup,
      min_lr_ratio=args.min_lr_ratio, b1=args.b1, b2=args.b2, weight_decay=args.weight_decay,
      clip_norm=args.clip_norm, grad_accum=args.grad_accum, partition=args.partition,
      stochastic_rounding=args.stochastic_rounding, seed=args.seed,
      skip_nonfinite=args.skip_nonfinite, weight_quant=args.weight_quant,
      mu_dtype=args.mu_dtype, rank=args.rank, update_proj_gap=args.update_proj_gap)
  train_cfg = TrainConfig(
      data=tuple(args.data), val_fraction=args.val_fraction, seq_len=args.seq_len,
      batch_size=args.batch_size, dtype=args.dtype, seed=args.seed, log_every=args.log_every,
      eval_every=args.eval_every, eval_batches=args.eval_batches,
      out_dir=args.out_dir or f"runs/{args.optimizer}", checkpoint_every=args.checkpoint_every,
      keep_checkpoints=args.keep_checkpoints, resume=args.resume, resume_step=args.resume_step,
      stop_at=args.stop_at, progress=args.progress, mesh=args.mesh,
      update_in_backward=args.update_in_backward)
  make_mesh(train_cfg)  # a bad --mesh fails here, before anything is loaded
  if jax.process_count() > 1 and not args.mesh:
    raise ValueError(
        f"a run over {jax.process_count()} processes needs --mesh over all their "
        f"{jax.device_count()} devices, e.g. --mesh data={jax.process_count()},"
        f"fsdp={jax.local_device_count()}.")
  if args.weight_quant and args.mesh:
    raise ValueError(f"--weight-quant does not combine with --mesh {args.mesh!r} yet: "
                     "sharding_rules.py has no rules for INT8 weights.")
  if args.optimizer == "micro_adam" and args.mesh:
    raise ValueError(f"--optimizer micro_adam does not combine with --mesh {args.mesh!r} yet: "
                     "its ring and error feedback follow FSDP splits of each layer's first axis "
                     "(micro_adam(shardings=...)), which the example's state placement does not "
                     "know.")
  if args.update_in_backward:
    refused = [flag for flag, given in (
        ("--scan-layers is needed", not args.scan_layers),
        (f"--optimizer {args.optimizer}", args.optimizer not in optimizers.IN_BACKWARD_OPTIMIZERS),
        ("--grad-accum", args.grad_accum > 1), ("--skip-nonfinite", args.skip_nonfinite))
        if given]
    if refused:
      raise ValueError(
          f"--update-in-backward updates each layer of the stacked blocks as soon as its "
          f"gradient exists: {refused[0]} (it takes --scan-layers and --optimizer "
          f"{', '.join(optimizers.IN_BACKWARD_OPTIMIZERS)}; accumulating gradients or skipping "
          "non-finite ones needs the whole gradient first).")
  if args.scan_layers and args.mesh:
    raise ValueError(f"--scan-layers does not combine with --mesh {args.mesh!r} yet: "
                     "sharding_rules.py shards unstacked 2-D weights only.")
  return model_cfg, opt_cfg, train_cfg


def resume_command(argv: list[str]) -> str:
  """The command that continues a run of ``train.py argv`` from its newest checkpoint."""
  kept, words = [], iter(argv)
  for word in words:
    if word == "--resume-step":
      next(words, None)
    elif word != "--resume" and not word.startswith("--resume-step="):
      kept.append(word)
  script = pathlib.Path(__file__).resolve()
  if script.is_relative_to(pathlib.Path.cwd()):
    script = script.relative_to(pathlib.Path.cwd())
  return shlex.join(["python", str(script), *kept, "--resume"])


def join_processes(args: argparse.Namespace) -> None:
  """``jax.distributed.initialize`` when the flags ask for a multi-process run.

  Raises ValueError when they do not but the launcher started several
  processes (each would train alone), or when JAX cannot tell the values.
  """
  given = [flag for flag, value in (("--coordinator-address", args.coordinator_address),
                                    ("--num-processes", args.num_processes),
                                    ("--process-id", args.process_id)) if value is not None]
  if not (args.distributed or given):
    launch = multihost.undeclared_launch()
    if launch:
      raise ValueError(
          f"{launch} says this is one of several processes, but train.py was not asked to "
          "run distributed: pass --distributed to train one run over all of them, or start "
          "a single process.")
    return
  report = multihost.initialize(args.coordinator_address, args.num_processes, args.process_id,
                                args.heartbeat_timeout)
  if multihost.is_primary():
    detected = "" if len(given) == 3 else " (values not given detected by JAX)"
    print(f"distributed: {report}{detected}")


def main(argv: list[str] | None = None) -> None:
  """Run from the command line; exits 1 on an error, 128 + signal number when stopped."""
  argv = sys.argv[1:] if argv is None else argv
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    join_processes(args)
    configs = configs_from_args(args)
  except ValueError as err:
    parser.error(str(err))
  try:
    train(*configs)
  except Stopped as stopped:
    if not multihost.is_primary():
      sys.exit(128 + stopped.signum)
    print(f"\nstopped by {signal.Signals(stopped.signum).name} after step {stopped.step}, "
          f"saved in {stopped.checkpoint}; continue with:\n  {resume_command(argv)}",
          file=sys.stderr)
    sys.exit(128 + stopped.signum)
  except (data_lib.DataError, checkpointing.CheckpointError, qadam_mini_jax.ShardingError,
          run_lock.LockError, Diverged) as err:
    sys.exit(f"error: {err}")


if __name__ == "__main__":
  main()
