"""Compile the fused kernels with the Triton compiler on a machine without a GPU.

Pallas's Triton lowering runs on any host when ``jax.export`` lowers for CUDA;
the Triton-dialect module it builds is captured here and handed to the PyPI
``triton`` compiler, which turns it into PTX and a cubin (its bundled
``ptxas``) for any target. The ``@triton.jit`` kernel of ``implementation="triton"``
(:mod:`qadam_mini_jax.triton_update`) is compiled from its source as jax-triton
compiles it (16-byte aligned buffers, no FMA contraction). ``ptxas -v`` then
gives registers and spills, and ``cuobjdump`` the SASS. Used by
``tests/test_kernel_compile.py`` (CI) and ``benchmarks/kernel_static.py`` (the report).

Needs ``pip install triton`` (Linux x86-64 and aarch64 wheels); the captured
lowering is ``jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module``,
a JAX internal.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import multiprocessing
import os
import re
import subprocess
import tempfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qadam_mini_jax import pallas_update
from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import quantize as quantize_lib
from qadam_mini_jax import transform
from qadam_mini_jax import triton_update

TARGETS = (90, 80)  # sm_90 (H100, H200), sm_80 (A100)


class Variant(NamedTuple):
  """One kernel the library can launch: a leaf shape, its Adam-mini block and the flags."""

  shape: tuple[int, ...]
  reduced_axes: tuple[int, ...]  # the block's reduced axes (BlockSpec.axes)
  stochastic: bool
  fuse_step: bool
  p_dtype: Any
  g_dtype: Any
  int8_params: bool = False  # INT8 weights (codes and scales) in and out; fused step only
  kernel: str = "pallas"  # or "triton": the @triton.jit kernel (same arguments, same tiles)
  layers: int = 0  # the Triton kernel only: this many layers stacked ahead of ``shape``, one launch

  @property
  def layout(self) -> quantize_lib.GroupLayout:
    return transform.layout_for(partition_lib.BlockSpec(self.reduced_axes), self.shape,
                                transform.Int8Quantization())

  @property
  def config(self) -> pallas_update.KernelConfig:
    configure = triton_update.kernel_config if self.kernel == "triton" else pallas_update.kernel_config
    return configure(self.layout, self.int8_params)

  @property
  def ragged(self) -> bool:
    """Whether some block overhangs the leaf (then every access must be masked)."""
    tile, layout = self.config.tile, self.layout
    return bool(layout.a % tile[0] or layout.b % tile[1])

  @property
  def bytes_per_element(self) -> float:
    """Bytes the launch reads and writes per element of the leaf."""
    layout, n = self.layout, math.prod(self.shape)
    spec = partition_lib.BlockSpec(self.reduced_axes)
    axes = pallas_update.factor_axes(spec, layout)
    factors = (layout.a if axes["a_varies"] else 1) * (layout.b if axes["b_varies"] else 1)
    p, g = jnp.dtype(self.p_dtype).itemsize, jnp.dtype(self.g_dtype).itemsize
    scales = 4 * math.prod(layout.scales_shape) / n
    p = 1 + scales if self.int8_params else p
    read = g + 1 + scales + 4 * factors / n + (p if self.fuse_step else 0)
    return read + (p if self.fuse_step else g) + 1 + scales

  @property
  def leaf_arguments(self) -> range:
    """Kernel arguments of leaf-sized buffers: inputs, then outputs (:attr:`outputs`)."""
    return range(SCALAR_ARGUMENTS, self.outputs.stop)

  @property
  def outputs(self) -> range:
    """Output arguments: p (or u, or p codes and scales), m codes and scales."""
    inputs = 6 if self.int8_params else 5
    count = 4 if self.int8_params else 3
    return range(SCALAR_ARGUMENTS + inputs, SCALAR_ARGUMENTS + inputs + count)

  @property
  def element_arguments(self) -> tuple[int, ...]:
    """Arguments read or written once per element: p (or its codes), g, m codes, their outputs."""
    first = self.outputs.start
    if self.int8_params:
      return (2, 4, 5, first, first + 2)
    return (2, 3, 4, first, first + 1)

  @property
  def name(self) -> str:
    dtypes = "w8" if self.int8_params else "f32" if self.p_dtype == jnp.float32 else "bf16"
    if self.p_dtype != self.g_dtype:
      dtypes = f"p{jnp.dtype(self.p_dtype).itemsize * 8}g{jnp.dtype(self.g_dtype).itemsize * 8}"
    return "_".join([*(["triton"] if self.kernel == "triton" else []),
                     *([f"stack{self.layers}"] if self.layers else []),
        "cols" if self.layout.columns else "rows", "x".join(map(str, self.shape)), dtypes,
        "sr" if self.stochastic else "rtn", "fused" if self.fuse_step else "direction"])


COLUMNS, ROWS = (0,), (1,)  # per output neuron of an (in, out) kernel; per token of an embedding


def variants() -> list[Variant]:
  """Every flag combination on an aligned and a doubly ragged leaf of each layout,
  and the real ragged shapes (vocabularies of 50257 and 32001)."""
  out = []
  flags = [(sr, fuse, dt) for sr in (False, True) for fuse in (False, True)
           for dt in (jnp.float32, jnp.bfloat16)]
  for shape, axes in [((4096, 4096), COLUMNS), ((1000, 300), COLUMNS),
                      ((32000, 4096), ROWS), ((100, 300), ROWS)]:
    out += [Variant(shape, axes, sr, fuse, dt, dt) for sr, fuse, dt in flags]
  out += [Variant((4096, 4096), COLUMNS, False, True, jnp.float32, jnp.bfloat16),  # bf16 grads
          Variant((768, 50257), COLUMNS, True, True, jnp.float32, jnp.float32),     # GPT-2 head
          Variant((50257, 768), ROWS, True, True, jnp.float32, jnp.float32),        # GPT-2 embedding
          Variant((32001, 4096), ROWS, True, False, jnp.bfloat16, jnp.bfloat16),    # LLaMA + pad token
          Variant((4096, 32001), COLUMNS, True, False, jnp.bfloat16, jnp.bfloat16)]
  # INT8 weights (fused step only): both roundings on each kind of leaf, bf16 gradients.
  out += [Variant(shape, axes, sr, True, jnp.float32, jnp.float32, True)
          for shape, axes in [((4096, 4096), COLUMNS), ((1000, 300), COLUMNS),
                              ((32000, 4096), ROWS), ((100, 300), ROWS)] for sr in (False, True)]
  out += [Variant((4096, 4096), COLUMNS, True, True, jnp.bfloat16, jnp.bfloat16, True),
          Variant((32001, 4096), ROWS, True, True, jnp.bfloat16, jnp.bfloat16, True)]
  return out


def triton_variants() -> list[Variant]:
  """The ``@triton.jit`` kernel on the leaves of :func:`variants`: every flag on an
  aligned and a ragged leaf of each layout (float32 where aligned, bfloat16 where
  ragged: the kernel converts only where it loads and stores), the
  vocabulary-padded ones, INT8 weights and stacks in one launch."""
  out = [v._replace(kernel="triton") for v in variants()
         if not v.int8_params and v.p_dtype == v.g_dtype
         and (v.shape, v.p_dtype) in (((4096, 4096), jnp.float32), ((1000, 300), jnp.bfloat16),
                                      ((32000, 4096), jnp.float32), ((100, 300), jnp.bfloat16))]
  out += [Variant((32001, 4096), ROWS, True, False, jnp.bfloat16, jnp.bfloat16, kernel="triton"),
          Variant((4096, 32001), COLUMNS, True, True, jnp.float32, jnp.float32, kernel="triton")]
  out += [Variant(shape, axes, sr, True, jnp.float32, jnp.float32, True, kernel="triton")
          for shape, axes in [((4096, 4096), COLUMNS), ((1000, 300), COLUMNS),
                              ((32000, 4096), ROWS), ((100, 300), ROWS)] for sr in (False, True)]
  # A stack in one launch (the grid spans the layers): 7B's MLP kernels, aligned and ragged.
  out += [Variant((4096, 11008), COLUMNS, True, True, jnp.float32, jnp.float32, kernel="triton",
                  layers=32),
          Variant((1000, 300), COLUMNS, True, True, jnp.bfloat16, jnp.bfloat16, True,
                  kernel="triton", layers=3)]
  return out


def _arguments(variant: Variant):
  """Abstract arguments of a variant's launch (as ``fused_leaf_update`` takes them)."""
  layout, spec = variant.layout, partition_lib.BlockSpec(variant.reduced_axes)
  axes = pallas_update.factor_axes(spec, layout)
  s = jax.ShapeDtypeStruct
  lead = (variant.layers,) if variant.layers else ()
  factor = lead + (layout.a if axes["a_varies"] else 1, layout.b if axes["b_varies"] else 1)
  shape = lead + variant.shape
  codes = quantize_lib.QuantizedArray(s(shape, jnp.int8), s(lead + layout.scales_shape, jnp.float32))
  seeds = (6 if variant.int8_params else 4) + (1 if variant.layers else 0)
  args = (codes if variant.int8_params else s(shape, variant.p_dtype),
          s(shape, variant.g_dtype), codes, s(factor, jnp.float32), s((8,), jnp.float32),
          s((seeds,), jnp.uint32))
  flags = dict(layout=layout, stochastic=variant.stochastic, fuse_step=variant.fuse_step,
               params_stochastic=variant.stochastic if variant.int8_params else None, **axes)
  if variant.layers:
    flags["layers"] = variant.layers
  return args, flags


_TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "int8": "i8", "uint32": "u32"}


def triton_source(variant: Variant):
  """The ``@triton.jit`` kernel of ``variant`` as jax-triton hands it to the compiler."""
  from triton.compiler import ASTSource  # pylint: disable=g-import-not-at-top
  args, flags = _arguments(variant)
  captured = []

  def inputs(*a):
    captured.append(triton_update.launch(*a, **flags))
    return captured[0].inputs
  buffers = [*jax.eval_shape(inputs, *args), *captured[0].out_shapes]
  run = captured[0]
  kernel = triton_update.leaf_kernel(run.int8_params)
  signature = {name: "*" + _TRITON_TYPES[jnp.dtype(b.dtype).name]
               for name, b in zip(kernel.arg_names, buffers)}
  signature.update({name: "constexpr" for name in run.constants})
  attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(buffers))}  # XLA's buffers
  return ASTSource(kernel, signature, constexprs=run.constants, attrs=attrs)


@contextlib.contextmanager
def _captured_triton_modules():
  """Collect the text of every Triton module Pallas lowers inside the block."""
  from jax._src.pallas.triton import lowering  # pylint: disable=g-import-not-at-top
  texts, original = [], lowering.lower_jaxpr_to_triton_module

  def spy(*args, **kwargs):
    result = original(*args, **kwargs)
    texts.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  lowering.lower_jaxpr_to_triton_module = spy
  try:
    yield texts
  finally:
    lowering.lower_jaxpr_to_triton_module = original


def triton_ir(variant: Variant) -> str:
  """The Triton-dialect module Pallas builds for ``variant`` (lowered for CUDA, no GPU)."""
  args, flags = _arguments(variant)
  fn = lambda *a: pallas_update.fused_leaf_update(*a, backend="triton", **flags)
  with _captured_triton_modules() as texts:
    jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
  if len(texts) != 1:
    raise RuntimeError(f"{variant.name}: expected one Triton module, got {len(texts)}")
  return texts[0]


SCALAR_ARGUMENTS = 2  # the kernel's first arguments: hyperparameters (8) and seed words (4 or 6)


class GlobalAccess(NamedTuple):
  """One ``ld.global`` / ``st.global`` of the PTX."""

  op: str            # "ld" or "st"
  predicated: bool
  width_bits: int    # bits one thread's instruction moves
  argument: int      # which kernel argument's buffer it addresses (-1: unknown)
  line: str


_PARAM = re.compile(r"ld\.param\.[bu]64\s+(%rd\d+),\s*\[\w+_param_(\d+)\]")
_DEF = re.compile(r"^\s*(?:@!?%p\d+\s+)?[a-z][\w.]*\s+(%rd\d+),(.*);")
_ACCESS = re.compile(
    r"^\s*(@!?%p\d+\s+)?(ld|st)\.global(?:\.\w+)*?(?:\.v(\d))?\.[bsuf](\d+)\s.*?\[\s*(%rd\d+)")


def global_accesses(ptx: str) -> list[GlobalAccess]:
  """Every global load and store, with the kernel argument its address derives from.

  Addresses are followed through the 64-bit registers they are computed in
  (``add.s64 %rd3, %rd93, %rd101`` with ``%rd93`` loaded from ``param_3``).
  """
  origin: dict[str, int] = {}
  out = []
  for line in ptx.splitlines():
    if (param := _PARAM.search(line)):
      origin[param.group(1)] = int(param.group(2))
    elif (access := _ACCESS.match(line)):
      guard, op, vec, bits, address = access.groups()
      out.append(GlobalAccess(op, guard is not None, int(vec or 1) * int(bits),
                              origin.get(address, -1), line.strip()))
    elif (define := _DEF.match(line)):
      sources = [origin[r] for r in re.findall(r"%rd\d+", define.group(2)) if r in origin]
      if sources:
        origin[define.group(1)] = sources[0]
  return out


_BLOCKED = re.compile(r"^#(\w+) = #ttg\.blocked<\{sizePerThread = \[(\d+), (\d+)\], "
                      r"threadsPerWarp = \[(\d+), (\d+)\]")
_LOAD = re.compile(r"tt\.load [^:]*: tensor<(\d+)x(\d+)x!tt\.ptr<(\w+)>, #(\w+)>")


def float32_load_rows(ttgir: str) -> set[tuple[int, int]]:
  """``(bytes per thread, bytes per warp)`` along one tile row, for each float32 tile load.

  From the load's blocked layout: contiguous elements per thread, times the
  threads along the row (capped by the tile's width).
  """
  layouts = {m.group(1): (int(m.group(3)), int(m.group(5)))
             for m in map(_BLOCKED.match, ttgir.splitlines()) if m}
  out = set()
  for load in _LOAD.finditer(ttgir):
    rows, width, elem, layout = load.groups()
    if elem == "f32" and int(rows) > 1 and int(width) > 1 and layout in layouts:
      per_thread, threads = layouts[layout]
      out.add((4 * min(per_thread, int(width)), 4 * min(per_thread * threads, int(width))))
  return out


@dataclasses.dataclass
class Compiled:
  """What the compiler and ``ptxas -v`` say of one variant on one target."""

  variant: Variant
  sm: int
  registers: int
  spill_bytes: int  # spill stores + spill loads
  sass_instructions: int | None  # None unless asked for (cuobjdump: half a compile's time)
  accesses: list[GlobalAccess]
  f32_rows: set[tuple[int, int]]  # float32 loads: (bytes per thread, per warp) along a row
  ptx: str

  @property
  def threads(self) -> int:
    return 32 * self.variant.config.num_warps

  @property
  def elements_per_thread(self) -> float:
    return math.prod(self.variant.config.tile) / self.threads

  @property
  def blocks_per_sm(self) -> int:
    """Resident blocks per SM allowed by registers (64K per SM, 32 blocks at most)."""
    per_block = self.threads * self.registers
    return min(32, 65536 // per_block) if per_block else 32


def _nvidia_tools(sm: int) -> tuple[str, str]:
  from triton.backends.nvidia.compiler import get_ptxas  # pylint: disable=g-import-not-at-top
  ptxas = get_ptxas(sm).path
  return ptxas, os.path.join(os.path.dirname(ptxas), "cuobjdump")


def compile_variant(variant: Variant, sm: int, ttir: str | None = None,
                    sass: bool = False) -> Compiled:
  """Compile ``variant`` for ``sm`` with the Triton compiler and read its statistics.

  ``sass``: also disassemble the cubin and count its SASS instructions.
  """
  import triton  # pylint: disable=g-import-not-at-top
  from triton.backends.compiler import GPUTarget  # pylint: disable=g-import-not-at-top
  from triton.backends.nvidia.compiler import sm_arch_from_capability  # pylint: disable=g-import-not-at-top
  ptxas, cuobjdump = _nvidia_tools(sm)
  options = {"num_warps": variant.config.num_warps, "num_stages": 1}
  with tempfile.TemporaryDirectory() as tmp:
    if variant.kernel == "triton":
      source = triton_source(variant)
      options["enable_fp_fusion"] = False  # as triton_update.fused_leaf_update launches it
    else:
      source = os.path.join(tmp, "kernel.ttir")
      with open(source, "w") as f:
        f.write(triton_ir(variant) if ttir is None else ttir)
    kernel = triton.compile(source, target=GPUTarget("cuda", sm, 32), options=options)
    ptx, cubin = kernel.asm["ptx"], os.path.join(tmp, "kernel.cubin")
    with open(os.path.join(tmp, "kernel.ptx"), "w") as f:
      f.write(ptx)
    log = subprocess.run(
        [ptxas, "-v", f"--gpu-name={sm_arch_from_capability(sm)}",
         os.path.join(tmp, "kernel.ptx"), "-o", cubin],
        check=True, capture_output=True, text=True).stderr
    instructions = None
    if sass:
      listing = subprocess.run([cuobjdump, "-sass", cubin], check=True, capture_output=True,
                               text=True).stdout
      instructions = sum(1 for line in listing.splitlines()
                         if re.match(r"\s+/\*[0-9a-f]+\*/\s+[A-Z@]", line) and "NOP;" not in line)
  registers = int(re.search(r"Used (\d+) registers", log).group(1))
  spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
  return Compiled(variant, sm, registers, int(spills.group(1)) + int(spills.group(2)),
                  instructions, global_accesses(ptx), float32_load_rows(kernel.asm["ttgir"]), ptx)


def compile_all(variants: list[Variant], targets=TARGETS,
                sass: bool = False) -> dict[tuple[Variant, int], Compiled]:
  """:func:`compile_variant` of each variant on each target, a process per core.

  Lowering runs here (it is quick); the Triton compiler and ``ptxas`` run in
  the workers.
  """
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton < 3.10's default, explicit
  ir = {v: triton_ir(v) for v in variants if v.kernel == "pallas"}
  spawn = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(os.cpu_count() or 1, mp_context=spawn) as pool:
    jobs = {(v, sm): pool.submit(compile_variant, v, sm, ir.get(v), sass)
            for v in variants for sm in targets}
    return {key: job.result() for key, job in jobs.items()}
