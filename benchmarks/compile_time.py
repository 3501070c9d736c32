"""Compile time of the example's train step, blocks unrolled or scanned (``--scan-layers``).

    python benchmarks/compile_time.py                        # 60M and 1B, q_adam_mini
    python benchmarks/compile_time.py --model 60M 130M --optimizer adamw

Builds the jitted train step as ``examples/train.py`` does from its flags, then
lowers and compiles it for abstract arguments (``jax.ShapeDtypeStruct``s:
nothing is allocated or run), once with the blocks unrolled and once with
``--scan-layers``: the number ``train.py`` prints as "compiled train step in".
Results go to ``benchmarks/results/compile_time_<backend>.md``, rewritten
after each model (a run cut short keeps the sizes it finished).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import optimizers  # noqa: E402
import results_file  # noqa: E402
import train  # noqa: E402


def compile_seconds(flags: list[str]) -> tuple[float, int]:
  """Seconds to lower and compile the train step of ``train.py flags``, and its parameter count."""
  model_cfg, opt_cfg, cfg = train.configs_from_args(train.build_parser().parse_args(flags))
  tx = optimizers.make(opt_cfg, model_cfg)
  graphdef, init = train.init_fn(model_cfg, tx, cfg.seed, cfg.dtype)
  train_step, _ = train.make_step_fns(graphdef, tx)
  state = jax.eval_shape(init)
  tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)
  _, seconds = train.compile_step(train_step, state, tokens)
  return seconds, sum(x.size for x in jax.tree.leaves(state["params"]))


def cpu_name() -> str:
  """The processor's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
  info = pathlib.Path("/proc/cpuinfo")
  names = [line.split(":", 1)[1].strip() for line in
           (info.read_text().splitlines() if info.exists() else []) if line.startswith("model name")]
  return names[0] if names else platform.processor() or platform.machine()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", nargs="+", default=["60M", "1B"])
  parser.add_argument("--optimizer", default="q_adam_mini", choices=optimizers.OPTIMIZERS)
  args = parser.parse_args()
  backend = jax.default_backend()
  device = jax.devices()[0]
  machine = f"{cpu_name()}, {os.cpu_count()} cores"
  lines = [f"Produced by `python benchmarks/compile_time.py {' '.join(sys.argv[1:])}`".rstrip()
           + f" on {getattr(device, 'device_kind', backend)} ({machine}; jax {jax.__version__}): "
           f"seconds to lower and compile `train.py --optimizer {args.optimizer}`'s train step "
           f"(batch {train.TrainConfig.batch_size} x {train.TrainConfig.seq_len} tokens, fp32, "
           "byte vocabulary), not run.", "",
           "| model | parameters | layers | unrolled s | --scan-layers s | speed-up |",
           "|---|---|---|---|---|---|"]
  for model in args.model:
    flags = ["--model", model, "--optimizer", args.optimizer]
    unrolled, n = compile_seconds(flags)
    scanned, _ = compile_seconds([*flags, "--scan-layers"])
    layers = train.CONFIGS[model].num_layers
    lines.append(f"| {model} | {n / 1e6:,.0f}M | {layers} | {unrolled:.1f} | {scanned:.1f} | "
                 f"{unrolled / scanned:.1f}x |")
    print(lines[-1], flush=True)
    results_file.write(f"compile_time_{backend}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
