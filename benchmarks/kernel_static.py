"""Static profile of the fused kernels, from the code the Triton compiler makes (no GPU).

    python benchmarks/kernel_static.py        # needs `pip install triton`

For every kernel variant the library can launch (``kernel_compile.variants()``:
the Pallas kernel; ``kernel_compile.triton_variants()``: the ``@triton.jit`` kernel
of ``implementation="triton"``, rows named ``triton_...``), compiled for sm_90 and
sm_80: the tile and warps ``pallas_update.kernel_config`` (or
``triton_update.kernel_config``) chose, registers per thread and spills (``ptxas -v``), resident blocks per SM
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


WHY = """## Why these choices

Before this tuning (one 8192-element tile at 4 warps for every leaf, two divisions per element in
the quantizer, `ref[...]` accesses with no masks) the same compiler gave 168-255 registers, spills of
up to 164 B on sm_80 and 49-84 SASS instructions per element, and no load or store of an edge block
was predicated (reads past the leaf, writes into other programs' rows and past the buffers).

* Masks: every access of a block that can overhang the leaf is a masked `pallas.triton.load/store`;
  the mask exists only along an axis the leaf does not fill with whole tiles, so aligned leaves
  compile to the same unpredicated 16-byte vector accesses as before ("predicated" 1/N there is the
  scale store, which Triton predicates to one thread per column).
* Elements per thread: the sweep (4096x4096 columns and 32000x4096 rows, fp32/bf16, RTN/SR, fused)
  gave 8192-element tiles at 4 warps 167-239 registers (2 blocks/SM); 32 elements per thread gives
  at most 128 registers and 2-7 blocks/SM for 0-14% more instructions per element (the group max
  crosses more warps). Leaves whose row length is not a multiple of 4 (vocabularies of 50257 or
  32001 as the last axis) get scalar accesses with an address per element: 32 elements per thread
  took 211-254 registers (1 block/SM), so they get half the tile.
* Tile shape: column groups take 256x32 tiles, so a warp reads whole 128-byte lines of each float32
  row; row groups take 16x256. Triton gives the float32 operands the INT8 codes' layout (16
  elements per thread, to avoid layout conversions), so each thread's four 16-byte loads cover 64
  contiguous bytes and a single instruction touches half of each 32-byte sector; the other half is
  the same thread's next load, an L1 hit, so DRAM traffic is whole lines.
* Arithmetic: `quantize.encode` takes one reciprocal per group (`127^2/s`) and picks the level by
  comparing `y - k^2` with `(1-r)(2k+1)` instead of dividing by the level gap: no `div.full.f32`
  per element. The square root (`sqrt.approx.ftz.f32`) stays; it only decides between two
  neighbouring levels at exact boundaries, and the comparison corrects a low `k`.
* Budget: at H100 bandwidth (3.35 TB/s) and 14 B/param for the fused fp32 step, 132 SMs issuing
  one instruction per scheduler per cycle allow about 140 thread instructions per element; the
  most expensive variant here needs 75.

The `@triton.jit` kernel (rows `triton_...`, `implementation="triton"`) takes the same tiles with
half the elements per thread where the Pallas kernel gives a thread 32 (the tile halved across
groups), and computes as the jnp path does: an IEEE square root (`sqrt_rn`, about 20 instructions
against one for `sqrt.approx`) and no FMA contraction. At 32 elements per thread that took 140-160
registers (one block per SM); at 16 it stays at or under 128 with no spills, at about twice the
Pallas kernel's SASS per element (all within the 140-instruction budget but the INT8-weights
columns variants). Its edge masks are static like the Pallas kernel's.

Not run on a GPU yet: registers and instruction counts are static; `bash benchmarks/gpu_check.sh`
measures the speed.
""".splitlines()


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
  compiled = kc.compile_all(kc.variants() + kc.triton_variants(), sass=True)
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
  lines += ["", *WHY]
  results_file.write("kernel_static.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
