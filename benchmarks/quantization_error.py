"""INT8 first-moment quantization error on real Adam-mini trajectories.

Run from the repository root::

    python benchmarks/quantization_error.py

Trains the example tiny LLaMA (``examples/llama_model.py``) on the source code
of a few standard-library modules (:data:`STDLIB_FILES`) with ``adam_mini``
(float32 ``m``). At a few checkpoints it takes the first moment ``m`` of every
leaf the library would store in INT8 (>= 4096 elements) and measures, per
Adam-mini rule group, the relative L2 error ``||dq(q(m)) - m|| / ||m||`` and
the underflow (share of nonzero ``m`` that dequantizes to exactly 0) of these
schemes:

* ours, round-to-nearest: ``qadam_mini_jax.quantize.quantize`` with the
  library's grouping (``transform.layout_for``: groups inside Adam-mini blocks);
* ours, stochastic rounding with the ``qadam_mini_jax.random_bits`` noise
  ``q_adam_mini`` would draw for that leaf and step;
* the PyTorch reference's scheme as described in ``REFERENCE.md``
  (:func:`reference_roundtrip`): groups of 256 consecutive elements of the
  flattened tensor, asymmetric min-max uint8 with an fp32 scale and zero
  point, the zero point clamped to [0, 255], the range floored at 1e-5,
  round-to-nearest. It is applied in the PyTorch layout it was written for
  (``nn.Linear`` weights are ``(out, in)``, the transpose of a Flax kernel, so
  groups run along the input axis), and to ``m`` scaled to the per-element
  size of a gradient of the same global norm in the 1B LLaMA (where the 1e-5
  floor matters; our scheme is scale-free);
* ours with groups along the last axis of the Flax layout (row groups for
  every leaf), to show what grouping across output neurons costs.

It also trains ``q_adam_mini`` and, as a control for how far any small change
of ``m`` moves the trajectory, ``adam_mini`` with ``m`` in bfloat16, with the
same seed, data and schedule. Prints a Markdown report and writes it to
``benchmarks/results/quantization_error.md``.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import llama_shapes  # noqa: E402  (found through the sys.path entries above)
import results_file  # noqa: E402
from llama_model import CONFIGS, Llama, next_token_loss  # noqa: E402

import qadam_mini_jax  # noqa: E402
from qadam_mini_jax import quantize as quantize_lib  # noqa: E402
from qadam_mini_jax import random_bits  # noqa: E402
from qadam_mini_jax import transform  # noqa: E402
from qadam_mini_jax.partition import EMBEDDING  # noqa: E402

COMMAND = "python benchmarks/quantization_error.py"
MODEL, SCALE_MODEL = "tiny", "1B"
STEPS = 300
CHECKPOINTS = (10, 50, 100, 200, 300)
BATCH, SEQ, SEED = 16, 128, 0
LR, WARMUP, B2, WEIGHT_DECAY, CLIP = 3e-3, STEPS // 10, 0.95, 0.1, 1.0
GROUP_SIZE, MIN_SIZE = 256, 4096
REF_RANGE_FLOOR = 1e-5
LAST_LOSSES = 20  # final loss = mean training loss over this many last steps
SCHEMES = ("ours RTN", "ours SR", "ours RTN, last-axis groups", "ref., PyTorch layout",
           f"ref., PyTorch layout, m at {SCALE_MODEL} scale")
GROUP_STATS = ("ref. same-sign groups", "ref. floored groups",
               f"ref. floored groups at {SCALE_MODEL} scale")
STDLIB_FILES = ("textwrap.py", "argparse.py", "difflib.py", "inspect.py", "typing.py")
OPTIMIZERS = {
    "adam_mini": qadam_mini_jax.adam_mini,
    "adam_mini (m in bfloat16)": functools.partial(qadam_mini_jax.adam_mini, mu_dtype="bfloat16"),
    "q_adam_mini": qadam_mini_jax.q_adam_mini,
}


def stdlib_bytes() -> np.ndarray:
  """A few hundred kB of standard-library source code as a uint8 array."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  return np.frombuffer(b"\n".join((root / name).read_bytes() for name in STDLIB_FILES), np.uint8)


def batches(data: np.ndarray, batch: int, seq: int, seed: int):
  """Endless batches of random windows."""
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(data) - seq, batch)
    yield jnp.asarray(np.stack([data[s:s + seq] for s in starts]).astype(np.int32))


def make_tx(factory, partition):
  schedule = optax.warmup_cosine_decay_schedule(0.0, LR, WARMUP, STEPS)
  return optax.chain(optax.clip_by_global_norm(CLIP),
                     factory(schedule, b2=B2, weight_decay=WEIGHT_DECAY, partition=partition))


def train(tx, data):
  """Train from seed ``SEED``: initial and final params, losses, states at checkpoints."""
  graphdef, state = nnx.split(Llama(CONFIGS[MODEL], nnx.Rngs(SEED)))
  params = nnx.to_pure_dict(state)  # plain arrays, no nnx.Variable leaves

  @jax.jit
  def step(params, opt_state, tokens):
    loss_fn = lambda p: next_token_loss(nnx.merge(graphdef, p)(tokens), tokens)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  p, opt_state, losses, states = params, tx.init(params), [], {}
  data_iter = batches(data, BATCH, SEQ, SEED)
  for i in range(1, STEPS + 1):
    p, opt_state, loss = step(p, opt_state, next(data_iter))
    losses.append(loss)
    if i in CHECKPOINTS:
      states[i] = opt_state
  return params, p, np.asarray(losses), states


def adam_mini_state(opt_state) -> qadam_mini_jax.ScaleByAdamMiniState:
  is_state = lambda x: isinstance(x, qadam_mini_jax.ScaleByAdamMiniState)
  return next(s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s))


def reference_roundtrip(m: jax.Array) -> jax.Array:
  """The reference scheme's ``dq(q(m))`` (sizes must divide by ``GROUP_SIZE``)."""
  g = m.reshape(-1, GROUP_SIZE)
  lo, hi = g.min(axis=1, keepdims=True), g.max(axis=1, keepdims=True)
  scale = jnp.maximum(hi - lo, REF_RANGE_FLOOR) / 255.0
  zero = jnp.clip(jnp.round(-lo / scale), 0, 255)
  code = jnp.clip(jnp.round(g / scale) + zero, 0, 255)
  return ((code - zero) * scale).reshape(m.shape)


def ours_roundtrip(m: jax.Array, layout, noise: jax.Array | None = None) -> jax.Array:
  return quantize_lib.dequantize(quantize_lib.quantize(m, layout, noise), layout)


def roundtrips(m, layout, state_key, step, leaf, scale, torch_layout) -> list[jax.Array]:
  """``dq(q(m))`` under each of ``SCHEMES``."""
  noise = random_bits.uniform(m.shape, *random_bits.stream_seeds(state_key, step, leaf))
  in_torch = lambda fn, x: fn(x.T).T if torch_layout else fn(x)
  last_axis = quantize_lib.group_layout(m.shape, GROUP_SIZE)
  return [ours_roundtrip(m, layout), ours_roundtrip(m, layout, noise),
          ours_roundtrip(m, last_axis), in_torch(reference_roundtrip, m),
          in_torch(reference_roundtrip, m * scale) / scale]


def group_stats(m: jax.Array, scale) -> jax.Array:
  """Reference groups: [nonzero, same-sign nonzero, floored nonzero, floored at ``scale``]."""
  g = m.reshape(-1, GROUP_SIZE)
  lo, hi = g.min(axis=1), g.max(axis=1)
  nonzero = hi - lo > 0
  return jnp.stack([jnp.sum(x & nonzero) for x in (
      nonzero, (lo >= 0) | (hi <= 0), hi - lo < REF_RANGE_FLOOR,
      (hi - lo) * scale < REF_RANGE_FLOOR)])


@functools.partial(jax.jit, static_argnames=("layout", "torch_layout"))
def leaf_stats(m, layout, state_key, step, leaf, scale, torch_layout: bool):
  """Per scheme [sum err^2, sum m^2, #underflow, #nonzero]; :func:`group_stats`."""
  m = m.astype(jnp.float32)
  per_scheme = jnp.stack([
      jnp.stack([jnp.sum((dq - m) ** 2), jnp.sum(m * m),
                 jnp.sum((dq == 0) & (m != 0)), jnp.sum(m != 0)])
      for dq in roundtrips(m, layout, state_key, step, leaf, scale, torch_layout)])
  return per_scheme, group_stats(m.T if torch_layout else m, scale)


def _is_spec(x) -> bool:
  return x is None or isinstance(x, qadam_mini_jax.BlockSpec)


def measure(state: qadam_mini_jax.ScaleByAdamMiniState, specs, step: int, scale: float) -> dict:
  """:func:`leaf_stats` summed per rule group: {rule: (per scheme, group stats)}."""
  sums, treedef = {}, jax.tree.structure(specs, is_leaf=_is_spec)
  for leaf, (m, spec) in enumerate(zip(treedef.flatten_up_to(state.mu),
                                       treedef.flatten_up_to(specs))):
    if spec is None or m.size < MIN_SIZE:
      continue
    # PyTorch stores nn.Linear weights (out, in), the transpose of Flax kernels.
    torch_layout = spec.rule != EMBEDDING and m.ndim == 2
    layout = transform.layout_for(spec, m.shape, qadam_mini_jax.Int8Quantization(GROUP_SIZE))
    stats = jax.device_get(leaf_stats(m, layout, state.key, step, leaf, scale, torch_layout))
    sums[spec.rule] = tuple(a + np.asarray(b, np.float64) for a, b in zip(
        sums.get(spec.rule, (0, 0)), stats))
  return sums


def global_norm(tree) -> float:
  return float(optax.global_norm(tree))


def markdown_table(header: list[str], rows: list[list[str]], text_column: int = 1) -> list[str]:
  align = ["---" if i == text_column else "---:" for i in range(len(header))]
  return ["| " + " | ".join(cells) + " |" for cells in [header, align, *rows]]


def report(errors: dict[int, dict], runs: dict, scale: float, seconds: float) -> str:
  err_rows, underflow_rows = [], []
  for step, groups in errors.items():
    for rule, (acc, n) in groups.items():
      err_rows.append([str(step), rule] + [f"{np.sqrt(e / m2):.4f}" for e, m2 in acc[:, :2]])
      underflow_rows.append([str(step), rule]
                            + [f"{u / max(nz, 1):.2%}" for u, nz in acc[:, 2:]]
                            + [f"{x / max(n[0], 1):.1%}" for x in n[1:]])
  p0, p_f = runs["adam_mini"][:2]
  moved = global_norm(jax.tree.map(jnp.subtract, p_f, p0))
  run_rows = [[f"`{name}`", f"{losses[-LAST_LOSSES:].mean():.4f}",
               f"{global_norm(jax.tree.map(jnp.subtract, p, p_f)) / moved:.4f}"]
              for name, (_, p, losses, _) in runs.items()]
  return "\n".join([
      f"Produced by `{COMMAND}` on CPU ({len(os.sched_getaffinity(0))} cores), jax "
      f"{jax.__version__}, optax {optax.__version__}, qadam_mini_jax "
      f"{qadam_mini_jax.__version__}; {seconds:.0f} s in all.",
      "",
      f"Model: LLaMA `{MODEL}` of `examples/llama_model.py`; data: the source of "
      f"{', '.join(f'`{f}`' for f in STDLIB_FILES)} from the standard library, batch "
      f"{BATCH} x {SEQ} bytes, seed {SEED}. Optimizer: "
      f"`clip_by_global_norm({CLIP})` then `adam_mini` / `q_adam_mini` (defaults: "
      f"groups of {GROUP_SIZE}, SR on embedding and output), b2={B2}, weight decay "
      f"{WEIGHT_DECAY}, lr {LR} with {WARMUP} warmup steps and cosine decay to 0 over "
      f"{STEPS} steps; GQA partition.",
      "",
      f"## Quantizing the float32 first moment of `adam_mini` (groups of {GROUP_SIZE})",
      "",
      f"Leaves with >= {MIN_SIZE} elements, pooled per rule group. RTN = round-to-nearest, "
      "SR = stochastic rounding; ref. = the reference's asymmetric min-max uint8 "
      f"(zero point clamped to [0, 255], range floored at {REF_RANGE_FLOOR}). PyTorch "
      "layout = the scheme applied to the `(out, in)` transpose of each Flax `(in, out)` "
      "kernel (embedding tables agree), so groups run along the input axis, inside one "
      f"output neuron or token; at {SCALE_MODEL} scale = m multiplied by {scale:.4f} = "
      f"sqrt(params {MODEL} / params {SCALE_MODEL}), the per-element size of a gradient "
      f"of the same global norm in the {SCALE_MODEL} LLaMA (ours is scale-free).",
      "",
      "### Relative L2 error ||dq(q(m)) - m|| / ||m||",
      "",
      *markdown_table(["step", "rule group", *SCHEMES], err_rows),
      "",
      "### Underflow (share of nonzero m that dequantizes to 0) and reference group flaws",
      "",
      "Group shares are of the reference's PyTorch-layout groups that are not all zero; "
      f"floored = range max - min < {REF_RANGE_FLOOR}; same-sign groups get their zero "
      "point clamped.",
      "",
      *markdown_table(["step", "rule group", *SCHEMES, *GROUP_STATS], underflow_rows),
      "",
      "## Training with each optimizer on the same seed, data and schedule",
      "",
      *markdown_table(["optimizer", f"final loss (mean of last {LAST_LOSSES} steps)",
                       "‖p - p_adam_mini‖ / ‖p_adam_mini - p_0‖"], run_rows, 0),
      "",
  ])


def main() -> None:
  start = time.perf_counter()
  data, c = stdlib_bytes(), CONFIGS[MODEL]
  partition = qadam_mini_jax.BlockPartition(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads)
  runs = {name: train(make_tx(f, partition), data) for name, f in OPTIMIZERS.items()}
  p0, _, _, states = runs["adam_mini"]
  n_params = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  scale = float(np.sqrt(n_params(p0) / n_params(llama_shapes.param_shapes(SCALE_MODEL))))
  specs = qadam_mini_jax.block_specs(p0, partition)
  errors = {step: measure(adam_mini_state(s), specs, step, scale) for step, s in states.items()}
  results_file.write("quantization_error.md",
                     report(errors, runs, scale, time.perf_counter() - start))


if __name__ == "__main__":
  main()
