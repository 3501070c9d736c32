"""One leaf's Adam-mini step as a pure function: storage and execution plugged in.

For a leaf with block partition ``spec`` (Zhang et al. 2024, arXiv:2406.16793,
Algorithm 1)::

    v_B <- b2*v_B + (1-b2)*mean_{i in B}(g_i^2)
    m   <- b1*m + (1-b1)*g
    u   <- m * r_B,   r_B = 1/((1-b1^t)(sqrt(v_B)/sqrt(1-b2^t) + eps))

and, when the step also applies the update (:attr:`LeafPlan.decay` is not
``None``), ``p <- p + (-lr)*(u + wd*p)``. ``m`` is read and written through
its storage (:mod:`.storage`) and so is ``p`` when it is stored in INT8
(:mod:`.weights`); each quantized store rounds with its own counter-based
stream (:mod:`.random_bits`). INT8 leaves run either in jnp (the
specification) or in the fused Pallas kernel (:mod:`.pallas_update`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qadam_mini_jax import pallas_update
from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import quantize as quantize_lib
from qadam_mini_jax import random_bits
from qadam_mini_jax import sharding as sharding_lib
from qadam_mini_jax import storage as storage_lib
from qadam_mini_jax import triton_update


class LeafPlan(NamedTuple):
  """What is fixed about one leaf's update (static under ``jax.jit``).

  Attributes:
    path: the parameter's name: in errors, and its rounding streams are
      :func:`.random_bits.path_stream` of it.
    spec: its Adam-mini blocks.
    moment: storage of ``m`` (:class:`.storage.FloatStorage` or
      :class:`.storage.Int8Storage`).
    stochastic: whether ``m`` rounds stochastically.
    weights: storage of an INT8 parameter (:class:`.weights.WeightStorage`)
      when the step writes one, else ``None``.
    decay: ``None`` when the step returns the direction ``u``; else whether
      weight decay applies as the step writes the new parameter.
    backend: kernel backend of an INT8 leaf's update (:data:`.pallas_update.BACKENDS`
      or :data:`.triton_update.BACKENDS`), or ``None`` for jnp.
    sharding: the parameter's ``NamedSharding`` (or ``None``).
    second: storage of ``v``: float32, or (one entry per element) 8-bit with
      the logarithmic code, always rounded stochastically
      (``benchmarks/second_moment_code.py``: to nearest, ``v`` stops decaying).
  """

  path: str
  spec: partition_lib.BlockSpec
  moment: Any
  stochastic: bool
  weights: Any = None
  decay: bool | None = None
  backend: str | None = None
  sharding: Any = None
  second: Any = storage_lib.FloatStorage(jnp.float32)


class StepScalars(NamedTuple):
  """Traced scalars shared by every leaf of one step (float32; ``count`` int32)."""

  b1: jax.Array
  b2: jax.Array
  eps: jax.Array
  bias_correction1: jax.Array  # 1 - b1^t
  sqrt_bias_correction2: jax.Array  # sqrt(1 - b2^t)
  count: jax.Array
  key: jax.Array
  neg_lr: jax.Array | None = None  # with decay
  wd: jax.Array | None = None


#: The index of the first layer of the stacks being updated (see :func:`first_layer`).
_FIRST_LAYER: contextvars.ContextVar = contextvars.ContextVar("first_layer", default=None)


@contextlib.contextmanager
def first_layer(index: jax.Array):
  """Stacked leaves updated inside this block hold layers ``index, index + 1, ...``
  of their model (``in_backward.per_leaf`` hands a transform one layer as a stack
  of one), so each layer rounds on its own stream."""
  token = _FIRST_LAYER.set(index)
  try:
    yield
  finally:
    _FIRST_LAYER.reset(token)


def _stream(plan: LeafPlan, s: StepScalars, purpose: int, layer: jax.Array | None):
  """The rounding stream of one quantized store of this leaf (and layer)."""
  seeds = random_bits.stream_seeds(s.key, s.count, random_bits.path_stream(plan.path), purpose)
  if layer is None:
    return seeds
  first = _FIRST_LAYER.get()
  return random_bits.layer_seeds(*seeds, layer if first is None else first + layer)


def _jnp_layer(plan: LeafPlan, s: StepScalars, spec: partition_lib.BlockSpec,
               g, mu, factor, p, layer):
  """The update in jnp: ``(out, m)`` of one layer (or of an unstacked leaf)."""
  new_m = lambda mu: s.b1 * plan.moment.load(mu) + (1.0 - s.b1) * g.astype(jnp.float32)
  m = new_m(mu)
  u = (m * partition_lib.broadcast_block(factor, spec, g.shape)).astype(g.dtype)
  noise = (random_bits.uniform(g.shape, *_stream(plan, s, random_bits.MOMENT, layer))
           if plan.stochastic else None)
  if plan.decay is None:
    return u, plan.moment.store(m, noise)
  out = apply_direction(plan, s, u, p, layer)
  if layer is None:
    # A whole leaf's INT8 m is written over the old codes once the new parameter
    # exists. XLA recomputes m in every fusion that reads it, the parameter's too;
    # unordered, it copied the old codes (the embedding's and output layer's: 2 x
    # 125 MiB at 7B).
    mu = partition_lib.read_after(mu, jax.tree.leaves(out), s.count > 0)
  return out, plan.moment.store(new_m(mu), noise)


def apply_direction(plan: LeafPlan, s: StepScalars, u: jax.Array, p: Any,
                    layer: jax.Array | None = None) -> Any:
  """The new parameter ``p + (-lr)*(u + wd*p)`` (``wd`` where :attr:`LeafPlan.decay`)
  in ``p``'s storage: an INT8 weight re-quantized on its own stream.

  One layer (``layer``) of a stacked leaf, or an unstacked leaf; reads
  ``s.neg_lr``, ``s.wd`` and, for INT8 weights, ``s.key`` and ``s.count``.
  """
  value = p if plan.weights is None else plan.weights.load(p)
  u = (u + s.wd * value) if plan.decay else u
  new = value + s.neg_lr.astype(u.dtype) * u
  if plan.weights is None:
    return jnp.asarray(new).astype(p.dtype)
  noise = (random_bits.uniform(u.shape, *_stream(plan, s, random_bits.WEIGHTS, layer))
           if plan.weights.stochastic else None)
  return plan.weights.store(new, noise)


def write_leaf(plan: LeafPlan, s: StepScalars, u: jax.Array, p: Any) -> Any:
  """:func:`apply_direction` of a whole leaf: stacked INT8 weights one layer at a
  time (their groups and rounding streams are per layer), written over ``p``."""
  if not (plan.spec.layers and plan.weights is not None):
    return apply_direction(plan, s, u, p)
  ax = plan.spec.layers
  (out,) = partition_lib.layer_loop(
      lambda layer, p, u: (apply_direction(plan, s, u, p, layer),),
      tuple(u.shape[a] for a in ax), (p,), (plan.weights.layer_axes(plan.spec),), (u,), (ax,))
  return out


def _kernel_layer(plan: LeafPlan, s: StepScalars, spec: partition_lib.BlockSpec,
                  g, mu, factor, p, layer, layers: int = 0):
  """The update in the fused kernel (Pallas or Triton): ``(out, m)`` of one layer, or
  with ``layers`` (the Triton kernel) of that many stacked ahead of the layer's
  shape, in one launch whose grid spans them."""
  layout, fused = plan.moment.layout, plan.decay is not None
  zero, no_word = jnp.zeros([], jnp.float32), jnp.zeros([], jnp.uint32)
  wd = (s.wd if plan.decay else zero) if fused else zero
  hyper = [s.b1, 1.0 - s.b1, s.neg_lr if fused else zero, wd]
  streams = _stream(plan, s, random_bits.MOMENT, layer) if plan.stochastic else None
  seeds = [*(streams or (no_word, no_word)), no_word, no_word]  # offsets 0
  kernel_args = dict(stochastic=streams is not None, fuse_step=fused, backend=plan.backend,
                     **pallas_update.factor_axes(spec, layout))
  if plan.weights is not None:  # INT8 weights: their codes and scales in and out
    weight_streams = (_stream(plan, s, random_bits.WEIGHTS, layer) if plan.weights.stochastic
                      else (no_word, no_word))
    seeds += list(weight_streams)
    kernel_args["params_stochastic"] = plan.weights.stochastic
    p = quantize_lib.QuantizedArray(p.codes, p.scales)
  factors_2d = lambda f: pallas_update.factors_2d(f, spec, layout)
  if layers:  # the first layer's index, after which each layer's streams are numbered
    first = _FIRST_LAYER.get()
    seeds.append(no_word if first is None else jnp.asarray(first).astype(jnp.uint32))
    kernel_args["layers"] = layers
    factors_2d = jax.vmap(factors_2d)
    factor = factor.reshape((layers,) + factor.shape[len(plan.spec.layers):])
  args = (p if fused else g, g, mu, factors_2d(factor),
          jnp.stack([jnp.asarray(h, jnp.float32) for h in hyper] + [zero] * 4), jnp.stack(seeds))
  kernel = (triton_update.fused_leaf_update if plan.backend in triton_update.BACKENDS
            else pallas_update.fused_leaf_update)
  if plan.sharding is None or plan.sharding.is_fully_replicated:
    out, mu = kernel(*args, layout=layout, **kernel_args)
    return (out if plan.weights is None else plan.weights.wrap(out)), mu
  if plan.weights is not None:
    raise sharding_lib.ShardingError(
        f"{plan.path}: the fused kernel does not update sharded INT8 weights yet; use "
        "implementation='xla'.")
  return pallas_update.sharded_leaf_update(
      *args, layout=layout, sharding=plan.sharding, path=plan.path, kernel=kernel, **kernel_args)


def _second_moment(plan: LeafPlan, s: StepScalars, spec: partition_lib.BlockSpec, g: jax.Array,
                   nu: Any, layer: jax.Array | None = None):
  """``(v, factor)``: the new block second moment (in :attr:`LeafPlan.second`'s
  storage) and ``1/((1-b1^t)(sqrt(v/(1-b2^t)) + eps))``."""
  g32 = g.astype(jnp.float32)
  v = s.b2 * plan.second.load(nu) + (1.0 - s.b2) * partition_lib.block_mean(g32 * g32, spec)
  # One factor per block, so the per-element work is a single multiply.
  factor = 1.0 / (s.bias_correction1 * (jnp.sqrt(v) / s.sqrt_bias_correction2 + s.eps))
  noise = (random_bits.uniform(v.shape, *_stream(plan, s, random_bits.SECOND_MOMENT, layer))
           if plan.second.quantized else None)
  return plan.second.store(v, noise), factor


def _layer_update(plan: LeafPlan):
  """The function that updates one layer of ``plan``'s leaf (jnp or the kernel)."""
  if plan.backend is None or not plan.moment.quantized:
    return _jnp_layer
  if plan.spec.layers and not (plan.sharding is None or plan.sharding.is_fully_replicated):
    raise sharding_lib.ShardingError(
        f"{plan.path}: the fused kernel does not run per shard on stacked layers "
        f"(layer axes {plan.spec.layers}); use implementation='xla' for this model.")
  if plan.weights is not None and plan.weights.like.layout != plan.moment.layout:
    raise ValueError(
        f"{plan.path}: the fused kernel needs the INT8 weight grouped as its m, got "
        f"{plan.weights.like.layout} and {plan.moment.layout}; give quantize_params the "
        "optimizer's partition and Int8Quantization.")
  return _kernel_layer


def update_leaf(plan: LeafPlan, s: StepScalars, g: jax.Array, mu: Any, nu: Any,
                p: Any = None) -> tuple[Any, Any, Any]:
  """One leaf's step: ``(out, m, v)``.

  ``out`` is the direction ``u`` in ``g``'s dtype, or, with
  :attr:`LeafPlan.decay`, the new parameter in ``p``'s storage.
  """
  one_layer = _layer_update(plan)
  v_in_layers = plan.second.quantized  # its groups and rounding streams are per layer
  quantized = plan.moment.quantized or plan.weights is not None or v_in_layers
  if not (plan.spec.layers and quantized):  # groups of the whole leaf
    nu, factor = _second_moment(plan, s, plan.spec, g, nu)
    out, mu = one_layer(plan, s, plan.spec, g, mu, factor, p, None)
    return out, mu, nu
  layer_spec, _ = partition_lib.layer_slice(plan.spec, g.shape)
  ax = plan.spec.layers
  sizes = tuple(g.shape[a] for a in ax)
  if (one_layer is _kernel_layer and plan.backend in triton_update.BACKENDS
      and not v_in_layers and ax == tuple(range(len(ax)))):
    # Layers ahead of the rest: the Triton kernel's grid spans them, one launch
    # writing every layer in place.
    nu, factor = _second_moment(plan, s, plan.spec, g, nu)
    out, mu = _kernel_layer(plan, s, layer_spec, g, mu, factor, p, None, math.prod(sizes))
    return out, mu, nu
  # Quantization groups are per layer: one layer at a time, each layer's results
  # written over the stacked arrays they replace (the direction over the gradient,
  # new parameters over the parameters, m over m, an 8-bit v over v), so only one
  # layer's float32 m and rounding temporaries are alive, not the whole stack's.
  if plan.decay is None:  # the direction is written over the gradient
    carry, carry_axes, consts, const_axes = [g], [ax], [], []
  else:
    carry = [p]
    carry_axes = [ax if plan.weights is None else plan.weights.layer_axes(plan.spec)]
    consts, const_axes = [g], [ax]
  carry.append(mu)
  carry_axes.append(plan.moment.layer_axes(plan.spec))
  if v_in_layers:
    carry.append(nu)
    carry_axes.append(plan.second.layer_axes(plan.spec))
  else:
    nu, factor = _second_moment(plan, s, plan.spec, g, nu)
    consts.append(factor)
    const_axes.append(ax)

  def layer_step(layer, target, mu, *rest):
    rest = list(rest)
    v = rest.pop(0) if v_in_layers else None
    g = target if plan.decay is None else rest.pop(0)
    if v_in_layers:
      v, factor = _second_moment(plan, s, layer_spec, g, v, layer)
    else:
      (factor,) = rest
    out, mu = one_layer(plan, s, layer_spec, g, mu, factor,
                        None if plan.decay is None else target, layer)
    return (out, mu, v) if v_in_layers else (out, mu)

  results = partition_lib.layer_loop(layer_step, sizes, tuple(carry), tuple(carry_axes),
                                     tuple(consts), tuple(const_axes))
  return results if v_in_layers else (*results, nu)


def update_layer(plan: LeafPlan, s: StepScalars, shape: tuple[int, ...], g: jax.Array, mu: Any,
                 nu: jax.Array, p: Any, layer: jax.Array) -> tuple[Any, Any, jax.Array]:
  """Layer ``layer`` (uint32, row-major over the layer axes) of a stacked leaf's step.

  ``plan`` and ``shape`` are the whole leaf's; ``g``, ``mu``, ``nu`` and
  ``p`` are that layer's slices (:func:`.partition.take_layer`), and so are
  the results ``(out, m, v)``: the same values as :func:`update_leaf` gives
  for that layer, with the same rounding streams.
  """
  layer_spec, _ = partition_lib.layer_slice(plan.spec, shape)
  nu, factor = _second_moment(plan, s, layer_spec, g, nu, layer)
  out, mu = _layer_update(plan)(plan, s, layer_spec, g, mu, factor, p, layer)
  return out, mu, nu
