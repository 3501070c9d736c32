"""What is alive at a training step's memory peak, from XLA's own live-range dump.

    python benchmarks/peak_breakdown.py        # 7B, q_adam_mini + INT8 weights, in backward
    python benchmarks/peak_breakdown.py --model 1B --row "q_adam_mini" "adam_mini"

Compiles rows of ``benchmarks/fits.py`` with ``--xla_dump_to`` (and whatever
else ``XLA_FLAGS`` holds), reads the buffers XLA lists as live at the peak
(``*-live-range.txt``, "Live ranges at N (peak)") with their shapes (the
buffer assignment), and groups them: the arguments (parameters, optimizer
state, tokens), the blocks' saved inputs, and every other buffer of 16 MiB or
more by name and shape. Results go to
``benchmarks/results/peak_breakdown_<backend>.md`` (appended per run and row:
several scheduler flags can share the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import compile_time  # noqa: E402
import fits  # noqa: E402
from llama_model import CONFIGS  # noqa: E402

LISTED_MIB = 16


def peak_buffers(dump: str) -> tuple[int, list[tuple[str, int, str]]]:
  """``(peak bytes, [(buffer, bytes, shape)])`` of the train step in an XLA dump."""
  live = next(f for f in glob.glob(f"{dump}/*train_step*live-range.txt"))
  text = pathlib.Path(live).read_text()
  section = text[text.index("(peak):"):text.index("Stack trace breakdown")]
  sizes = re.findall(r"\n\s+(\S+?)(\{[^}]*\})?: (\d+) bytes", section)
  assignment = next(f for f in glob.glob(f"{dump}/*train_step*buffer-assignment.txt"))
  shapes = dict(re.findall(r"value: <\d+ (\S+?)(?:\{[^}]*\})? @\d+> \(size=\d+,offset=\d+\): (\S+)",
                           pathlib.Path(assignment).read_text()))
  buffers = [(name + index, int(size), shapes.get(name, "?")) for name, index, size in sizes]
  return sum(size for _, size, _ in buffers), buffers


def category(name: str, shape: str) -> str:
  if name.startswith("state__params"):
    return "parameters (arguments)"
  if name.startswith("state__opt_state"):
    return "optimizer state (arguments)"
  if name.startswith("tokens"):
    return "tokens (argument)"
  return f"`{name}` {shape}"


def measure_in_child(model: str, row: str) -> str:
  """The table rows of one fits row, compiled in a child process with a dump dir."""
  with tempfile.TemporaryDirectory() as dump:
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}"
                                      " --xla_dump_hlo_module_re=.*train_step.*").strip())
    subprocess.run([sys.executable, __file__, "--child", model, row], env=env, check=True)
    total, buffers = peak_buffers(dump)
  groups: dict[str, int] = {}
  for name, size, shape in buffers:
    key = category(name, shape)
    if key.startswith("`") and size < LISTED_MIB * 2**20:
      key = f"other buffers under {LISTED_MIB} MiB"
    groups[key] = groups.get(key, 0) + size
  lines = [f"| {what} | {size / 2**20:,.0f} |"
           for what, size in sorted(groups.items(), key=lambda kv: -kv[1])]
  return "\n".join([f"| **total at the peak** | **{total / 2**20:,.0f}** |", *lines])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="7B", choices=CONFIGS)
  parser.add_argument("--row", nargs="+", default=["q_adam_mini + INT8 weights" + fits.IN_BACKWARD])
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    model, row = args.child
    config = dataclasses.replace(CONFIGS[model], scan_layers=True, remat=True)
    fits.measure(fits.ROWS[row], config)
    return
  flags = os.environ.get("XLA_FLAGS", "")
  machine = f"{compile_time.cpu_name()}, {os.cpu_count()} cores"
  out = pathlib.Path(__file__).resolve().parent / "results" / f"peak_breakdown_{jax.default_backend()}.md"
  sections = []
  for row in args.row:
    sections += [f"## {args.model}, `{row}`" + (f", `XLA_FLAGS={flags}`" if flags else ""), "",
                 f"`{shlex.join(['python', 'benchmarks/peak_breakdown.py', *sys.argv[1:]])}`"
                 + f" on {jax.default_backend().upper()} ({machine}), jax {jax.__version__}; "
                 f"batch {fits.BATCH[0]} x {fits.BATCH[1]}, the fits.py row.", "",
                 "| buffers live at the peak | MiB |", "|---|---:|",
                 measure_in_child(args.model, row), ""]
  with out.open("a") as f:
    f.write("\n".join(sections) + "\n")
  print("\n".join(sections))


if __name__ == "__main__":
  main()
