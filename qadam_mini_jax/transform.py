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
import numbers
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qadam_mini_jax import pallas_update
from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import quantize as quantize_lib
from qadam_mini_jax import random_bits
from qadam_mini_jax import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class Int8Quantization:
  """INT8 first-moment storage (Q-Adam-mini).

  Attributes:
    group_size: consecutive elements sharing one float32 scale (they run
      inside one Adam-mini block where the layout allows, see
      :func:`layout_for`).
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


def layout_for(spec: partition_lib.BlockSpec, shape: tuple[int, ...],
               quantization: Int8Quantization) -> quantize_lib.GroupLayout:
  """INT8 groups of a leaf (of one layer, if it stacks layers): down the columns
  over its leading reduced axes.

  A Flax ``(in, out)`` kernel with a block per output neuron gets groups over
  ``in`` inside each neuron; leaves whose blocks do not reduce axis 0
  (embedding rows, biases) or reduce every axis get row groups.
  """
  spec, shape = partition_lib.layer_slice(spec, shape)
  leading = 0
  while leading < len(shape) and leading in spec.axes:
    leading += 1
  return quantize_lib.group_layout(shape, quantization.group_size, leading)


def stacked_axes(spec: partition_lib.BlockSpec, layer_rank: int) -> tuple[int, ...]:
  """Where the layer axes of a stacked leaf sit in an array built per layer
  with ``layer_rank`` axes (INT8 scales): the leaf's own positions, or last."""
  out, rank = [], layer_rank
  for axis in spec.layers:
    out.append(min(axis, rank))
    rank += 1
  return tuple(out)


def scales_shape(spec: partition_lib.BlockSpec, shape: tuple[int, ...],
                 quantization: Int8Quantization) -> tuple[int, ...]:
  """Shape of a leaf's INT8 scales: one layer's, with the layer axes inserted."""
  out = list(layout_for(spec, shape, quantization).scales_shape)
  for axis, at in zip(spec.layers, stacked_axes(spec, len(out))):
    out.insert(at, shape[axis])
  return tuple(out)


def per_layer(fn: Callable[..., Any], in_axes: tuple[Any, ...], out_axes: tuple[Any, ...]):
  """``fn`` of one layer's arrays, mapped over the layer axes of a stacked leaf.

  ``in_axes`` / ``out_axes`` give, per argument / result (a pytree prefix),
  the ascending positions of the layer axes in the stacked array, or ``None``
  for an argument shared by all layers.
  """
  is_axes = lambda a: a is None or (isinstance(a, tuple) and all(isinstance(i, int) for i in a))

  def nth(axes, k):
    return jax.tree.map(lambda a: None if a is None else a[k] - k, axes, is_leaf=is_axes)
  count = len(jax.tree.leaves(out_axes, is_leaf=is_axes)[0])
  for k in reversed(range(count)):
    fn = jax.vmap(fn, in_axes=nth(in_axes, k), out_axes=nth(out_axes, k))
  return fn


#: ``"auto"`` (embedding and output blocks), ``"all"``, ``"none"``, a pytree of
#: bools like the params, or a callable ``params -> pytree of bools``.
StochasticRounding = Union[str, Any, Callable[[Any], Any]]


IMPLEMENTATIONS = ("auto", "xla", "pallas")

#: Whether ``implementation="auto"`` runs the fused Pallas kernel on a CUDA GPU.
#: Off until ``bash benchmarks/gpu_check.sh`` has passed on an H100/H200 and its
#: ``benchmarks/results/step_time_gpu.md`` shows the kernel at least as fast as
#: the XLA path there; until then ``"pallas"`` is opt-in (README, "GPU kernel").
AUTO_USES_KERNEL_ON_GPU = False


def resolve_implementation(implementation: str, quantization: Int8Quantization | None) -> str | None:
  """The Pallas backend INT8 leaves use, or ``None`` for the jnp path.

  ``"auto"`` takes the kernel only on a GPU, with :data:`AUTO_USES_KERNEL_ON_GPU`
  and a power-of-two group size; where JAX no longer ships the Pallas Triton
  backend it warns once and takes the jnp path. ``"pallas"`` raises instead.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
  platform = jax.default_backend()
  if implementation == "xla" or quantization is None:
    return None
  if implementation == "auto":
    group_size = quantization.group_size
    if platform != "gpu" or not AUTO_USES_KERNEL_ON_GPU or group_size & (group_size - 1):
      return None
    try:
      pallas_update.triton_backend()
    except pallas_update.TritonBackendMissing as e:
      warnings.warn(f"{e} implementation='auto' takes the XLA path.", stacklevel=3)
      return None
    return "triton"
  if platform not in ("gpu", "cpu"):
    raise ValueError(f"implementation='pallas' runs on CUDA GPUs (Triton) and, in interpret "
                     f"mode, on CPU; this platform is {platform!r}: use 'xla'.")
  pallas_update.check_group_size(quantization.group_size)
  pallas_update.triton_backend()
  return pallas_update.default_backend()


#: What :func:`check_hyperparameters` requires of each name, and the test.
HYPERPARAMETER_RANGES = {
    "b1": ("in [0, 1)", lambda v: 0 <= v < 1),
    "b2": ("in [0, 1)", lambda v: 0 <= v < 1),
    "eps": ("finite and >= 0", lambda v: 0 <= v < math.inf),
    "learning_rate": ("finite and >= 0", lambda v: 0 <= v < math.inf),
    "weight_decay": ("finite and >= 0", lambda v: 0 <= v < math.inf),
}


def check_hyperparameters(**values: Any) -> None:
  """ValueError for a concrete Python or NumPy number outside :data:`HYPERPARAMETER_RANGES`.

  Schedules, JAX arrays and tracers (``optax.inject_hyperparams``) pass
  through unchecked: their values are not known when the optimizer is built.
  """
  for name, value in values.items():
    requirement, test = HYPERPARAMETER_RANGES[name]
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and not test(value):
      raise ValueError(f"{name} must be {requirement}, got {value}.")


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
  """Per-leaf (in ``tree``'s leaf order) whether m is stochastically rounded.

  A mask is matched to the leaves by path (:func:`.sharding.by_path`), so a
  mask like the whole params also fits the part that ``optax.masked`` hands in.
  """
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
  leaves = sharding_lib.by_path(tree, mask, "stochastic_rounding mask")
  if any(isinstance(x, jax.core.Tracer) for x in leaves):
    raise TypeError("stochastic_rounding must be static Python bools; under "
                    "optax.inject_hyperparams list it in static_args.")
  return [bool(x) for x in leaves]


class Epilogue(NamedTuple):
  """The rest of the ``q_adam_mini`` chain, fused into the step.

  With it the step returns new parameters ``p + (-lr)*(u + wd*p)`` (``wd``
  only where ``decay`` is true) instead of the direction ``u``.
  """

  params: Any
  neg_lr: jax.Array
  wd: jax.Array
  decay: Any  # pytree of bools like params


def adam_mini_step(
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    *,
    partition: partition_lib.BlockPartition | None = None,
    mu_dtype: Any = None,
    quantization: Int8Quantization | None = None,
    stochastic_rounding: StochasticRounding = "auto",
    key: Any = 0,
    implementation: str = "xla",
    shardings: Any = None,
) -> tuple[Callable[[Any], ScaleByAdamMiniState], Callable[..., tuple[Any, ScaleByAdamMiniState]]]:
  """``(init, step)`` of :func:`scale_by_adam_mini`; ``step(g, state, epilogue=None)``."""
  check_hyperparameters(b1=b1, b2=b2, eps=eps)
  partition = partition_lib.BlockPartition() if partition is None else partition
  mu_dtype = _resolve_dtype(mu_dtype)
  backend = resolve_implementation(implementation, quantization)

  def stores_int8(spec, shape):
    """INT8 ``m`` for leaves (layers, if stacked) of at least ``min_size`` elements."""
    return quantization is not None and (
        math.prod(partition_lib.layer_slice(spec, shape)[1]) >= quantization.min_size)

  def leaf_init(spec, leaf):
    if spec is None:
      return optax.MaskedNode(), optax.MaskedNode()
    nu = jnp.zeros(partition_lib.block_shape(spec, leaf.shape), jnp.float32)
    if stores_int8(spec, leaf.shape):  # quantize(zeros), built directly (no reduction to fold)
      return quantize_lib.QuantizedArray(
          jnp.zeros(leaf.shape, jnp.int8),
          jnp.zeros(scales_shape(spec, leaf.shape, quantization), jnp.float32)), nu
    return jnp.zeros(leaf.shape, mu_dtype or leaf.dtype), nu  # optax: None = the param's dtype

  def init_fn(params):
    specs = partition_lib.block_specs(
        params, partition, warn=True, present=sharding_lib.left_out_rules(params, partition))
    leaves, treedef = jax.tree.flatten(params)
    mu, nu = zip(*map(leaf_init, treedef.flatten_up_to(specs), leaves)) if leaves else ((), ())
    return sharding_lib.follow(ScaleByAdamMiniState(
        count=jnp.zeros([], jnp.int32), key=random_bits.key_words(key),
        mu=jax.tree.unflatten(treedef, mu), nu=jax.tree.unflatten(treedef, nu)), params,
        sharding_lib.param_shardings(params, shardings))

  def step_fn(updates, state, epilogue: Epilogue | None = None):
    """On Explicit mesh axes, :func:`auto_step` under :func:`.sharding.on_auto_axes`."""
    if sharding_lib.explicit_specs(updates) is None:
      return auto_step(shardings, updates, state, epilogue)
    decay = epilogue and epilogue.decay  # Python bools: not an argument of auto_axes
    return sharding_lib.on_auto_axes(
        lambda found, g, s, ep: auto_step(found, g, s, ep and ep._replace(decay=decay)), updates,
        (updates, state, epilogue and epilogue._replace(decay=None)),
        like=(epilogue.params if epilogue else updates, state))

  def auto_step(shardings, updates, state, epilogue):
    """The step, with the parameters' shardings (or ``None``)."""
    specs = partition_lib.block_specs(updates, partition)
    paths = _check_tree_matches(updates, specs, state)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    b1_, b2_ = jnp.asarray(b1, jnp.float32), jnp.asarray(b2, jnp.float32)
    bc1 = 1.0 - b1_**t
    sqrt_bc2 = jnp.sqrt(1.0 - b2_**t)
    stochastic = _rounding_mask(stochastic_rounding, specs, updates)

    g_leaves, treedef = jax.tree.flatten(updates)
    leaf_shardings = ([s for _, _, s in sharding_lib.per_parameter(updates, shardings)]
                      if shardings is not None else [None] * len(g_leaves))
    per_leaf = zip(g_leaves, *(treedef.flatten_up_to(tree) for tree in (
        specs, state.mu, state.nu,
        epilogue.params if epilogue else state.mu, epilogue.decay if epilogue else state.mu)),
        stochastic, leaf_shardings)
    out, out_mu, out_nu = [], [], []
    for index, (g, spec, mu, nu, p, decay, sr, leaf_sharding) in enumerate(per_leaf):
      if spec is None:  # left alone (non-float or empty)
        out.append(p if epilogue else
                   g if g.dtype == jax.dtypes.float0 else jnp.zeros_like(g))
        out_mu.append(mu)
        out_nu.append(nu)
        continue
      _check_leaf_matches(paths[index], tuple(g.shape), spec, mu, nu, stores_int8(spec, g.shape))
      g32 = g.astype(jnp.float32)
      nu = b2_ * nu + (1.0 - b2_) * partition_lib.block_mean(g32 * g32, spec)
      # One factor per block, so the per-element work is a single multiply:
      # u = m * 1/((1-b1^t) * (sqrt(v_B)/sqrt(1-b2^t) + eps)).
      factor = 1.0 / (bc1 * (jnp.sqrt(nu) / sqrt_bc2 + eps))
      wd = (epilogue.wd if decay else jnp.zeros([], jnp.float32)) if epilogue else None
      out_nu.append(nu)

      def finish(u, g, p):
        """The chain after the preconditioner: decay, learning rate, apply."""
        u = u.astype(g.dtype)
        if epilogue is None:
          return u
        u = (u + wd * p) if decay else u
        return jnp.asarray(p + epilogue.neg_lr.astype(u.dtype) * u).astype(p.dtype)

      if not stores_int8(spec, g.shape):
        m = b1_ * mu.astype(jnp.float32) + (1.0 - b1_) * g32
        out.append(finish(m * partition_lib.broadcast_block(factor, spec, g.shape), g, p))
        out_mu.append(m.astype(mu.dtype))
        continue
      mu = quantize_lib.QuantizedArray(mu.codes, mu.scales)  # flax.nnx hands it back as a State
      layer_spec, _ = partition_lib.layer_slice(spec, g.shape)
      layout = layout_for(spec, g.shape, quantization)
      seeds = random_bits.stream_seeds(state.key, count, index) if sr else None
      sharded = not (leaf_sharding is None or leaf_sharding.is_fully_replicated)
      if sharded and spec.layers and backend is not None:
        raise sharding_lib.ShardingError(
            f"{paths[index]}: the fused kernel does not run per shard on stacked layers "
            f"(layer axes {spec.layers}); use implementation='xla' for this model.")

      def int8_step(g, mu, factor, p, layer):
        """One layer's (or an unstacked leaf's) update: ``(out, new m)``."""
        streams = seeds
        if seeds is not None and layer is not None:
          streams = random_bits.layer_seeds(*seeds, layer)
        if backend is None:
          m = b1_ * quantize_lib.dequantize(mu, layout) + (1.0 - b1_) * g.astype(jnp.float32)
          noise = None if streams is None else random_bits.uniform(g.shape, *streams)
          u = m * partition_lib.broadcast_block(factor, layer_spec, g.shape)
          return finish(u, g, p), quantize_lib.quantize(m, layout, noise)
        zero, no_word = jnp.zeros([], jnp.float32), jnp.zeros([], jnp.uint32)
        hyper = [b1_, 1.0 - b1_, epilogue.neg_lr if epilogue else zero, wd if epilogue else zero]
        args = (p if epilogue else g, g, mu, pallas_update.factors_2d(factor, layer_spec, layout),
                jnp.stack([jnp.asarray(h, jnp.float32) for h in hyper] + [zero] * 4),
                jnp.stack([*(streams or (no_word, no_word)), no_word, no_word]))  # offsets 0
        kernel_args = dict(stochastic=streams is not None, fuse_step=epilogue is not None,
                           backend=backend, **pallas_update.factor_axes(layer_spec, layout))
        if not sharded:
          return pallas_update.fused_leaf_update(*args, layout=layout, **kernel_args)
        return pallas_update.sharded_leaf_update(
            *args, layout=layout, sharding=leaf_sharding, path=paths[index], **kernel_args)

      p_arg = p if epilogue else None
      if not spec.layers:
        new, mu = int8_step(g, mu, factor, p_arg, None)
      else:  # map one layer's update over the layer axes
        ax, sx = spec.layers, stacked_axes(spec, len(layout.scales_shape))
        sizes = tuple(g.shape[a] for a in ax)
        layers = jnp.arange(math.prod(sizes), dtype=jnp.uint32).reshape(sizes)
        new, mu = per_layer(
            int8_step, (ax, quantize_lib.QuantizedArray(ax, sx), ax, ax if epilogue else None,
                        tuple(range(len(ax)))),
            (ax, quantize_lib.QuantizedArray(ax, sx)))(g, mu, factor, p_arg, layers)
      out.append(new)
      out_mu.append(mu)
    unflatten = lambda leaves: jax.tree.unflatten(treedef, leaves)
    return unflatten(out), sharding_lib.follow(ScaleByAdamMiniState(
        count=count, key=state.key, mu=unflatten(out_mu), nu=unflatten(out_nu)), updates,
        None if shardings is None else sharding_lib.param_shardings(updates, shardings))

  return init_fn, step_fn


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
    implementation: str = "xla",
    shardings: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Rescale updates by Adam-mini's block-wise second moment.

  Args:
    b1: decay of the first moment.
    b2: decay of the block second moment.
    eps: added to ``sqrt(v_B)/sqrt(1-b2^t)`` (outside the square root).
    partition: block rules; default :class:`~.partition.BlockPartition()`.
    mu_dtype: float dtype of a float-stored ``m``; ``None`` (default) means
      the parameter's dtype, as in ``optax.scale_by_adam``.
    quantization: store ``m`` in INT8 (Q-Adam-mini) with these settings;
      ``None`` stores it in ``mu_dtype``.
    stochastic_rounding: which INT8 leaves round stochastically (the rest
      round to nearest): ``"auto"`` = embedding and output blocks.
    key: int seed or JAX PRNG key of the rounding noise (held in the state).
    implementation: how INT8 leaves are updated: ``"xla"`` (jnp, the
      specification), ``"pallas"`` (the fused kernel of
      :mod:`.pallas_update`: Triton on GPU, interpret mode elsewhere) or
      ``"auto"`` (``"xla"`` for now, see :data:`AUTO_USES_KERNEL_ON_GPU`).
      Float leaves always take the jnp path. Both give the same state up to float32 rounding
      (see :mod:`.pallas_update`).
    shardings: the parameters' ``NamedSharding``s (a pytree like params,
      matched by path, so the whole params' fit inside ``optax.masked``), for
      sharded training on Auto mesh axes: the state is constrained to follow
      them (:func:`~qadam_mini_jax.sharding.state_shardings`) and the kernel
      runs per shard under ``shard_map``. Not needed on Explicit axes (read
      from the parameters' types) or for ``tx.init`` outside ``jax.jit``;
      ``jax.jit(tx.init)`` of parameters on Auto axes without it raises.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  init_fn, step_fn = adam_mini_step(
      b1, b2, eps, partition=partition, mu_dtype=mu_dtype, quantization=quantization,
      stochastic_rounding=stochastic_rounding, key=key, implementation=implementation,
      shardings=shardings)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return step_fn(updates, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_tree_matches(updates: Any, specs: Any, state: ScaleByAdamMiniState) -> list[str]:
  """The updates' paths; a ValueError naming paths that the state lacks or has extra."""
  def paths(tree, **kw):
    return [partition_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, **kw)[0]]

  got = paths(updates)
  updated = set(paths(specs, is_leaf=lambda x: isinstance(x, partition_lib.BlockSpec)))
  in_state = set(paths(state.nu))
  if updated != in_state:
    raise ValueError("The updates' tree does not match the optimizer state's: missing from "
                     f"updates {sorted(in_state - updated)[:5]}, not in state "
                     f"{sorted(updated - in_state)[:5]}.")
  return got


def _check_leaf_matches(path: str, shape: tuple[int, ...], spec: partition_lib.BlockSpec,
                        mu: Any, nu: Any, int8: bool) -> None:
  m = getattr(mu, "codes", None) if int8 else mu
  m_shape = None if m is None or not hasattr(m, "shape") else tuple(m.shape)
  want_nu = partition_lib.block_shape(spec, shape)
  if tuple(nu.shape) != want_nu or m_shape != shape:
    raise ValueError(
        f"{path}: update of shape {shape} does not match the optimizer state (first moment "
        f"{m_shape}{' int8' if int8 else ''}, second moment {tuple(nu.shape)}); was the state "
        "initialised for other parameters or another quantization?")
