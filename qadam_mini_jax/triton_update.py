"""The fused Q-Adam-mini leaf update as a ``@triton.jit`` kernel, called through jax-triton.

The same step as :mod:`.pallas_update` (Adam-mini, arXiv:2406.16793, Alg. 1, with
INT8 ``m`` and, optionally, the fused parameter step and INT8 weights), written in
Triton's language and launched with ``jax_triton.triton_call``: the path JAX
points to now that Pallas's Triton backend is deprecated (jax 0.11). What is
shared with the Pallas kernel rather than written twice: the ``(a, b)`` view of
the quantization grouping and its tiles (:func:`.pallas_update.kernel_config`),
the scalar packing (``hyper`` and ``seeds``, built by :mod:`.leaf_update`), the
argument order, and the constants of the code (:mod:`.quantize`) and of the
rounding hash (:mod:`.random_bits`). The arithmetic is the jnp path's, in the
same order, with IEEE division and square root (``div_rn``, ``sqrt_rn``) and
no contraction into FMAs: the step's equations evaluated in float32 one
operation at a time, bit for bit (XLA itself contracts some products into FMAs,
so against XLA's jnp path the Pallas kernel's bound holds). A stack of layers
ahead of the leaf's own axes is one launch whose grid spans the layers, each
rounding on its own stream (:func:`.random_bits.layer_seeds`, in the kernel).

:func:`leaf_kernel` builds the kernel with ``triton.jit``: compiled on a GPU, or,
in a process started with ``TRITON_INTERPRET=1``, run by Triton's interpreter on
CPU torch tensors (:func:`run_interpreted`: the suite's test of this very kernel
without a GPU). jax-triton and Triton are
the ``gpu`` extra (``pip install 'qadam_mini_jax[gpu]'``), imported when a
kernel is first needed.
"""

from __future__ import annotations

import functools
import os
import threading
import types
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qadam_mini_jax import pallas_update
from qadam_mini_jax import quantize as quantize_lib
from qadam_mini_jax import random_bits

EXTRA = "pip install 'qadam_mini_jax[gpu]'"


class TritonMissing(ImportError):
  """jax-triton or Triton is not installed (or cannot run here)."""


def _import(module: str):
  try:
    return __import__(module, fromlist=["_"])
  except ImportError as e:
    raise TritonMissing(f"implementation='triton' needs {module} ({EXTRA}; jax-triton also "
                        f"needs a CUDA jaxlib): {e}") from e


# --- Triton device code. Plain functions here; :func:`leaf_kernel` compiles them
# (``triton.jit``) or interprets them. Names below are those the kernel sees.


def _mix32(x):
  """:func:`.random_bits.mix32` (uint32)."""
  x = x ^ (x >> 16)
  x = x * M1
  x = x ^ (x >> 15)
  x = x * M2
  return x ^ (x >> 15)


def _layer_seeds(s0, s1, layer):
  """:func:`.random_bits.layer_seeds`: the stream of one layer of a stacked leaf."""
  t0 = _mix32(s0 ^ _mix32(layer * GOLDEN + GOLDEN))
  return t0, _mix32(t0 ^ s1)


def _uniform(index, s0, s1):
  """:func:`.random_bits.bits_to_uniform` of :func:`.random_bits.element_bits`."""
  bits = _mix32(_mix32(index ^ s0) + s1)
  return (bits >> 8).to(tl.float32) * TWO_TO_MINUS_24


def _decode(codes, scale, LINEAR: tl.constexpr):
  """:func:`.quantize.decode`."""
  c = codes.to(tl.float32)
  if LINEAR:
    return c * INV_QMAX * scale
  return c * tl.abs(c) * INV_LEVELS * scale


def _encode(x, scale, r, LINEAR: tl.constexpr):
  """:func:`.quantize.encode`: int8 codes of ``x`` in groups of max ``scale``."""
  safe = tl.where(scale > 0, scale, 1.0)
  levels = tl.full(safe.shape, QMAX if LINEAR else LEVELS, tl.float32)
  y = tl.abs(x) * tl.where(scale > 0, tl.div_rn(levels, safe), 0.0)
  if LINEAR:
    k = tl.floor(y)
    up = y - k >= 1.0 - r
  else:
    k = tl.floor(tl.sqrt_rn(y))
    up = y - k * k >= (1.0 - r) * (2.0 * k + 1.0)
  code = tl.minimum(tl.where(up, k + 1.0, k), QMAX)
  return tl.where(x < 0, -code, code).to(tl.int8)


def _coarse_scale(scale, DROP: tl.constexpr):
  """:func:`.quantize.coarse_scale` with ``23 - DROP`` mantissa bits."""
  bits = scale.to(tl.uint32, bitcast=True) + ((1 << DROP) - 1)
  return (bits & (0xFFFFFFFF ^ ((1 << DROP) - 1))).to(tl.float32, bitcast=True)


def _load(pointer, mask, MASKED: tl.constexpr):
  """A load, masked with zeros outside the leaf where the block can overhang it."""
  if MASKED:
    return tl.load(pointer, mask=mask, other=0)
  return tl.load(pointer)


def _store(pointer, value, mask, MASKED: tl.constexpr):
  if MASKED:
    tl.store(pointer, value, mask=mask)
  else:
    tl.store(pointer, value)


def _requantize(x, index, seed_ptr, WORD: tl.constexpr, layer, LAYERS: tl.constexpr, codes_ptr,
                scales_ptr, offsets, mask, EDGE: tl.constexpr, scale_offsets, scale_mask,
                SCALE_EDGE: tl.constexpr, GROUP_AXIS: tl.constexpr, STOCHASTIC: tl.constexpr,
                WEIGHTS: tl.constexpr, DROP: tl.constexpr):
  """Group max (masked loads gave 0 outside the leaf, so padding never raises it), encode."""
  scale = tl.max(tl.abs(x), axis=GROUP_AXIS, keep_dims=True)
  if WEIGHTS:
    scale = _coarse_scale(scale, DROP)
  if STOCHASTIC:
    s0 = tl.load(seed_ptr + WORD).to(tl.uint32, bitcast=True)
    s1 = tl.load(seed_ptr + WORD + 1).to(tl.uint32, bitcast=True)
    if LAYERS:
      s0, s1 = _layer_seeds(s0, s1, layer)
    r = _uniform(index, s0, s1)
  else:
    r = 0.5
  _store(codes_ptr + offsets, _encode(x, scale, r, WEIGHTS), mask, EDGE)
  _store(scales_ptr + scale_offsets, scale, scale_mask, SCALE_EDGE)


def _leaf_step(hyper_ptr, seed_ptr, p_ptr, p_scales_ptr, g_ptr, codes_ptr, scales_ptr,
               factor_ptr, out_ptr, out_scales_ptr, codes_out_ptr, scales_out_ptr,
               A: tl.constexpr, B: tl.constexpr, STRIDE: tl.constexpr, GROUPS: tl.constexpr,
               T0: tl.constexpr, T1: tl.constexpr, TILES_B: tl.constexpr,
               COLUMNS: tl.constexpr, A_VARIES: tl.constexpr, B_VARIES: tl.constexpr,
               STOCHASTIC: tl.constexpr, FUSE_STEP: tl.constexpr, INT8_PARAMS: tl.constexpr,
               PARAMS_STOCHASTIC: tl.constexpr, DROP: tl.constexpr, LAYERS: tl.constexpr,
               FACTOR_SIZE: tl.constexpr):
  """One tile of the ``(A, B)`` view (row-major) of one layer, as ``pallas_update._kernel``.

  With ``LAYERS`` the arrays stack that many layers ahead of their ``(A, B)``
  views and the grid's second axis is the layer: each has its own rounding
  streams (those of its index after the first, ``seeds[-1]``)."""
  pid = tl.program_id(0)
  layer = tl.program_id(1)
  if LAYERS:  # move every pointer to this layer (64-bit: a stack may pass 2^31 elements)
    leaf = layer.to(tl.int64) * (A * B)
    grouped = layer.to(tl.int64) * (GROUPS * (B if COLUMNS else A))
    p_ptr += leaf
    g_ptr += leaf
    codes_ptr += leaf
    out_ptr += leaf
    codes_out_ptr += leaf
    scales_ptr += grouped
    scales_out_ptr += grouped
    factor_ptr += layer.to(tl.int64) * FACTOR_SIZE
    if INT8_PARAMS:
      p_scales_ptr += grouped
      out_scales_ptr += grouped
    first_word: tl.constexpr = 6 if INT8_PARAMS else 4
    layer = (tl.load(seed_ptr + first_word) + layer).to(tl.uint32, bitcast=True)
  row0 = (pid // TILES_B) * T0
  col0 = (pid % TILES_B) * T1
  rows = row0 + tl.arange(0, T0)[:, None]
  cols = col0 + tl.arange(0, T1)[None, :]
  # Masked only along an axis the leaf does not fill with whole tiles (static), so
  # an aligned leaf keeps unpredicated 16-byte vector accesses.
  ROW_EDGE: tl.constexpr = A % T0 != 0
  COL_EDGE: tl.constexpr = B % T1 != 0
  EDGE: tl.constexpr = ROW_EDGE or COL_EDGE
  mask = (rows < A) & (cols < B)
  offsets = rows * B + cols
  if COLUMNS:  # one group of rows per tile: scales (GROUPS, B)
    scale_offsets = (row0 // T0) * B + cols
    scale_mask = cols < B
    SCALE_EDGE: tl.constexpr = COL_EDGE
    group_axis: tl.constexpr = 0
  else:  # one group of columns per tile: scales (A, GROUPS)
    scale_offsets = rows * GROUPS + col0 // T1
    scale_mask = rows < A
    SCALE_EDGE: tl.constexpr = ROW_EDGE
    group_axis: tl.constexpr = 1
  if A_VARIES and B_VARIES:
    factor = _load(factor_ptr + offsets, mask, EDGE)
  elif A_VARIES:
    factor = _load(factor_ptr + rows, rows < A, ROW_EDGE)
  elif B_VARIES:
    factor = _load(factor_ptr + cols, cols < B, COL_EDGE)
  else:
    factor = tl.load(factor_ptr)

  b1 = tl.load(hyper_ptr)
  one_minus_b1 = tl.load(hyper_ptr + 1)
  g = _load(g_ptr + offsets, mask, EDGE).to(tl.float32)
  m = b1 * _decode(_load(codes_ptr + offsets, mask, EDGE),
                   _load(scales_ptr + scale_offsets, scale_mask, SCALE_EDGE),
                   False) + one_minus_b1 * g
  u = m * factor
  if FUSE_STEP:  # -lr * (u + wd * p), then p + that: the q_adam_mini chain
    if INT8_PARAMS:
      p = _decode(_load(p_ptr + offsets, mask, EDGE),
                  _load(p_scales_ptr + scale_offsets, scale_mask, SCALE_EDGE), True)
    else:
      p = _load(p_ptr + offsets, mask, EDGE).to(tl.float32)
    neg_lr = tl.load(hyper_ptr + 2)
    wd = tl.load(hyper_ptr + 3)
    u = p + neg_lr * (u + wd * p)
  if not INT8_PARAMS:
    _store(out_ptr + offsets, u.to(out_ptr.dtype.element_ty), mask, EDGE)

  # The element's flat index in the whole leaf: this tile may be in one shard.
  i0 = tl.load(seed_ptr + 2).to(tl.uint32, bitcast=True)
  j0 = tl.load(seed_ptr + 3).to(tl.uint32, bitcast=True)
  index = (rows.to(tl.uint32) + i0) * STRIDE + cols.to(tl.uint32) + j0
  if INT8_PARAMS:
    _requantize(u, index, seed_ptr, 4, layer, LAYERS, out_ptr, out_scales_ptr, offsets, mask,
                EDGE, scale_offsets, scale_mask, SCALE_EDGE, group_axis, PARAMS_STOCHASTIC, True,
                DROP)
  _requantize(m, index, seed_ptr, 0, layer, LAYERS, codes_out_ptr, scales_out_ptr, offsets, mask,
              EDGE, scale_offsets, scale_mask, SCALE_EDGE, group_axis, STOCHASTIC, False, DROP)


def _float_params_kernel(hyper_ptr, seed_ptr, p_ptr, g_ptr, codes_ptr, scales_ptr, factor_ptr,
                         out_ptr, codes_out_ptr, scales_out_ptr,
                         A: tl.constexpr, B: tl.constexpr, STRIDE: tl.constexpr,
                         GROUPS: tl.constexpr, T0: tl.constexpr, T1: tl.constexpr,
                         TILES_B: tl.constexpr, COLUMNS: tl.constexpr, A_VARIES: tl.constexpr,
                         B_VARIES: tl.constexpr, STOCHASTIC: tl.constexpr,
                         FUSE_STEP: tl.constexpr, LAYERS: tl.constexpr, FACTOR_SIZE: tl.constexpr):
  """Arguments as the Pallas kernel's with a float ``p`` (or ``g`` when not fused)."""
  _leaf_step(hyper_ptr, seed_ptr, p_ptr, p_ptr, g_ptr, codes_ptr, scales_ptr, factor_ptr,
             out_ptr, out_ptr, codes_out_ptr, scales_out_ptr, A, B, STRIDE, GROUPS, T0, T1,
             TILES_B, COLUMNS, A_VARIES, B_VARIES, STOCHASTIC, FUSE_STEP, False, False, 0,
             LAYERS, FACTOR_SIZE)


def _int8_params_kernel(hyper_ptr, seed_ptr, p_codes_ptr, p_scales_ptr, g_ptr, codes_ptr,
                        scales_ptr, factor_ptr, p_codes_out_ptr, p_scales_out_ptr,
                        codes_out_ptr, scales_out_ptr,
                        A: tl.constexpr, B: tl.constexpr, STRIDE: tl.constexpr,
                        GROUPS: tl.constexpr, T0: tl.constexpr, T1: tl.constexpr,
                        TILES_B: tl.constexpr, COLUMNS: tl.constexpr, A_VARIES: tl.constexpr,
                        B_VARIES: tl.constexpr, STOCHASTIC: tl.constexpr,
                        PARAMS_STOCHASTIC: tl.constexpr, DROP: tl.constexpr,
                        LAYERS: tl.constexpr, FACTOR_SIZE: tl.constexpr):
  """Arguments as the Pallas kernel's with INT8 weights (codes and scales in and out)."""
  _leaf_step(hyper_ptr, seed_ptr, p_codes_ptr, p_scales_ptr, g_ptr, codes_ptr, scales_ptr,
             factor_ptr, p_codes_out_ptr, p_scales_out_ptr, codes_out_ptr, scales_out_ptr,
             A, B, STRIDE, GROUPS, T0, T1, TILES_B, COLUMNS, A_VARIES, B_VARIES, STOCHASTIC,
             True, True, PARAMS_STOCHASTIC, DROP, LAYERS, FACTOR_SIZE)


_DEVICE_FUNCTIONS = ("_mix32", "_layer_seeds", "_uniform", "_decode", "_encode", "_coarse_scale",
                     "_load", "_store", "_requantize", "_leaf_step", "_float_params_kernel",
                     "_int8_params_kernel")


@functools.cache
def leaf_kernel(int8_params: bool):
  """The ``triton.jit`` kernel (interpreted where ``TRITON_INTERPRET=1`` was set
  before Triton was imported).

  Its device functions are jitted over one namespace that also holds the
  constants, so this module imports without Triton.
  """
  triton = _import("triton")
  tl_module = _import("triton.language")
  scope = dict(globals(), tl=tl_module, **_constants(tl_module))
  for name in _DEVICE_FUNCTIONS:
    raw = globals()[name]
    scope[name] = triton.jit(types.FunctionType(raw.__code__, scope, name, raw.__defaults__))
  return scope["_int8_params_kernel" if int8_params else "_float_params_kernel"]


def _constants(tl_module) -> dict[str, Any]:
  """The code's and the hash's constants, as the kernel sees them (constexpr)."""
  c = tl_module.constexpr
  return dict(M1=c(int(random_bits.M1)), M2=c(int(random_bits.M2)),
              GOLDEN=c(int(random_bits.GOLDEN)),
              TWO_TO_MINUS_24=c(2.0**-24), QMAX=c(float(quantize_lib.QMAX)),
              LEVELS=c(float(quantize_lib.QMAX * quantize_lib.QMAX)),
              INV_QMAX=c(float(np.float32(1.0 / quantize_lib.QMAX))),
              INV_LEVELS=c(float(np.float32(1.0 / quantize_lib.QMAX**2))))


def kernel_config(layout: quantize_lib.GroupLayout,
                  int8_params: bool = False) -> pallas_update.KernelConfig:
  """The Pallas kernel's tile and warps (:func:`.pallas_update.kernel_config`), with
  the tile halved across groups where it gives a thread 32 elements: there the
  IEEE square root (``sqrt_rn``, the jnp path's) took 140-160 registers, one
  block per SM; at 16 every variant stays at or under 128 (``benchmarks/kernel_static.py``)."""
  tile, num_warps = pallas_update.kernel_config(layout, int8_params)
  across = 1 if layout.columns else 0
  if tile[0] * tile[1] >= 32 * 32 * num_warps and tile[across] > 1:
    tile = tuple(n // 2 if axis == across else n for axis, n in enumerate(tile))
  return pallas_update.KernelConfig(tile, num_warps)


class Launch(NamedTuple):
  """One launch of the kernel: arguments in order, outputs, grid and constants."""

  int8_params: bool
  inputs: tuple[Any, ...]  # arrays, in the kernel's argument order
  out_shapes: tuple[jax.ShapeDtypeStruct, ...]
  aliases: dict[int, int]  # input position -> output position (buffers donated in place)
  grid: tuple[int]
  constants: dict[str, Any]  # the kernel's constexpr arguments
  num_warps: int


def launch(p, g, q: quantize_lib.QuantizedArray, factor, hyper, seeds, *,
           layout: quantize_lib.GroupLayout, stochastic: bool, fuse_step: bool,
           a_varies: bool, b_varies: bool, stride: int | None = None,
           params_stochastic: bool | None = None, layers: int = 0) -> Launch:
  """The :class:`Launch` of :func:`fused_leaf_update` (arguments as there)."""
  pallas_update.check_group_size(layout.group_size)
  int8_params = params_stochastic is not None
  if int8_params and not fuse_step:
    raise ValueError("INT8 weights are written by the fused step only (fuse_step=True).")
  a, b, groups = layout.a, layout.b, layout.groups
  if a * b >= 2**31:
    raise ValueError(f"The Triton kernel indexes a layer with int32: {layout.shape} has "
                     f"{a * b} elements; use implementation='xla' or shard it.")
  tile, num_warps = kernel_config(layout, int8_params)
  tiles_a, tiles_b = -(-a // tile[0]), -(-b // tile[1])
  lead = (layers,) if layers else ()
  scales_2d = lead + ((groups, b) if layout.columns else (a, groups))
  grouped = lambda x: (x.codes.reshape(lead + (a, b)), x.scales.reshape(scales_2d))
  moment_shapes = (jax.ShapeDtypeStruct(lead + (a, b), jnp.int8),
                   jax.ShapeDtypeStruct(scales_2d, jnp.float32))
  constants = dict(A=a, B=b, STRIDE=b if stride is None else stride, GROUPS=groups,
                   T0=tile[0], T1=tile[1], TILES_B=tiles_b, COLUMNS=layout.columns,
                   A_VARIES=a_varies, B_VARIES=b_varies, STOCHASTIC=stochastic, LAYERS=layers,
                   FACTOR_SIZE=(a if a_varies else 1) * (b if b_varies else 1))
  if int8_params:
    param_in, param_shapes, aliases = grouped(p), moment_shapes, {2: 0, 3: 1, 5: 2, 6: 3}
    constants.update(PARAMS_STOCHASTIC=bool(params_stochastic),
                     DROP=23 - quantize_lib.WEIGHT_SCALE_BITS)
  else:
    param_in = (p.reshape(lead + (a, b)),)
    param_shapes = (jax.ShapeDtypeStruct(lead + (a, b), p.dtype if fuse_step else g.dtype),)
    aliases = {2 if fuse_step else 3: 0, 4: 1, 5: 2}
    constants.update(FUSE_STEP=fuse_step)
  inputs = (hyper, seeds, *param_in, g.reshape(lead + (a, b)), *grouped(q), factor)
  return Launch(int8_params, inputs, (*param_shapes, *moment_shapes), aliases,
                (tiles_a * tiles_b, max(layers, 1)), constants, num_warps)


def unpack(outputs, layout: quantize_lib.GroupLayout, int8_params: bool, layers: int = 0):
  """``(out, QuantizedArray)`` of the kernel's outputs in the leaf's shapes (``layers`` ahead)."""
  lead = (layers,) if layers else ()
  ungrouped = lambda c, s: quantize_lib.QuantizedArray(
      c.reshape(lead + layout.shape), s.reshape(lead + layout.scales_shape))
  *out, codes, scales = outputs
  return ((ungrouped(*out) if int8_params else out[0].reshape(lead + layout.shape)),
          ungrouped(codes, scales))


#: ``"jax_triton"``: compiled, on a CUDA GPU; ``"interpreter"``: Triton's interpreter
#: on the CPU through a host callback (tests; needs ``TRITON_INTERPRET=1`` and torch).
BACKENDS = ("jax_triton", "interpreter")


def backend() -> str:
  """The backend ``implementation="triton"`` takes on this platform.

  Raises:
    TritonMissing: without the ``gpu`` extra on a GPU (or Triton and torch on
      the CPU), in one line naming it.
    ValueError: on other platforms, or on the CPU without ``TRITON_INTERPRET=1``.
  """
  platform = jax.default_backend()
  if platform == "gpu":
    _import("jax_triton")
    return "jax_triton"
  if platform != "cpu":
    raise ValueError(f"implementation='triton' runs on CUDA GPUs; this platform is {platform!r}: "
                     "use 'xla'.")
  if os.environ.get("TRITON_INTERPRET") != "1":
    raise ValueError("implementation='triton' runs on the CPU only under Triton's interpreter: "
                     "set TRITON_INTERPRET=1 before Triton is imported (tests), or use 'xla'.")
  _import("triton")
  _import("torch")
  return "interpreter"


@functools.partial(jax.jit, static_argnames=(
    "layout", "stochastic", "fuse_step", "a_varies", "b_varies", "backend", "stride",
    "params_stochastic", "layers"))
def fused_leaf_update(p, g, q: quantize_lib.QuantizedArray, factor, hyper, seeds, *,
                      layout: quantize_lib.GroupLayout, stochastic: bool, fuse_step: bool,
                      a_varies: bool, b_varies: bool, backend: str, stride: int | None = None,
                      params_stochastic: bool | None = None, layers: int = 0):
  """One fused step of an INT8 leaf through ``jax_triton.triton_call``.

  Arguments and results as :func:`.pallas_update.fused_leaf_update`, with
  ``backend`` one of :data:`BACKENDS`; parameters, ``m`` and INT8 weights are
  updated in place of their (donated) buffers. ``layers``: the arrays stack
  that many layers of ``layout`` ahead of it (``factor`` too), one launch over
  all of them; ``seeds`` then ends with the index of the first
  (:func:`.random_bits.layer_seeds` streams per layer).
  """
  run = launch(p, g, q, factor, hyper, seeds, layout=layout, stochastic=stochastic,
               fuse_step=fuse_step, a_varies=a_varies, b_varies=b_varies, stride=stride,
               params_stochastic=params_stochastic, layers=layers)
  if backend == "interpreter":
    outputs = jax.pure_callback(lambda *inputs: run_interpreted(run._replace(inputs=inputs)),
                                run.out_shapes, *run.inputs)
  elif backend == "jax_triton":
    outputs = _import("jax_triton").triton_call(
        *run.inputs, kernel=leaf_kernel(run.int8_params), out_shape=run.out_shapes,
        grid=run.grid, input_output_aliases=run.aliases, num_warps=run.num_warps, num_stages=1,
        enable_fp_fusion=False, name="q_adam_mini_leaf", **run.constants)
  else:
    raise ValueError(f"Unknown Triton backend {backend!r}; expected one of {BACKENDS}.")
  return unpack(outputs, layout, run.int8_params, layers)


#: Triton's interpreter patches ``triton.language`` while it runs: one kernel at a time
#: (the callbacks of a leaf's shards, one per device, come from several threads).
_INTERPRETER_LOCK = threading.Lock()


def run_interpreted(run: Launch) -> list[np.ndarray]:
  """The kernel of ``run`` under Triton's interpreter on CPU torch tensors: its outputs.

  What the suite tests without a GPU (``torch`` CPU build), in a process started
  with ``TRITON_INTERPRET=1`` (Triton's own functions are interpreted only when
  it is set at import). uint32 seeds go in as their int32 bit patterns and
  bfloat16 arrays through int16 views.
  """
  torch = _import("torch")
  if not os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError("run_interpreted needs TRITON_INTERPRET=1 set before Triton is imported.")

  def to_torch(x):
    x = np.asarray(x)
    if x.dtype == jnp.bfloat16:
      return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    if x.dtype == np.uint32:
      x = x.view(np.int32)
    return torch.from_numpy(x.copy())

  def empty(shape):
    if shape.dtype == jnp.bfloat16:
      return torch.zeros(shape.shape, dtype=torch.bfloat16)
    return torch.from_numpy(np.zeros(shape.shape, shape.dtype))

  def to_numpy(t, shape):
    if shape.dtype == jnp.bfloat16:
      return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy()

  outputs = [empty(s) for s in run.out_shapes]
  with _INTERPRETER_LOCK:
    leaf_kernel(run.int8_params)[run.grid](
        *(to_torch(x) for x in run.inputs), *outputs, **run.constants)
  return [to_numpy(t, s) for t, s in zip(outputs, run.out_shapes)]
