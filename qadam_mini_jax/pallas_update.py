"""Fused Q-Adam-mini leaf update as a Pallas kernel (Triton backend on GPU).

One pass over an INT8-stored leaf: decode ``m`` (:func:`quantize.decode`), ``m <- b1*m + (1-b1)*g``,
``u = m * r_B`` with the block factor ``r_B = 1/((1-b1^t)(sqrt(v_B)/sqrt(1-b2^t) + eps))``
(Adam-mini, arXiv:2406.16793, Alg. 1),
optionally ``u <- -lr*(u + wd*p)`` (decoupled weight decay and learning rate, the
rest of the ``q_adam_mini`` chain) and ``p <- p + u``, then re-encode ``m``
group-wise (:func:`quantize.encode`) with round-to-nearest or stochastic
rounding. With INT8 weights (:mod:`.weights`) ``p`` is decoded from its codes
and scales and re-encoded the same way, from its own rounding stream: one
pass reads and writes about 2 bytes of state per parameter plus the gradient. The arithmetic is that of :mod:`qadam_mini_jax.quantize` and
:mod:`qadam_mini_jax.transform`, in the same order, and the rounding bits are
:func:`qadam_mini_jax.random_bits.element_bits` of the element's flat index,
generated in the kernel.

Layout: the leaf is viewed as the ``(a, b)`` matrix of its quantization grouping
(:func:`qadam_mini_jax.quantize.group_layout`); one program handles one group
(``group_size``, a power of two) of several columns or rows (:func:`kernel_config`).
The block factors come from the XLA reduction pass as an ``(a|1, b|1)`` array:
only the axes they vary along are materialised.

Lowering lives behind :func:`pallas_call_options`: ``"triton"`` (Pallas's Triton
lowering, GPU) or ``"interpret"`` (any platform, for tests). A Mosaic GPU or
jax-triton variant slots in there.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import quantize as quantize_lib
from qadam_mini_jax import random_bits
from qadam_mini_jax import sharding as sharding_lib

BACKENDS = ("triton", "interpret")


class TritonBackendMissing(RuntimeError):
  """This JAX no longer ships Pallas's Triton backend."""


def triton_backend():
  """``jax.experimental.pallas.triton`` (masked loads and stores, compiler params).

  Raises:
    TritonBackendMissing: where JAX no longer ships it.
  """
  try:
    from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise TritonBackendMissing(
        f"jax {jax.__version__} has no Pallas Triton backend "
        "(jax.experimental.pallas.triton), which the fused kernel needs; use "
        "implementation='xla'.") from e
  return pl_triton


def pallas_call_options(backend: str, num_warps: int = 4) -> dict[str, Any]:
  """``pallas_call`` keyword arguments selecting the lowering."""
  if backend == "interpret":
    return {"interpret": True}
  if backend == "triton":
    return {"compiler_params": triton_backend().CompilerParams(num_warps=num_warps, num_stages=1)}
  raise ValueError(f"Unknown Pallas backend {backend!r}; expected one of {BACKENDS}.")


def default_backend() -> str:
  """``"triton"`` on a CUDA GPU, else ``"interpret"``."""
  return "triton" if jax.default_backend() == "gpu" else "interpret"


def check_group_size(group_size: int) -> None:
  if group_size & (group_size - 1):
    raise ValueError(f"The Pallas kernel needs a power-of-two group size (Triton block "
                     f"shapes), got {group_size}; use implementation='xla' or "
                     "Int8Quantization(group_size=256).")


def _in_bounds(block: tuple[int, ...], start: tuple[Any, ...], size: tuple[int, ...]):
  """Mask of the elements of a block that lie inside its array, or ``None``.

  Static: only axes along which the array is not a multiple of the block can
  overhang (a block of 1 is indexed by a program id that is always in range),
  so an aligned leaf gets no mask and keeps its vector loads and stores.
  """
  mask = None
  for axis, (n, s0, total) in enumerate(zip(block, start, size)):
    if n > 1 and total % n:
      inside = jax.lax.broadcasted_iota(jnp.int32, block, axis) + s0 < total
      mask = inside if mask is None else mask & inside
  return mask


def _load(ref, mask):
  return ref[...] if mask is None else triton_backend().load(ref, mask=mask, other=0)


def _store(ref, value, mask):
  if mask is None:
    ref[...] = value
  else:
    triton_backend().store(ref, value, mask=mask)


def _kernel(hyper_ref, seed_ref, *refs,
            a: int, b: int, stride: int, tile: tuple[int, int], tiles_b: int, columns: bool,
            stochastic: bool, fuse_step: bool, int8_params: bool, params_stochastic: bool):
  if int8_params:  # p as INT8 codes and scales in, and out
    (p_codes_ref, p_scales_ref, g_ref, codes_ref, scales_ref, factor_ref,
     p_codes_out_ref, p_scales_out_ref, codes_out_ref, scales_out_ref) = refs
  else:
    p_ref, g_ref, codes_ref, scales_ref, factor_ref, out_ref, codes_out_ref, scales_out_ref = refs
  pid = pl.program_id(0)
  row0, col0 = (pid // tiles_b) * tile[0], (pid % tiles_b) * tile[1]
  # Pallas's Triton lowering does not mask ``ref[...]`` of an edge block: every
  # access of one that can overhang the leaf is masked here.
  # The scale and factor blocks are the tile's with some axes of size 1.
  mask, scale_mask, factor_mask = (_in_bounds(block, (row0, col0), (a, b)) for block in (
      tile, scales_ref.shape, factor_ref.shape))

  b1, one_minus_b1 = hyper_ref[0], hyper_ref[1]
  g = _load(g_ref, mask).astype(jnp.float32)
  m = b1 * quantize_lib.decode(_load(codes_ref, mask), _load(scales_ref, scale_mask)) + one_minus_b1 * g
  u = m * _load(factor_ref, factor_mask)
  if fuse_step:  # -lr * (u + wd * p), then p + that: the q_adam_mini chain
    if int8_params:
      p = quantize_lib.decode(_load(p_codes_ref, mask), _load(p_scales_ref, scale_mask),
                              linear=True)
    else:
      p = _load(p_ref, mask).astype(jnp.float32)
    neg_lr, wd = hyper_ref[2], hyper_ref[3]
    u = p + neg_lr * (u + wd * p)
  if not int8_params:
    _store(out_ref, u.astype(out_ref.dtype), mask)

  group_axis = 0 if columns else 1
  index = None
  if stochastic or params_stochastic:
    # The element's flat index in the whole leaf: this block may be one shard.
    i = jax.lax.broadcasted_iota(jnp.int32, tile, 0) + row0
    j = jax.lax.broadcasted_iota(jnp.int32, tile, 1) + col0
    index = ((i.astype(jnp.uint32) + seed_ref[2]) * np.uint32(stride)
             + j.astype(jnp.uint32) + seed_ref[3])

  def requantize(x, words, on, codes_out, scales_out, weights=False):
    """Group max (masked loads give 0 outside the leaf, so padding never raises it), encode."""
    scale = jnp.max(jnp.abs(x), axis=group_axis, keepdims=True)
    if weights:
      scale = quantize_lib.coarse_scale(scale, quantize_lib.WEIGHT_SCALE_BITS)
    r = (random_bits.bits_to_uniform(random_bits.element_bits(index, seed_ref[words[0]],
                                                              seed_ref[words[1]]))
         if on else np.float32(0.5))
    _store(codes_out, quantize_lib.encode(x, scale, r, linear=weights), mask)
    _store(scales_out, scale, scale_mask)

  if int8_params:
    requantize(u, (4, 5), params_stochastic, p_codes_out_ref, p_scales_out_ref, weights=True)
  requantize(m, (0, 1), stochastic, codes_out_ref, scales_out_ref)


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


class KernelConfig(NamedTuple):
  """One program's block of the ``(a, b)`` view (one group by up to the rest) and its warps."""

  tile: tuple[int, int]
  num_warps: int


_COLUMNS_WIDTH = 32  # columns per program: a whole 128-byte line of float32 per row
_ROWS_HEIGHT = 16  # rows per program


def kernel_config(layout: quantize_lib.GroupLayout, int8_params: bool = False) -> KernelConfig:
  """Tile and warps of a leaf, chosen from the compiled code.

  32 elements per thread keep every variant at or under 128 registers with
  no spills (at least 2 blocks per SM) at about the fewest instructions per
  element; columns tiles are 32 wide, so each row of a float32 tile is one
  128-byte line. Rows of a length that is not a multiple of 4 are not 16-byte
  aligned, so every element needs its own address: such leaves get half the
  tile and 16 elements per thread, and so do INT8 weights (a second code to
  decode and encode, and its rounding bits), once more if both.
  ``benchmarks/kernel_static.py`` measures each variant
  (``benchmarks/results/kernel_static.md``).
  """
  g = layout.group_size
  shrink = (1 if layout.b % 4 == 0 else 2) * (2 if int8_params else 1)
  if layout.columns:
    tile = (g, min(_next_pow2(layout.b), _COLUMNS_WIDTH // shrink))
  else:
    tile = (min(_next_pow2(layout.a), _ROWS_HEIGHT // shrink), g)
  elements_per_thread = 32 // shrink
  return KernelConfig(tile, max(1, tile[0] * tile[1] // (32 * elements_per_thread)))


@functools.partial(jax.jit, static_argnames=(
    "layout", "stochastic", "fuse_step", "a_varies", "b_varies", "backend", "stride",
    "params_stochastic"))
def fused_leaf_update(p, g, q: quantize_lib.QuantizedArray, factor, hyper, seeds, *,
                      layout: quantize_lib.GroupLayout, stochastic: bool, fuse_step: bool,
                      a_varies: bool, b_varies: bool, backend: str, stride: int | None = None,
                      params_stochastic: bool | None = None):
  """One fused step of an INT8 leaf.

  Args:
    p: parameter (read only when ``fuse_step``): a float array, or with
      ``params_stochastic`` set, the INT8 weight's codes and scales as a
      :class:`~.quantize.QuantizedArray` grouped by ``layout``
      (:mod:`.weights`): then the kernel reads the weight's codes and
      scales, ``g`` and ``m``'s codes and scales, and writes both re-quantized.
    g: gradient, same shape.
    q: stored first moment, grouped by ``layout``.
    factor: block factors ``r_B`` on the ``(a, b)`` view of ``layout``,
      reduced to ``(a if a_varies else 1, b if b_varies else 1)``
      (:func:`factors_2d`).
    hyper: float32 ``[b1, 1-b1, -lr, wd, 0, 0, 0, 0]``.
    seeds: uint32 ``[s0, s1, i0, j0]``: the stream of
      :func:`random_bits.stream_seeds`, and the offset of this block in the
      ``(a, b)`` view of the whole leaf (zeros unless ``p`` is one shard);
      with INT8 weights ``[s0, s1, i0, j0, w0, w1]``, ``w0, w1`` the weights'
      stream (:data:`random_bits.WEIGHTS`).
    fuse_step: return the new parameter ``p + (-lr)*(u + wd*p)`` instead of
      the Adam-mini direction ``u``.
    stride: ``b`` of the whole leaf when ``p`` is one shard of it (default
      ``layout.b``); with ``i0, j0`` it gives each element its whole-leaf index
      for the rounding bits.
    params_stochastic: ``None`` for a float ``p``; for INT8 weights whether
      they round stochastically (their scales on the grid of
      :func:`.quantize.coarse_scale` with :data:`.quantize.WEIGHT_SCALE_BITS`).

  Returns:
    ``(out, QuantizedArray)``: ``out`` has ``g``'s dtype (``p``'s when fused),
    or is the new weight's ``QuantizedArray``.
  """
  check_group_size(layout.group_size)
  int8_params = params_stochastic is not None
  if int8_params and not fuse_step:
    raise ValueError("INT8 weights are written by the fused step only (fuse_step=True).")
  a, b, groups = layout.a, layout.b, layout.groups
  tile, num_warps = kernel_config(layout, int8_params)
  tiles_a, tiles_b = -(-a // tile[0]), -(-b // tile[1])
  index = lambda k: (k // tiles_b, k % tiles_b)
  full = pl.BlockSpec(tile, index)
  scale_spec = pl.BlockSpec((1, tile[1]) if layout.columns else (tile[0], 1), index)
  factor_spec = pl.BlockSpec(
      (tile[0] if a_varies else 1, tile[1] if b_varies else 1),
      lambda k: (k // tiles_b if a_varies else 0, k % tiles_b if b_varies else 0))
  scalar = lambda n: pl.BlockSpec((n,), lambda k: (0,))
  scales_2d = (groups, b) if layout.columns else (a, groups)
  kernel = functools.partial(_kernel, a=a, b=b, stride=b if stride is None else stride,
                             tile=tile, tiles_b=tiles_b, columns=layout.columns,
                             stochastic=stochastic, fuse_step=fuse_step,
                             int8_params=int8_params, params_stochastic=bool(params_stochastic))
  grouped = lambda x: quantize_lib.QuantizedArray(x.codes.reshape(a, b), x.scales.reshape(scales_2d))
  moment_shapes = (jax.ShapeDtypeStruct((a, b), jnp.int8),
                   jax.ShapeDtypeStruct(scales_2d, jnp.float32))
  if int8_params:  # in: p codes, p scales, g, codes, scales, factor; out: p codes, p scales, codes, scales
    param_in, param_specs, param_shapes = tuple(grouped(p)), [full, scale_spec], moment_shapes
    aliases = {2: 0, 3: 1, 5: 2, 6: 3}
  else:  # in: p, g, codes, scales, factor; out: p (or u), codes, scales
    param_in, param_specs = (p.reshape(a, b),), [full]
    param_shapes = (jax.ShapeDtypeStruct((a, b), p.dtype if fuse_step else g.dtype),)
    aliases = {2 if fuse_step else 3: 0, 4: 1, 5: 2}
  *out, codes, scales = pl.pallas_call(
      kernel,
      out_shape=(*param_shapes, *moment_shapes),
      grid=(tiles_a * tiles_b,),
      in_specs=[scalar(8), scalar(seeds.shape[0]), *param_specs, full, full, scale_spec,
                factor_spec],
      out_specs=(*param_specs, full, scale_spec),
      input_output_aliases=aliases,
      name="q_adam_mini_leaf",
      **pallas_call_options(backend, num_warps),
  )(hyper, seeds, *param_in, g.reshape(a, b), *grouped(q), factor)
  ungrouped = lambda c, s: quantize_lib.QuantizedArray(
      c.reshape(layout.shape), s.reshape(layout.scales_shape))
  return (ungrouped(*out) if int8_params else out[0].reshape(layout.shape)), ungrouped(codes, scales)


def factor_axes(spec: partition_lib.BlockSpec, layout: quantize_lib.GroupLayout) -> dict[str, bool]:
  """Whether a leaf's block factors vary along ``a`` / ``b`` of its layout view."""
  kept = [k for k, n in enumerate(layout.shape) if k not in spec.axes and n > 1]
  return {"a_varies": any(k < layout.split for k in kept),
          "b_varies": any(k >= layout.split for k in kept)}


def factors_2d(factor, spec: partition_lib.BlockSpec, layout: quantize_lib.GroupLayout):
  """Keep-dims block factors as the kernel's ``(a|1, b|1)`` array."""
  full = partition_lib.broadcast_block(factor, spec, layout.shape).reshape(layout.a, layout.b)
  axes = factor_axes(spec, layout)
  full = full if axes["a_varies"] else full[:1]
  return full if axes["b_varies"] else full[:, :1]


def sharded_leaf_update(p, g, q: quantize_lib.QuantizedArray, factor, hyper, seeds, *,
                        layout: quantize_lib.GroupLayout, sharding: jax.sharding.NamedSharding,
                        path: str, kernel=fused_leaf_update, **kernel_args):
  """``kernel`` (:func:`fused_leaf_update`, or the Triton kernel's, which takes the
  same arguments) run on every shard of a sharded leaf (``shard_map``).

  Each device updates its own shard of ``p``, ``g`` and the INT8 ``m`` (whose
  groups must not straddle shards) with the block factors of its shard; the
  rounding bits use whole-leaf element indices, so the result is that of the
  unsharded kernel. Supported: on each side of the leaf's ``(a, b)`` view only
  its first axis may be split, evenly.

  Args:
    layout: the grouping of the whole leaf.
    sharding: the leaf's sharding (``p``, ``g`` and the codes share it).
    path: the parameter's name, for errors.
    **kernel_args: ``stochastic``, ``fuse_step``, ``a_varies``, ``b_varies``
      and ``backend`` of :func:`fused_leaf_update`.
  """
  mesh, shape = sharding.mesh, layout.shape
  entries = sharding_lib.padded_spec(sharding.spec, len(shape))
  for side in (entries[:layout.split], entries[layout.split:]):
    if any(e is not None for e in side[1:]):
      raise sharding_lib.ShardingError(
          f"{path}: the fused kernel can split only the first axis of each side of its "
          f"{layout.split}+{len(shape) - layout.split} axis view of shape {shape}, got "
          f"{sharding.spec}; use implementation='xla' for this sharding.")
  ways = [sharding_lib.ways(mesh, e) for e in entries]
  if any(n % k for n, k in zip(shape, ways)):
    raise sharding_lib.ShardingError(
        f"{path}: shape {shape} does not split evenly under {sharding.spec} (mesh "
        f"{dict(mesh.shape)}), which the per-shard kernel needs.")
  local = layout._replace(shape=tuple(n // k for n, k in zip(shape, ways)))
  scales_spec = sharding_lib.leaf_spec(path, shape, sharding, layout.scales_shape, groups=True)
  row = entries[0] if layout.split > 0 else None
  col = entries[layout.split] if layout.split < len(shape) else None
  factor_spec = P(row if kernel_args["a_varies"] else None,
                  col if kernel_args["b_varies"] else None)

  def per_shard(p, g, codes, scales, factor, hyper, seeds):
    offset = lambda entry, n: (jnp.zeros([], jnp.uint32) if entry is None else
                               (jax.lax.axis_index(entry) * n).astype(jnp.uint32))
    seeds = jnp.stack([seeds[0], seeds[1], offset(row, local.a), offset(col, local.b)])
    out, q = kernel(p, g, quantize_lib.QuantizedArray(codes, scales), factor, hyper, seeds,
                    layout=local, stride=layout.b, **kernel_args)
    return out, q.codes, q.scales

  spec = P(*entries)
  out, codes, scales = jax.shard_map(
      per_shard, mesh=mesh, in_specs=(spec, spec, spec, scales_spec, factor_spec, P(), P()),
      out_specs=(spec, spec, scales_spec), check_vma=False,
  )(p, g, q.codes, q.scales, factor, hyper, seeds)
  return out, quantize_lib.QuantizedArray(codes, scales)
