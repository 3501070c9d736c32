"""Fused Q-Adam-mini leaf update as a Pallas kernel (Triton backend on GPU).

One pass over an INT8-stored leaf: dequantize ``m``, ``m <- b1*m + (1-b1)*g``,
``u = m * r_B`` with the block factor ``r_B = 1/((1-b1^t)(sqrt(v_B)/sqrt(1-b2^t) + eps))``
(Adam-mini, arXiv:2406.16793, Alg. 1),
optionally ``u <- -lr*(u + wd*p)`` (decoupled weight decay and learning rate, the
rest of the ``q_adam_mini`` chain) and ``p <- p + u``, then re-quantize ``m``
group-wise with round-to-nearest or stochastic rounding. The arithmetic is that
of :mod:`qadam_mini_jax.quantize` and :mod:`qadam_mini_jax.transform`, in the
same order, and the rounding bits are :func:`qadam_mini_jax.random_bits.element_bits`
of the element's flat index, generated in the kernel.

Layout: the leaf is viewed as ``(R, L)`` = (rows, row length) of its quantization
grouping (:func:`qadam_mini_jax.quantize.group_layout`); one program handles
``block_rows`` rows of one group (``group_size`` columns, a power of two). The
block factors come from the XLA reduction pass as an ``(R|1, L|1)`` array:
only the axes they vary along are materialised.

Lowering lives behind :func:`pallas_call_options`: ``"triton"`` (Pallas's Triton
lowering, GPU) or ``"interpret"`` (any platform, for tests). A Mosaic GPU or
jax-triton variant slots in there.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import quantize as quantize_lib
from qadam_mini_jax import random_bits

BACKENDS = ("triton", "interpret")
_TILE_ELEMENTS = 4096  # elements per program


def pallas_call_options(backend: str) -> dict[str, Any]:
  """``pallas_call`` keyword arguments selecting the lowering."""
  if backend == "interpret":
    return {"interpret": True}
  if backend == "triton":
    from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
    with warnings.catch_warnings():  # jax >= 0.11 deprecates the Triton backend itself
      warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*[Tt]riton.*")
      return {"compiler_params": pl_triton.CompilerParams(num_warps=4, num_stages=1)}
  raise ValueError(f"Unknown Pallas backend {backend!r}; expected one of {BACKENDS}.")


def default_backend() -> str:
  """``"triton"`` on a CUDA GPU, else ``"interpret"``."""
  return "triton" if jax.default_backend() == "gpu" else "interpret"


def check_group_size(group_size: int) -> None:
  if group_size & (group_size - 1):
    raise ValueError(f"The Pallas kernel needs a power-of-two group size (Triton block "
                     f"shapes), got {group_size}; use implementation='xla' or "
                     "Int8Quantization(group_size=256).")


def _kernel(hyper_ref, seed_ref, p_ref, g_ref, codes_ref, scales_ref, factor_ref,
            out_ref, codes_out_ref, scales_out_ref, *,
            rows: int, row_length: int, block_rows: int, group_size: int,
            groups: int, stochastic: bool, fuse_step: bool):
  pid = pl.program_id(0)
  row0 = (pid // groups) * block_rows
  col0 = (pid % groups) * group_size
  shape = (block_rows, group_size)
  r = row0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  c = col0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  valid = (r < rows) & (c < row_length)

  b1, one_minus_b1 = hyper_ref[0], hyper_ref[1]
  g = g_ref[...].astype(jnp.float32)
  m = b1 * (codes_ref[...].astype(jnp.float32) * scales_ref[...]) + one_minus_b1 * g
  u = m * factor_ref[...]
  if fuse_step:  # -lr * (u + wd * p), then p + that: the q_adam_mini chain
    p = p_ref[...].astype(jnp.float32)
    neg_lr, wd = hyper_ref[2], hyper_ref[3]
    u = p + neg_lr * (u + wd * p)
  out_ref[...] = u.astype(out_ref.dtype)

  absmax = jnp.max(jnp.where(valid, jnp.abs(m), 0.0), axis=1, keepdims=True)
  scale = absmax / np.float32(quantize_lib.QMAX)
  y = jnp.where(scale > 0, m / jnp.where(scale > 0, scale, 1.0), 0.0)
  if stochastic:
    index = (r * row_length + c).astype(jnp.uint32)
    bits = random_bits.element_bits(index, seed_ref[0], seed_ref[1])
    y = y + random_bits.bits_to_uniform(bits)
  else:
    y = y + np.float32(0.5)
  q = jnp.clip(jnp.floor(y), -quantize_lib.QMAX, quantize_lib.QMAX)
  codes_out_ref[...] = q.astype(jnp.int8)
  scales_out_ref[...] = scale


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


@functools.partial(jax.jit, static_argnames=(
    "group_size", "stochastic", "fuse_step", "rows_vary", "cols_vary", "backend"))
def fused_leaf_update(p, g, q: quantize_lib.QuantizedArray, factor, hyper, seeds, *,
                      group_size: int, stochastic: bool, fuse_step: bool,
                      rows_vary: bool, cols_vary: bool, backend: str):
  """One fused step of an INT8 leaf.

  Args:
    p: parameter (read only when ``fuse_step``).
    g: gradient, same shape.
    q: stored first moment.
    factor: block factors ``r_B`` broadcast to ``(R, L)`` and reduced to
      ``(R if rows_vary else 1, L if cols_vary else 1)`` (:func:`factors_2d`).
    hyper: float32 ``[b1, 1-b1, -lr, wd, 0, 0, 0, 0]``.
    seeds: uint32 ``[s0, s1]`` of :func:`random_bits.stream_seeds`.
    fuse_step: return the new parameter ``p + (-lr)*(u + wd*p)`` instead of
      the Adam-mini direction ``u``.

  Returns:
    ``(out, QuantizedArray)``: ``out`` has ``g``'s dtype (``p``'s when fused).
  """
  check_group_size(group_size)
  shape = g.shape
  row_shape, row_length, groups = quantize_lib.group_layout(shape, group_size)
  rows = int(np.prod(row_shape, dtype=np.int64))
  block_rows = max(1, min(_next_pow2(rows), _TILE_ELEMENTS // group_size))
  row_tiles = -(-rows // block_rows)
  grid = (row_tiles * groups,)
  tile = lambda i: (i // groups, i % groups)
  full = pl.BlockSpec((block_rows, group_size), tile)
  per_group = pl.BlockSpec((block_rows, 1), tile)
  factor_spec = pl.BlockSpec(
      (block_rows if rows_vary else 1, group_size if cols_vary else 1),
      lambda i: (i // groups if rows_vary else 0, i % groups if cols_vary else 0))
  scalar = lambda n: pl.BlockSpec((n,), lambda i: (0,))
  out_dtype = p.dtype if fuse_step else g.dtype
  kernel = functools.partial(
      _kernel, rows=rows, row_length=row_length, block_rows=block_rows,
      group_size=group_size, groups=groups, stochastic=stochastic, fuse_step=fuse_step)
  out, codes, scales = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((rows, row_length), out_dtype),
                 jax.ShapeDtypeStruct((rows, row_length), jnp.int8),
                 jax.ShapeDtypeStruct((rows, groups), jnp.float32)),
      grid=grid,
      in_specs=[scalar(8), scalar(2), full, full, full, per_group, factor_spec],
      out_specs=(full, full, per_group),
      input_output_aliases={2 if fuse_step else 3: 0, 4: 1, 5: 2},
      name="q_adam_mini_leaf",
      **pallas_call_options(backend),
  )(hyper, seeds, p.reshape(rows, row_length), g.reshape(rows, row_length),
    q.codes.reshape(rows, row_length), q.scales.reshape(rows, groups), factor)
  return out.reshape(shape), quantize_lib.QuantizedArray(
      codes.reshape(shape), scales.reshape(q.scales.shape))


def factor_axes(spec, shape: tuple[int, ...], group_size: int) -> dict[str, bool]:
  """Whether a leaf's block factors vary along the rows / within a row."""
  split = len(quantize_lib.group_layout(shape, group_size)[0])
  kept = [a for a in range(len(shape)) if a not in spec.axes and shape[a] > 1]
  return {"rows_vary": any(a < split for a in kept),
          "cols_vary": any(a >= split for a in kept)}


def factors_2d(factor, spec, shape: tuple[int, ...], group_size: int):
  """Keep-dims block factors as the kernel's ``(R|1, L|1)`` array."""
  rows_shape, row_length, _ = quantize_lib.group_layout(shape, group_size)
  full = partition_lib.broadcast_block(factor, spec, shape).reshape(
      int(np.prod(rows_shape, dtype=np.int64)), row_length)
  axes = factor_axes(spec, shape, group_size)
  full = full if axes["rows_vary"] else full[:1]
  return full if axes["cols_vary"] else full[:, :1]
