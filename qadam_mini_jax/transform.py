"""``scale_by_adam_mini``: Adam-mini's preconditioner with pluggable momentum storage.

For every parameter block B (Zhang et al. 2024, arXiv:2406.16793, Algorithm 1):

    m   <- b1*m + (1-b1)*g                          (per element)
    v_B <- b2*v_B + (1-b2)*mean_{i in B}(g_i^2)     (one scalar per block)
    u   <- (m/(1-b1^t)) / (sqrt(v_B)/sqrt(1-b2^t) + eps)

``m`` and ``v`` are updated from the same raw gradient, so they live in one
transform (like ``optax.scale_by_adam``). This module only maps one leaf's
update (:func:`.leaf_update.update_leaf`: the block mean of
:mod:`.partition`, ``m`` through its storage of :mod:`.storage`, float or
Q-Adam-mini's group-wise INT8, jnp or the fused kernel) over the tree, with
the settings held in one :class:`AdamMiniConfig`. The update always uses the
full-precision ``m`` of this step; only what is stored for the next step is
quantized.
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
import optax

from qadam_mini_jax import leaf_update as leaf_update_lib
from qadam_mini_jax import pallas_update
from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import random_bits
from qadam_mini_jax import sharding as sharding_lib
from qadam_mini_jax import storage as storage_lib
from qadam_mini_jax import triton_update
from qadam_mini_jax import weights as weights_lib
from qadam_mini_jax.quantize import QuantizedArray
from qadam_mini_jax.storage import (  # noqa: F401  (stacked_axes: re-exported)
    Int8Quantization, layout_for, quantizes, stacked_axes)


#: ``"auto"`` (embedding and output blocks), ``"all"``, ``"none"``, a pytree of
#: bools like the params, or a callable ``params -> pytree of bools``.
StochasticRounding = Union[str, Any, Callable[[Any], Any]]
ROUNDING_CHOICES = ("auto", "all", "none")


IMPLEMENTATIONS = ("auto", "xla", "pallas", "triton")

#: The kernels ``implementation="auto"`` may take on a CUDA GPU, in order of
#: preference: only a kernel that ``bash benchmarks/gpu_check.sh`` measured faster
#: than the XLA path on an H100/H200 (``benchmarks/results/step_time_gpu.md``).
#: Empty until then: ``"pallas"`` and ``"triton"`` are opt-in (README, "GPU kernel").
AUTO_KERNELS_ON_GPU: tuple[str, ...] = ()


#: jax 0.11 deprecated Pallas's Triton backend ("switch to the official Triton bindings and
#: jax_triton"); :func:`resolve_implementation` says so once, where ``"pallas"`` is chosen.
PALLAS_TRITON_DEPRECATED = jax.__version_info__ >= (0, 11)


def _kernel_backend(kernel: str) -> str:
  """The backend of ``kernel`` (``"pallas"`` or ``"triton"``) on this platform, or raise
  saying what is missing (:class:`.pallas_update.TritonBackendMissing`,
  :class:`.triton_update.TritonMissing`)."""
  if kernel == "triton":
    return triton_update.backend()
  platform = jax.default_backend()
  if platform not in ("gpu", "cpu"):
    raise ValueError(f"implementation='pallas' runs on CUDA GPUs (Triton) and, in interpret "
                     f"mode, on CPU; this platform is {platform!r}: use 'xla'.")
  pallas_update.triton_backend()
  if platform == "gpu" and PALLAS_TRITON_DEPRECATED:
    warnings.warn("implementation='pallas' runs on Pallas's Triton backend, which jax 0.11 "
                  "deprecated (JAX warns again as it lowers the kernel); implementation='triton' "
                  "is the same kernel through jax-triton (README, 'GPU kernel').", FutureWarning,
                  stacklevel=4)
  return pallas_update.default_backend()


def resolve_implementation(implementation: str, quantization: Int8Quantization | None) -> str | None:
  """The kernel backend INT8 leaves use, or ``None`` for the jnp path.

  ``"pallas"``: the Pallas kernel (its Triton lowering on a GPU, interpret mode
  on the CPU). ``"triton"``: the ``@triton.jit`` kernel (:mod:`.triton_update`;
  jax-triton on a GPU, Triton's interpreter on the CPU). Both need a
  power-of-two group size and raise when they cannot run. ``"auto"`` takes the
  first of :data:`AUTO_KERNELS_ON_GPU` that runs, on a GPU only; one that does
  not (e.g. a JAX without Pallas's Triton backend) is passed over with a warning.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
  if implementation == "xla" or quantization is None:
    return None
  if implementation != "auto":
    pallas_update.check_group_size(quantization.group_size)
    return _kernel_backend(implementation)
  group_size = quantization.group_size
  if jax.default_backend() != "gpu" or group_size & (group_size - 1):
    return None
  for kernel in AUTO_KERNELS_ON_GPU:
    try:
      return _kernel_backend(kernel)
    except (pallas_update.TritonBackendMissing, triton_update.TritonMissing) as e:
      warnings.warn(f"{e} implementation='auto' passes over the {kernel!r} kernel.",
                    stacklevel=3)
  return None


#: What :func:`check_hyperparameters` requires of each name, and the test.
HYPERPARAMETER_RANGES = {
    "b1": ("in [0, 1)", lambda v: 0 <= v < 1),
    "b2": ("in [0, 1)", lambda v: 0 <= v < 1),
    "eps": ("finite and >= 0", lambda v: 0 <= v < math.inf),
    "learning_rate": ("finite and >= 0", lambda v: 0 <= v < math.inf),
    "weight_decay": ("finite and >= 0", lambda v: 0 <= v < math.inf),
    "update_proj_gap": ("an integer >= 1", lambda v: v >= 1 and v == int(v)),
    "gap_growth": ("an integer >= 1", lambda v: v >= 1 and v == int(v)),
    "scale": ("finite and >= 0", lambda v: 0 <= v < math.inf),
    "cos_threshold": ("finite", lambda v: -math.inf < v < math.inf),
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
    nu: keep-dims block second moment per leaf (float32, or a
      :class:`~qadam_mini_jax.quantize.QuantizedArray` with ``v_quantization``),
      or ``MaskedNode``.
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
  if isinstance(stochastic_rounding, str):  # one of ROUNDING_CHOICES (AdamMiniConfig)
    choice = stochastic_rounding.lower()
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
  only where ``decay`` is true) instead of the direction ``u``; parameters
  stored in INT8 (:class:`~qadam_mini_jax.weights.QuantizedParam`) come back
  re-quantized.
  """

  params: Any
  neg_lr: jax.Array
  wd: jax.Array
  decay: Any  # pytree of bools like params


@dataclasses.dataclass(frozen=True)
class AdamMiniConfig:
  """The settings of :func:`scale_by_adam_mini` (see its arguments)."""

  b1: chex.Numeric = 0.9
  b2: chex.Numeric = 0.999
  eps: chex.Numeric = 1e-8
  partition: partition_lib.BlockPartition = dataclasses.field(
      default_factory=partition_lib.BlockPartition)
  mu_dtype: Any = None
  quantization: Int8Quantization | None = None
  stochastic_rounding: StochasticRounding = "auto"
  key: Any = 0
  implementation: str = "xla"
  shardings: Any = None
  v_quantization: Int8Quantization | None = None

  def __post_init__(self):
    check_hyperparameters(b1=self.b1, b2=self.b2, eps=self.eps)
    random_bits.check_seed(self.key)
    rounding = self.stochastic_rounding
    if isinstance(rounding, str) and rounding.lower() not in ROUNDING_CHOICES:
      raise ValueError(f"stochastic_rounding must be one of {ROUNDING_CHOICES}, a mask pytree "
                       f"or a callable, got {rounding!r}.")
    if self.partition is None:
      object.__setattr__(self, "partition", partition_lib.BlockPartition())
    object.__setattr__(self, "mu_dtype", _resolve_dtype(self.mu_dtype))

  def moment_storage(self, spec: partition_lib.BlockSpec, shape: tuple[int, ...],
                     dtype: Any) -> Any:
    """How ``m`` of a leaf is stored: INT8 (large leaves) or float."""
    if quantizes(spec, shape, self.quantization):
      return storage_lib.Int8Storage(layout_for(spec, shape, self.quantization))
    return storage_lib.FloatStorage(self.mu_dtype or dtype)  # optax: None = the param's dtype

  def second_moment_storage(self, spec: partition_lib.BlockSpec,
                            shape: tuple[int, ...]) -> Any:
    """How ``v`` of a leaf is stored: float32, or in 8 bits (the logarithmic
    code) where the blocks are single elements and the leaf is large."""
    per_element = not spec.axes and spec.heads is None
    if per_element and quantizes(spec, shape, self.v_quantization):
      return storage_lib.Int8Storage(layout_for(spec, shape, self.v_quantization), log=True)
    return storage_lib.FloatStorage(jnp.float32)


class LayerOf(NamedTuple):
  """Which layer a step updates (:func:`adam_mini_step`'s ``layer``).

  Attributes:
    index: the layer (uint32, row-major over the leaves' layer axes).
    params: the whole parameters (stacked; read for shapes, partition and
      storage, not for values).
  """

  index: jax.Array
  params: Any


def adam_mini_step(config: AdamMiniConfig) -> tuple[
    Callable[[Any], ScaleByAdamMiniState], Callable[..., tuple[Any, ScaleByAdamMiniState]]]:
  """``(init, step)`` of :func:`scale_by_adam_mini`; ``step(g, state, epilogue=None, layer=None)``.

  Both map :func:`.leaf_update.update_leaf` (and its storages' ``init``) over
  the tree. With an ``epilogue``, a leaf whose gradient is ``None`` is left as
  it is (parameter and state). With ``layer`` (:class:`LayerOf`, and an
  epilogue), the step updates one layer of stacked leaves
  (:func:`.leaf_update.update_layer`): each gradient given is that layer's,
  and so are the given leaves' ``m``, ``v`` and parameter in ``state`` and
  ``epilogue.params`` (:func:`.partition.take_layer`; the rest of the trees is
  not read); the results hold that layer of those leaves.
  """
  backend = resolve_implementation(config.implementation, config.quantization)
  warned = []  # the partition's "found no ..." warning: once per optimizer, not at every trace

  def init_fn(params):
    shapes = weights_lib.float_like(params)  # INT8 weights: their values' shapes and dtypes
    specs = partition_lib.block_specs(shapes, config.partition, warn=not warned,
                                      present=sharding_lib.left_out_rules(shapes, config.partition))
    warned.append(True)

    def leaf_init(spec, leaf):
      if spec is None:
        return optax.MaskedNode(), optax.MaskedNode()
      storage = config.moment_storage(spec, tuple(leaf.shape), leaf.dtype)
      second = config.second_moment_storage(spec, tuple(leaf.shape))
      return (storage.init(spec, tuple(leaf.shape)),
              second.init(spec, partition_lib.block_shape(spec, leaf.shape)))

    leaves, treedef = jax.tree.flatten(shapes)
    mu, nu = zip(*map(leaf_init, treedef.flatten_up_to(specs), leaves)) if leaves else ((), ())
    return sharding_lib.follow(ScaleByAdamMiniState(
        count=jnp.zeros([], jnp.int32), key=random_bits.key_words(config.key),
        mu=jax.tree.unflatten(treedef, mu), nu=jax.tree.unflatten(treedef, nu)), shapes,
        sharding_lib.param_shardings(weights_lib.codes_of(params), config.shardings))

  def step_fn(updates, state, epilogue: Epilogue | None = None, layer: LayerOf | None = None):
    """On Explicit mesh axes, :func:`auto_step` under :func:`.sharding.on_auto_axes`."""
    if sharding_lib.explicit_specs(updates) is None:
      return auto_step(config.shardings, updates, state, epilogue, layer)
    if layer is not None:
      raise sharding_lib.ShardingError(
          "Updating one layer at a time (inside the backward pass) does not support Explicit "
          "mesh axes yet; use an Auto mesh.")
    decay = epilogue and epilogue.decay  # Python bools: not an argument of auto_axes
    return sharding_lib.on_auto_axes(
        lambda found, g, s, ep: auto_step(found, g, s, ep and ep._replace(decay=decay), None),
        updates, (updates, state, epilogue and epilogue._replace(decay=None)),
        like=(epilogue.params if epilogue else updates, state))

  def auto_step(shardings, updates, state, epilogue, layer):
    """The step, with the parameters' shardings (or ``None``)."""
    shapes = (weights_lib.float_like(layer.params if layer else epilogue.params) if epilogue
              else updates)
    specs = partition_lib.block_specs(shapes, config.partition)
    paths = _check_tree_matches(shapes, specs, state)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    b1, b2 = jnp.asarray(config.b1, jnp.float32), jnp.asarray(config.b2, jnp.float32)
    scalars = leaf_update_lib.StepScalars(
        b1=b1, b2=b2, eps=config.eps, bias_correction1=1.0 - b1**t,
        sqrt_bias_correction2=jnp.sqrt(1.0 - b2**t), count=count, key=state.key,
        neg_lr=epilogue and epilogue.neg_lr, wd=epilogue and epilogue.wd)
    # A mask (callable) sees the whole tree, as without holes or layers.
    stochastic = _rounding_mask(config.stochastic_rounding, specs, shapes if epilogue else updates)

    shape_leaves, treedef = jax.tree.flatten(shapes)
    flat = lambda tree: treedef.flatten_up_to(tree)
    g_leaves = flat(updates)
    params = flat(epilogue.params) if epilogue else [None] * len(g_leaves)
    whole = flat(layer.params) if layer else params
    decays = flat(epilogue.decay) if epilogue else [None] * len(g_leaves)
    leaf_shardings = ([s for _, _, s in sharding_lib.per_parameter(shapes, shardings)]
                      if shardings is not None else [None] * len(g_leaves))
    out, out_mu, out_nu, previous = [], [], [], None
    for index, (g, like, spec, mu, nu, p, full, decay, sr, leaf_sharding) in enumerate(zip(
        g_leaves, shape_leaves, flat(specs), flat(state.mu), flat(state.nu), params, whole,
        decays, stochastic, leaf_shardings)):
      if spec is None or (g is None and epilogue):  # left alone (non-float, empty or skipped)
        out.append(p if epilogue else
                   g if g.dtype == jax.dtypes.float0 else jnp.zeros_like(g))
        out_mu.append(mu)
        out_nu.append(nu)
        continue
      shape = tuple(like.shape)
      moment = config.moment_storage(spec, shape, like.dtype)
      second = config.second_moment_storage(spec, shape)
      if layer is not None and not spec.layers:
        raise ValueError(f"{paths[index]}: updated one layer at a time, but the partition "
                         "declares no layer axes for it (BlockPartition(layers=...)).")
      _check_leaf_matches(paths[index], shape, spec, mu, nu, moment.quantized, second.quantized,
                          layer is not None)
      weights = weights_lib.storage_of(full, paths[index], spec, shape)
      plan = leaf_update_lib.LeafPlan(
          path=paths[index], spec=spec, moment=moment,
          stochastic=sr and moment.quantized, weights=weights,
          decay=None if epilogue is None else bool(decay),
          backend=backend if moment.quantized else None, sharding=leaf_sharding, second=second)
      if plan.moment.quantized and previous is not None:
        # INT8 leaves one after another: the float32 m that each builds before
        # re-quantizing is then never alive beside the others' (on XLA's CPU
        # scheduler all of them were: 3.6 B/param more at the peak of a 1B step).
        (g, mu, nu, p), _ = jax.lax.optimization_barrier(((g, mu, nu, p), previous))
      if layer is None:
        new, mu, nu = leaf_update_lib.update_leaf(plan, scalars, g, mu, nu, p)
      else:
        new, mu, nu = leaf_update_lib.update_layer(plan, scalars, shape, g, mu, nu, p,
                                                   layer.index)
      previous = mu if plan.moment.quantized else previous
      out.append(new)
      out_mu.append(mu)
      out_nu.append(nu)
    unflatten = lambda leaves: jax.tree.unflatten(treedef, leaves)
    new_state = ScaleByAdamMiniState(count=count, key=state.key, mu=unflatten(out_mu),
                                     nu=unflatten(out_nu))
    if layer is None:
      new_state = sharding_lib.follow(
          new_state, shapes, None if shardings is None else sharding_lib.param_shardings(
              shapes, shardings))
    return unflatten(out), new_state

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
    v_quantization: Int8Quantization | None = None,
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
      :mod:`.pallas_update`: Triton on GPU, interpret mode elsewhere),
      ``"triton"`` (the same kernel in :mod:`.triton_update`, through jax-triton) or
      ``"auto"`` (``"xla"`` for now, see :data:`AUTO_KERNELS_ON_GPU`).
      Float leaves always take the jnp path. Both give the same state up to float32 rounding
      (see :mod:`.pallas_update`).
    shardings: the parameters' ``NamedSharding``s (a pytree like params,
      matched by path, so the whole params' fit inside ``optax.masked``), for
      sharded training on Auto mesh axes: the state is constrained to follow
      them (:func:`~qadam_mini_jax.sharding.state_shardings`) and the kernel
      runs per shard under ``shard_map``. Not needed on Explicit axes (read
      from the parameters' types) or for ``tx.init`` outside ``jax.jit``;
      ``jax.jit(tx.init)`` of parameters on Auto axes without it raises.
    v_quantization: store ``v`` in 8 bits where it has one entry per element
      (blocks of one element, as in :func:`~qadam_mini_jax.q_galore`'s inner
      Adam) and the leaf is large: groups as ``m``'s, the logarithmic code of
      :func:`~.quantize.quantize_log`, always rounded stochastically on a
      stream of its own (to nearest, ``v`` stops decaying:
      ``benchmarks/second_moment_code.py``). ``None``: float32.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  init_fn, step_fn = adam_mini_step(AdamMiniConfig(
      b1, b2, eps, partition=partition, mu_dtype=mu_dtype, quantization=quantization,
      stochastic_rounding=stochastic_rounding, key=key, implementation=implementation,
      shardings=shardings, v_quantization=v_quantization))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    weights_lib.check_float(params, "an optax chain cannot apply updates to it: use "
                            "qadam_mini_jax.fused_q_adam_mini(...).step")
    return step_fn(updates, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_tree_matches(updates: Any, specs: Any, state: ScaleByAdamMiniState) -> list[str]:
  """The updates' paths; a ValueError naming paths that the state lacks or has extra."""
  def paths(tree, **kw):
    return [partition_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, **kw)[0]]

  got = paths(updates)
  updated = set(paths(specs, is_leaf=lambda x: isinstance(x, partition_lib.BlockSpec)))
  # Empty float leaves are left alone, with or without state (in_backward.per_leaf
  # hands in the parameters it does not update emptied, beside their state).
  empty = {path for path, x in zip(got, jax.tree.leaves(updates))
           if jnp.issubdtype(x.dtype, jnp.floating) and not x.size}
  in_state = set(paths(state.nu, is_leaf=lambda x: isinstance(x, QuantizedArray)))
  updated |= empty & in_state
  if updated != in_state:
    raise ValueError("The updates' tree does not match the optimizer state's: missing from "
                     f"updates {sorted(in_state - updated)[:5]}, not in state "
                     f"{sorted(updated - in_state)[:5]}.")
  return got


def _check_leaf_matches(path: str, shape: tuple[int, ...], spec: partition_lib.BlockSpec,
                        mu: Any, nu: Any, int8: bool, v_int8: bool = False,
                        one_layer: bool = False) -> None:
  """ValueError naming ``path`` when its ``m`` or ``v`` does not fit the leaf
  (or, with ``one_layer``, one layer of it)."""
  if one_layer:
    spec, shape = partition_lib.layer_slice(spec, shape)

  def shape_of(x, quantized):
    x = getattr(x, "codes", None) if quantized else x
    return None if x is None or not hasattr(x, "shape") else tuple(x.shape)
  m_shape, nu_shape = shape_of(mu, int8), shape_of(nu, v_int8)
  if nu_shape != partition_lib.block_shape(spec, shape) or m_shape != shape:
    raise ValueError(
        f"{path}: update of shape {shape} does not match the optimizer state (first moment "
        f"{m_shape}{' int8' if int8 else ''}, second moment {nu_shape}"
        f"{' 8-bit' if v_int8 else ''}); was the state initialised for other parameters or "
        "another quantization?")
