"""Static profile of the fused kernel, from the code the Triton compiler makes (no GPU).

    python benchmarks/kernel_static.py        # needs `pip install triton`

For every kernel variant the library can launch (``kernel_compile.variants()``),
compiled for sm_90 and sm_80: the tile and warps ``pallas_update.kernel_config``
chose, registers per thread and spills (``ptxas -v``), resident blocks per SM
allowed by registers, SASS instructions per element (``cuobjdump``; the whole
kernel over the elements one thread handles), whether every global access of
the leaf's buffers is predicated, the bytes a warp reads per tile row of each
float32 operand, and the bytes per parameter the launch moves. Writes
``benchmarks/results/kernel_static.md``.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import kernel_compile as kc  # noqa: E402
import results_file  # noqa: E402

import jax  # noqa: E402
import triton  # noqa: E402


def row(c: kc.Compiled) -> list[str]:
  v = c.variant
  leaf = [a for a in c.accesses if a.argument >= kc.SCALAR_ARGUMENTS]
  predicated = sum(a.predicated for a in leaf)
  tile = "x".join(map(str, v.config.tile))
  return [v.name, f"sm_{c.sm}", tile, str(v.config.num_warps), str(c.registers),
          str(c.spill_bytes), str(c.blocks_per_sm),
          f"{c.sass_instructions / c.elements_per_thread:.1f}",
          f"{predicated}/{len(leaf)}", ", ".join(f"{t}/{w}" for t, w in sorted(c.f32_rows)) or "-",
          f"{v.bytes_per_element:.2f}"]


def main() -> None:
  compiled = kc.compile_all(kc.variants())
  header = ["variant", "target", "tile", "warps", "registers", "spill B", "blocks/SM",
            "SASS/element", "predicated leaf accesses", "f32 load B/thread/warp", "B/param moved"]
  lines = [f"Produced by `python benchmarks/kernel_static.py` (jax {jax.__version__}, PyPI triton "
           f"{triton.__version__}, num_stages=1; compiled on a CPU machine, nothing run).", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row(c)) + " |" for c in compiled.values()]
  worst = max(compiled.values(), key=lambda c: c.sass_instructions / c.elements_per_thread)
  lines += ["", f"Spills anywhere: {sum(c.spill_bytes for c in compiled.values())} B. Fewest blocks "
            f"per SM: {min(c.blocks_per_sm for c in compiled.values())}. Most SASS per element: "
            f"{worst.sass_instructions / worst.elements_per_thread:.1f} ({worst.variant.name}, "
            f"sm_{worst.sm})."]
  results_file.write("kernel_static.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
