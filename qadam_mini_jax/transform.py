"""``scale_by_adam_mini``: Adam-mini's preconditioner with pluggable momentum storage.

For every parameter block B (Zhang et al. 2024, arXiv:2406.16793, Algorithm 1):

    m   <- b1*m + (1-b1)*g                          (per element)
    v_B <- b2*v_B + (1-b2)*mean_{i in B}(g_i^2)     (one scalar per block)
    u   <- (m/(1-b1^t)) / (sqrt(v_B)/sqrt(1-b2^t) + eps)

``m`` and ``v`` are updated from the same raw gradient, so they live in one
transform (like ``optax.scale_by_adam``). Its pieces are the block partition
(:mod:`.partition`), the block mean (:func:`.partition.block_mean`) and the
momentum storage: float32/bfloat16, or Q-Adam-mini's group-wise INT8
(:mod:`.quantize`) with round-to-nearest or counter-based stochastic rounding
(:mod:`.random_bits`). The update always uses the full-precision ``m`` of this
step; only what is stored for the next step is quantized.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import quantize as quantize_lib
from qadam_mini_jax import random_bits


@dataclasses.dataclass(frozen=True)
class Int8Quantization:
  """INT8 first-moment storage (Q-Adam-mini).

  Attributes:
    group_size: consecutive elements sharing one float32 scale.
    min_size: leaves with fewer elements keep ``m`` in float (4 B/element;
      they are a negligible share of a large model).
  """

  group_size: int = 256
  min_size: int = 4096

  def __post_init__(self):
    for name in ("group_size", "min_size"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < (1 if name == "group_size" else 0):
        raise ValueError(f"Int8Quantization.{name} must be a non-negative int "
                         f"(group_size >= 1), got {value!r}.")


#: ``"auto"`` (embedding and output blocks), ``"all"``, ``"none"``, a pytree of
#: bools like the params, or a callable ``params -> pytree of bools``.
StochasticRounding = Union[str, Any, Callable[[Any], Any]]


class ScaleByAdamMiniState(NamedTuple):
  """State of :func:`scale_by_adam_mini`.

  Attributes:
    count: steps taken (int32).
    key: two uint32 words seeding stochastic rounding.
    mu: first moment per leaf: a float array, a
      :class:`~qadam_mini_jax.quantize.QuantizedArray`, or
      ``optax.MaskedNode()`` for leaves left alone (non-float or empty).
    nu: keep-dims block second moment per leaf (float32), or ``MaskedNode``.
  """

  count: jax.Array
  key: jax.Array
  mu: Any
  nu: Any


def _resolve_dtype(dtype: Any) -> Any:
  return None if dtype is None else jnp.dtype(dtype)


def _rounding_mask(stochastic_rounding: StochasticRounding, specs: Any, tree: Any) -> list[bool]:
  """Per-leaf (in ``tree``'s leaf order) whether m is stochastically rounded."""
  is_spec = lambda x: x is None or isinstance(x, partition_lib.BlockSpec)
  spec_leaves = jax.tree.leaves(specs, is_leaf=is_spec)
  if isinstance(stochastic_rounding, str):
    choice = stochastic_rounding.lower()
    if choice not in ("auto", "all", "none"):
      raise ValueError("stochastic_rounding must be 'auto', 'all', 'none', a "
                       f"mask pytree or a callable, got {stochastic_rounding!r}.")
    return [s is not None and (choice == "all" or (
        choice == "auto" and s.rule in (partition_lib.EMBEDDING, partition_lib.OUTPUT)))
            for s in spec_leaves]
  mask = stochastic_rounding(tree) if callable(stochastic_rounding) else stochastic_rounding
  leaves = jax.tree.leaves(mask)
  if len(leaves) != len(spec_leaves):
    raise ValueError(f"stochastic_rounding mask has {len(leaves)} leaves, the "
                     f"parameters have {len(spec_leaves)}.")
  if any(isinstance(x, jax.core.Tracer) for x in leaves):
    raise TypeError("stochastic_rounding must be static Python bools; under "
                    "optax.inject_hyperparams list it in static_args.")
  return [bool(x) for x in leaves]


def scale_by_adam_mini(
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    *,
    partition: partition_lib.BlockPartition | None = None,
    mu_dtype: Any = None,
    quantization: Int8Quantization | None = None,
    stochastic_rounding: StochasticRounding = "auto",
    key: Any = 0,
) -> optax.GradientTransformationExtraArgs:
  """Rescale updates by Adam-mini's block-wise second moment.

  Args:
    b1: decay of the first moment.
    b2: decay of the block second moment.
    eps: added to ``sqrt(v_B)/sqrt(1-b2^t)`` (outside the square root).
    partition: block rules; default :class:`~.partition.BlockPartition()`.
    mu_dtype: float dtype of a float-stored ``m`` (default float32).
    quantization: store ``m`` in INT8 (Q-Adam-mini) with these settings;
      ``None`` stores it in ``mu_dtype``.
    stochastic_rounding: which INT8 leaves round stochastically (the rest
      round to nearest): ``"auto"`` = embedding and output blocks.
    key: int seed or JAX PRNG key of the rounding noise (held in the state).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  partition = partition_lib.BlockPartition() if partition is None else partition
  mu_dtype = _resolve_dtype(mu_dtype)

  def stores_int8(shape):
    return quantization is not None and math.prod(shape) >= quantization.min_size

  def leaf_init(spec, leaf):
    if spec is None:
      return optax.MaskedNode(), optax.MaskedNode()
    nu = jnp.zeros(partition_lib.block_shape(spec, leaf.shape), jnp.float32)
    if stores_int8(leaf.shape):
      zeros = jnp.zeros(leaf.shape, jnp.float32)
      return quantize_lib.quantize(zeros, quantization.group_size), nu
    return jnp.zeros(leaf.shape, mu_dtype or jnp.float32), nu

  def init_fn(params):
    specs = partition_lib.block_specs(params, partition, warn=True)
    leaves, treedef = jax.tree.flatten(params)
    mu, nu = zip(*map(leaf_init, treedef.flatten_up_to(specs), leaves)) if leaves else ((), ())
    return ScaleByAdamMiniState(
        count=jnp.zeros([], jnp.int32), key=random_bits.key_words(key),
        mu=jax.tree.unflatten(treedef, mu), nu=jax.tree.unflatten(treedef, nu))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    specs = partition_lib.block_specs(updates, partition)
    _check_state_matches(updates, specs, state, stores_int8)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    b1_ = jnp.asarray(b1, jnp.float32)
    b2_ = jnp.asarray(b2, jnp.float32)
    bc1 = 1.0 - b1_**t
    sqrt_bc2 = jnp.sqrt(1.0 - b2_**t)
    stochastic = _rounding_mask(stochastic_rounding, specs, updates)

    g_leaves, treedef = jax.tree.flatten(updates)
    spec_leaves = treedef.flatten_up_to(specs)
    mu_leaves = treedef.flatten_up_to(state.mu)
    nu_leaves = treedef.flatten_up_to(state.nu)
    out_u, out_mu, out_nu = [], [], []
    for index, (g, spec, mu, nu, sr) in enumerate(
        zip(g_leaves, spec_leaves, mu_leaves, nu_leaves, stochastic)):
      if spec is None:  # left alone: a zero update (float0 gradients pass through)
        out_u.append(g if g.dtype == jax.dtypes.float0 else jnp.zeros_like(g))
        out_mu.append(mu)
        out_nu.append(nu)
        continue
      g32 = g.astype(jnp.float32)
      nu = b2_ * nu + (1.0 - b2_) * partition_lib.block_mean(g32 * g32, spec)
      quantized = stores_int8(g.shape)
      if quantized:  # (flax.nnx turns the QuantizedArray into a State: rebuild it)
        mu = quantize_lib.QuantizedArray(mu.codes, mu.scales)
        m_prev = quantize_lib.dequantize(mu, quantization.group_size)
      else:
        m_prev = mu.astype(jnp.float32)
      m = b1_ * m_prev + (1.0 - b1_) * g32
      denom = jnp.sqrt(nu) / sqrt_bc2 + eps
      u = (m / bc1) / partition_lib.broadcast_block(denom, spec, g.shape)
      if quantized:
        noise = None
        if sr:
          s0, s1 = random_bits.stream_seeds(state.key, count, index)
          noise = random_bits.uniform(g.shape, s0, s1)
        mu = quantize_lib.quantize(m, quantization.group_size, noise)
      else:
        mu = m.astype(mu.dtype)
      out_u.append(u.astype(g.dtype))
      out_mu.append(mu)
      out_nu.append(nu)
    unflatten = lambda leaves: jax.tree.unflatten(treedef, leaves)
    return unflatten(out_u), ScaleByAdamMiniState(
        count=count, key=state.key, mu=unflatten(out_mu), nu=unflatten(out_nu))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_state_matches(updates: Any, specs: Any, state: ScaleByAdamMiniState,
                         stores_int8: Callable[[tuple[int, ...]], bool]) -> None:
  """Raise a ValueError naming the paths where updates and state disagree."""
  def flat(tree, **kw):
    return {partition_lib.path_str(p): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree, **kw)[0]}

  got = flat(updates)
  specs = flat(specs, is_leaf=lambda x: isinstance(x, partition_lib.BlockSpec))
  nu = flat(state.nu)
  if specs.keys() != nu.keys():
    missing = sorted(nu.keys() - specs.keys())
    extra = sorted(specs.keys() - nu.keys())
    raise ValueError("The updates' tree does not match the optimizer state's: "
                     f"missing from updates {missing[:5]}, not in state {extra[:5]}.")
  mu = flat(state.mu)
  for path, spec in specs.items():
    shape = tuple(got[path].shape)
    want_nu = partition_lib.block_shape(spec, shape)
    m_path = f"{path}/codes" if stores_int8(shape) else path
    m_shape = tuple(mu[m_path].shape) if m_path in mu else None
    if tuple(nu[path].shape) != want_nu or m_shape != shape:
      raise ValueError(
          f"{path}: update of shape {shape} does not match the optimizer state "
          f"(first moment {m_shape}, second moment {tuple(nu[path].shape)}); was the "
          "state initialised for other parameters?")
