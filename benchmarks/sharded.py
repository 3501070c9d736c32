"""Per-device optimizer state and step time under 8-device FSDP, against optax.adamw.

    python benchmarks/sharded.py                 # 60M shapes, 8 simulated CPU devices
    python benchmarks/sharded.py --model 20M --iters 3

Parameters of the example LLaMA config are split 8 ways on a ``fsdp`` mesh axis
(the output axis of ``(in, out)`` kernels and the vocab axis of the
embedding: the splits that never cut an INT8 group); every optimizer's state
is placed with :func:`qadam_mini_jax.state_shardings`. Each row reports the
optimizer-state bytes one device holds (measured on the arrays' shards), the
same over the whole state, the compiled step's per-device argument and
temporary memory (``memory_analysis``) and the median time of one jitted,
donated optimizer step (``tx.update`` + ``optax.apply_updates``). Without 8
accelerators, the devices are simulated on the host CPU
(``--xla_force_host_platform_device_count=8``): the bytes are exact, the times
only compare the optimizers with each other on that machine. Results go to
``benchmarks/results/sharded_<platform>.md``.
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import llama_shapes  # noqa: E402
import results_file  # noqa: E402
import step_time  # noqa: E402

import qadam_mini_jax as qam  # noqa: E402

DEVICES = 8


def fsdp_spec(path: str, shape: tuple[int, ...]) -> P:
  """Split the axis that never cuts INT8 groups: vocab of the embedding, else ``out``."""
  if len(shape) != 2:
    return P()
  axis = 0 if path.startswith("embed") else 1
  if shape[axis] % DEVICES:
    raise ValueError(f"{path}: axis {axis} of {shape} does not split {DEVICES} ways.")
  return P("fsdp") if axis == 0 else P(None, "fsdp")


def optimizers(config, shardings) -> dict[str, optax.GradientTransformation]:
  part = qam.BlockPartition(num_heads=config.num_heads, num_kv_heads=config.num_kv_heads)
  kw = dict(b2=0.95, weight_decay=0.1)
  return {
      "optax.adamw": optax.adamw(1e-3, **kw),
      "adam_mini": qam.adam_mini(1e-3, partition=part, shardings=shardings, **kw),
      "q_adam_mini (xla)": qam.q_adam_mini(1e-3, partition=part, implementation="xla",
                                           shardings=shardings, **kw),
  }


def measure(tx, params, shardings, iters: int) -> dict[str, float]:
  state_shapes = jax.eval_shape(tx.init, params)
  state_sh = qam.state_shardings(state_shapes, params, shardings)
  state = jax.jit(tx.init, out_shardings=state_sh)(params)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, p.dtype), params)

  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  run = jax.jit(step, in_shardings=(shardings, state_sh, shardings),
                out_shardings=(shardings, state_sh), donate_argnums=(1, 2))
  stats = run.lower(grads, state, params).compile().memory_analysis()
  seconds, state = step_time.median_seconds(run, grads, state, params, iters)
  held = qam.tree_nbytes_per_device(state)
  return {"per_device": max(held.values()), "whole": qam.tree_nbytes(state),
          "argument": stats.argument_size_in_bytes, "temp": stats.temp_size_in_bytes,
          "seconds": seconds}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="60M")
  parser.add_argument("--iters", type=int, default=5)
  args = parser.parse_args()
  if jax.device_count() < DEVICES:
    sys.exit(f"needs {DEVICES} devices, found {jax.device_count()}")
  mesh = jax.make_mesh((DEVICES,), ("fsdp",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:DEVICES])
  config = llama_shapes.CONFIGS[args.model]
  shapes = nnx.to_pure_dict(llama_shapes.param_shapes(args.model))
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  spec_of = {jax.tree_util.keystr(p, simple=True, separator="/"): s for p, s in flat}
  shardings = jax.tree.unflatten(jax.tree.structure(shapes), [
      NamedSharding(mesh, fsdp_spec(path, s.shape)) for path, s in spec_of.items()])
  params = jax.jit(lambda: jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), shapes),
                   out_shardings=shardings)()
  n_params = sum(s.size for s in jax.tree.leaves(shapes))
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform)
  header = ["optimizer", "state bytes / device", "B/param / device", "whole state",
            "per-device share", "vs adamw (per device)", "step args / device",
            "step temp / device", "step ms", "speed vs adamw"]
  rows, base = [], None
  for name, tx in optimizers(config, shardings).items():
    r = measure(tx, params, shardings, args.iters)
    base = base or r
    rows.append([name, f"{r['per_device']:,}", f"{r['per_device'] / n_params:.3f}",
                 f"{r['whole']:,}", f"1/{r['whole'] / r['per_device']:.2f}",
                 f"{r['per_device'] / base['per_device']:.3f}x", f"{r['argument']:,}",
                 f"{r['temp']:,}", f"{r['seconds'] * 1e3:.1f}",
                 f"{base['seconds'] / r['seconds']:.2f}x"])
    print(*rows[-1], flush=True)
  lines = [
      f"Produced by `python benchmarks/sharded.py {' '.join(sys.argv[1:])}`".rstrip()
      + f" on {DEVICES} {kind} devices ({'simulated on the host CPU, ' if device.platform == 'cpu' else ''}"
      f"jax {jax.__version__}): LLaMA {args.model} shapes ({n_params:,} parameters, fp32), "
      f"mesh `fsdp={DEVICES}`, parameters split on the vocab axis of the embedding and the "
      "output axis of every kernel, norms replicated; median of "
      f"{args.iters} steps after warm-up.", "",
      "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
      *["| " + " | ".join(r) + " |" for r in rows], "",
      "B/param / device divides one device's state bytes by the whole model's parameter "
      "count (ideal FSDP: the single-device B/param over 8). Step args are the parameters, "
      "gradients and state one device reads.",
  ]
  if device.platform == "cpu":
    lines.append("The step times share 2 host CPU cores among 8 simulated devices: they "
                 "compare the optimizers with each other, not with accelerators.")
  results_file.write(f"sharded_{device.platform}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
