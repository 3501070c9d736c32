"""``adam_mini``, ``q_adam_mini``, ``galore`` and ``micro_adam``: ``optax.chain``s shaped like ``optax.adamw``.

Each is ``chain(preconditioner, add_decayed_weights, scale_by_learning_rate)``:
Adam-mini (Zhang et al. 2024, arXiv:2406.16793) with decoupled weight decay
(Loshchilov & Hutter 2019), Q-Adam-mini (Han et al., ICML 2025 ES-FoMo
workshop), the same with the first moment stored in INT8, GaLore (Zhao
et al. 2024, arXiv:2403.03507) with Q-GaLore's lazy refresh as an option, and
MicroAdam (Modoranu et al. 2024, NeurIPS).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from qadam_mini_jax import leaf_update
from qadam_mini_jax import low_rank
from qadam_mini_jax import sparse_adam
from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import projection
from qadam_mini_jax import transform
from qadam_mini_jax import weights


_NORM = re.compile(r".*norm.*|ln(_\w+|\d+)?", re.IGNORECASE)


def default_decay_mask(params: Any, partition: partition_lib.BlockPartition | None = None, *,
                       embeddings: bool = True) -> Any:
  """Which leaves weight decay applies to, by rule rather than by rank.

  As in the Adam-mini reference (arXiv:2406.16793, code): no decay for biases
  and norm parameters (a path component containing ``norm``, or ``ln``,
  ``ln_f``, ``ln_1``...), nor for any leaf of rank < 2; embeddings decay
  unless ``embeddings=False``. The layer axes that ``partition`` declares
  (stacked layers) do not count toward the rank, so a stacked norm ``(L, D)``
  is not decayed either.
  """
  partition = partition_lib.BlockPartition() if partition is None else partition

  def decays(path, leaf):
    if not partition_lib.is_trainable(leaf):
      return False
    path = partition_lib.path_str(path)
    names = path.split("/")
    if names[-1].lower() == "bias" or any(_NORM.fullmatch(n) for n in names):
      return False
    layers = partition.layer_axes(path, tuple(leaf.shape))
    inner = tuple(n for i, n in enumerate(leaf.shape) if i not in layers)
    if len(inner) < 2:
      return False
    return embeddings or partition.rule_for(path, inner) != partition_lib.EMBEDDING
  return jax.tree_util.tree_map_with_path(decays, params)


def _mask(mask: Any, partition: partition_lib.BlockPartition | None) -> Any:
  """The decay mask of an alias: ``mask``, or the default for its partition."""
  return functools.partial(default_decay_mask, partition=partition) if mask is None else mask


def _decay_and_scale(preconditioner, learning_rate, weight_decay, mask, partition):
  """``chain(preconditioner, add_decayed_weights, scale_by_learning_rate)``."""
  transform.check_hyperparameters(learning_rate=learning_rate, weight_decay=weight_decay)
  return optax.chain(
      preconditioner,
      optax.add_decayed_weights(weight_decay, _mask(mask, partition)),
      optax.scale_by_learning_rate(learning_rate),
  )


def adam_mini(
    learning_rate: optax.ScalarOrSchedule,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: chex.Numeric = 0.0,
    *,
    mask: Any = None,
    partition: partition_lib.BlockPartition | None = None,
    mu_dtype: Any = None,
    shardings: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Adam-mini with decoupled weight decay; ``m`` in the parameters' dtype (or ``mu_dtype``).

  Args:
    learning_rate: a scalar or an optax schedule.
    b1, b2, eps: Adam-mini's decays and epsilon (outside the square root).
    weight_decay: decoupled weight decay rate (multiplied by the learning rate).
      Numbers given as Python or NumPy scalars are checked (``0 <= b1, b2 < 1``;
      learning rate, ``eps`` and weight decay finite and ``>= 0``; else
      ValueError); schedules and arrays, as under ``optax.inject_hyperparams``,
      are not.
    mask: which leaves decay: a pytree of bools or a callable ``params -> mask``;
      ``None`` means :func:`default_decay_mask` for ``partition`` (no decay on
      norms and biases; a default that ``optax.inject_hyperparams`` does not
      mistake for a schedule).
    partition: Hessian block rules, see
      :class:`~qadam_mini_jax.partition.BlockPartition`.
    mu_dtype: float dtype of ``m`` (``None``: the parameter's, as in
      ``optax.adamw``; e.g. ``"bfloat16"``; pass a string or list
      it in ``static_args`` under ``optax.inject_hyperparams``).
    shardings: the parameters' ``NamedSharding``s for sharded training (the
      state follows them); see :func:`~qadam_mini_jax.sharding.state_shardings`.
  """
  config = transform.AdamMiniConfig(b1, b2, eps, partition=partition, mu_dtype=mu_dtype,
                                    shardings=shardings)
  return _registered(_decay_and_scale(transform.scale_by_adam_mini(**_arguments(config)),
                                      learning_rate, weight_decay, mask, partition),
                     config, learning_rate, weight_decay, mask)


def q_adam_mini(
    learning_rate: optax.ScalarOrSchedule,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: chex.Numeric = 0.0,
    *,
    mask: Any = None,
    partition: partition_lib.BlockPartition | None = None,
    quantization: transform.Int8Quantization | None = transform.Int8Quantization(),
    stochastic_rounding: transform.StochasticRounding = "auto",
    key: Any = 0,
    implementation: str = "auto",
    shardings: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Q-Adam-mini: Adam-mini with ``m`` stored in group-wise INT8 (~1 B/param).

  Args:
    learning_rate, b1, b2, eps, weight_decay, mask, partition: as
      :func:`adam_mini`.
    quantization: INT8 settings; ``None`` keeps ``m`` in float32 (then this is
      exactly :func:`adam_mini`).
    stochastic_rounding: ``"auto"`` (embedding and output blocks, where
      round-to-nearest stalls the decay of rarely updated rows), ``"all"``,
      ``"none"``, or a mask pytree / callable.
    key: int seed or JAX PRNG key for stochastic rounding.
    implementation: for INT8 leaves, ``"xla"`` (jnp), ``"pallas"`` (the fused
      Pallas kernel: Triton on GPU, interpret mode elsewhere), ``"triton"`` (the
      same kernel as ``@triton.jit`` through jax-triton, the ``gpu`` extra) or
      ``"auto"``: ``"xla"`` until a kernel has been measured faster on a GPU
      (:data:`~qadam_mini_jax.transform.AUTO_KERNELS_ON_GPU`).
    shardings: the parameters' ``NamedSharding``s for sharded training: the
      state follows them and the kernel runs per shard (``shard_map``); see
      :mod:`qadam_mini_jax.sharding` for the shardings INT8 groups support.
  """
  config = transform.AdamMiniConfig(
      b1, b2, eps, partition=partition, quantization=quantization,
      stochastic_rounding=stochastic_rounding, key=key, implementation=implementation,
      shardings=shardings)
  return _registered(_decay_and_scale(transform.scale_by_adam_mini(**_arguments(config)),
                                      learning_rate, weight_decay, mask, partition),
                     config, learning_rate, weight_decay, mask)


def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: chex.Numeric = 200,
    scale: chex.Numeric = 0.25,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: chex.Numeric = 0.0,
    *,
    mask: Any = None,
    partition: partition_lib.BlockPartition | None = None,
    projected: Callable[[str, tuple[int, ...]], bool] | None = None,
    cos_threshold: chex.Numeric | None = None,
    gap_growth: chex.Numeric = 2,
    int4_group_size: int | None = None,
    range_finder: projection.RandomizedRange | None = None,
) -> optax.GradientTransformationExtraArgs:
  """GaLore: Adam on rank-``rank`` projections of the attention and MLP gradients.

  ``chain(scale_by_galore(inner=scale_by_adam), add_decayed_weights,
  scale_by_learning_rate)``: the other leaves (embedding, output layer, norms)
  get plain Adam; weight decay is decoupled and applies in the full space.
  ``cos_threshold`` (Q-GaLore: 0.4) turns on Q-GaLore's lazy, per-layer
  refresh and ``int4_group_size=256`` its INT4 projectors. Arguments as
  :func:`~.low_rank.scale_by_galore` and :func:`adam_mini`; the projector state
  is in :class:`~.low_rank.ScaleByGaLoreState`, so a restored checkpoint
  resumes exactly.
  """
  transform.check_hyperparameters(b1=b1, b2=b2, eps=eps)
  return _decay_and_scale(
      low_rank.scale_by_galore(
          rank, update_proj_gap, scale, inner=optax.scale_by_adam(b1, b2, eps),
          partition=partition, projected=projected, cos_threshold=cos_threshold,
          gap_growth=gap_growth, int4_group_size=int4_group_size, range_finder=range_finder),
      learning_rate, weight_decay, mask, partition)


def q_galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: chex.Numeric = 200,
    scale: chex.Numeric = 0.25,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: chex.Numeric = 0.0,
    *,
    mask: Any = None,
    partition: partition_lib.BlockPartition | None = None,
    projected: Callable[[str, tuple[int, ...]], bool] | None = None,
    cos_threshold: chex.Numeric | None = 0.4,
    gap_growth: chex.Numeric = 2,
    int4_group_size: int | None = 256,
    quantization: transform.Int8Quantization | None = transform.Int8Quantization(),
    v_quantization: transform.Int8Quantization | None = transform.Int8Quantization(),
    stochastic_rounding: transform.StochasticRounding = "auto",
    key: Any = 0,
    range_finder: projection.RandomizedRange | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Q-GaLore (Zhang et al. 2024, arXiv:2407.08296): :func:`galore` with its
  INT4 projectors, its lazy per-layer refresh and Adam's ``m`` and ``v`` in 8 bits.

  The inner Adam is :func:`~.transform.scale_by_adam_mini` with one block per
  element (:func:`~.low_rank.inner_partition`), on ``R`` for projected
  matrices and on the gradient elsewhere: ``m`` is stored as
  :func:`q_adam_mini` stores it (group-wise INT8, ``quantization``; rounding
  ``stochastic_rounding`` on streams of ``key`` named by the parameter's
  path), ``v`` in 8 bits with a logarithmic code chosen by measurement
  (``v_quantization``, ``None`` for float32; always rounded stochastically:
  ``benchmarks/second_moment_code.py``). Q-GaLore's code uses bitsandbytes'
  8-bit Adam (``m`` and ``v`` in its dynamic 8-bit code, round to nearest).
  Defaults are Q-GaLore's: ``cos_threshold=0.4``, ``int4_group_size=256``,
  ``scale=0.25``. Other arguments as :func:`galore`.
  """
  transform.check_hyperparameters(b1=b1, b2=b2, eps=eps)
  inner = transform.scale_by_adam_mini(
      b1, b2, eps, partition=low_rank.inner_partition(partition), quantization=quantization,
      stochastic_rounding=stochastic_rounding, key=key, v_quantization=v_quantization)
  preconditioner = low_rank.scale_by_galore(
      rank, update_proj_gap, scale, inner=inner, partition=partition, projected=projected,
      cos_threshold=cos_threshold, gap_growth=gap_growth, int4_group_size=int4_group_size,
      range_finder=range_finder)
  chain = _decay_and_scale(preconditioner, learning_rate, weight_decay, mask, partition)
  _APPLYING_STEPS[chain.init] = _applying_step(preconditioner, learning_rate, weight_decay,
                                               mask, partition)
  return chain


def micro_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: chex.Numeric = 0.0,
    *,
    window: int = 10,
    density: float = 0.01,
    block_size: int = 1024,
    error_bucket: int = 1024,
    mask: Any = None,
    partition: partition_lib.BlockPartition | None = None,
    shardings: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """MicroAdam (Modoranu et al. 2024, NeurIPS) with decoupled weight decay.

  Adam's moments rebuilt each step from a window of the last ``window``
  sparse gradients (the top ``density`` of each block of ``block_size``),
  with the rest fed back through a 4-bit error buffer:
  :func:`~.sparse_adam.scale_by_micro_adam`. About 0.93 bytes of state per
  parameter at the defaults (MicroAdam's m = 10, 1%). ``mask`` and
  ``partition`` as :func:`adam_mini` (the partition's ``layers`` make each
  layer of a stacked leaf an array of its own); the reference decays every
  parameter. ``shardings``: the parameters' shardings, which the state
  follows (FSDP on each layer's first axis).
  """
  return _decay_and_scale(sparse_adam.scale_by_micro_adam(
      window, density, b1, b2, eps, block_size=block_size, error_bucket=error_bucket,
      partition=partition, shardings=shardings), learning_rate, weight_decay, mask, partition)


def fused_q_galore(learning_rate: optax.ScalarOrSchedule, *args: Any,
                   **kwargs: Any) -> FusedOptimizer:
  """:func:`q_galore` that writes the new parameters itself: Q-GaLore's whole
  recipe, with INT8 weights (Zhang et al. 2024, arXiv:2407.08296, Sec. 3.3).

  ``step(grads, state, params) -> (params, state)`` gives the chain's
  parameters, ``p + (-lr)*(u + wd*p)``; ``params`` may hold INT8 weights
  (:class:`~qadam_mini_jax.weights.QuantizedParam`, from
  :func:`~qadam_mini_jax.weights.quantize_params` with the same ``partition``;
  ``grads`` from :func:`~qadam_mini_jax.weights.value_and_grad`), which come
  back re-quantized with stochastic rounding on the stream
  :func:`fused_q_adam_mini` uses for them (key ``key``, step and path), so no
  float master copy exists. Its state is :func:`q_galore`'s with the same
  arguments, which are :func:`q_galore`'s. Inside the backward pass:
  ``in_backward.per_leaf(fused_q_galore(...))``.
  """
  chain = q_galore(learning_rate, *args, **kwargs)
  return FusedOptimizer(chain.init, _APPLYING_STEPS[chain.init])


class FusedOptimizer(NamedTuple):
  """``init(params) -> state`` and ``step(grads, state, params) -> (params, state)``."""

  init: Callable[[Any], Any]
  step: Callable[[Any, Any, Any], tuple[Any, Any]]


def fused_q_adam_mini(
    learning_rate: optax.ScalarOrSchedule,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: chex.Numeric = 0.0,
    *,
    mask: Any = None,
    partition: partition_lib.BlockPartition | None = None,
    quantization: transform.Int8Quantization = transform.Int8Quantization(),
    stochastic_rounding: transform.StochasticRounding = "auto",
    key: Any = 0,
    implementation: str = "auto",
    shardings: Any = None,
) -> FusedOptimizer:
  """:func:`q_adam_mini` that writes the new parameters itself.

  ``step`` does the whole chain (Adam-mini direction, decoupled weight decay,
  learning rate, ``optax.apply_updates``) in one pass per INT8 leaf: with the
  Pallas kernel that reads the parameter, gradient and 1-byte ``m`` and writes
  the parameter and ``m`` (about 14 bytes/param in fp32), instead of writing an
  update that ``apply_updates`` reads again. Its state is that of
  :func:`q_adam_mini` with the same arguments (checkpoints are interchangeable),
  and the parameters it returns equal ``apply_updates`` of that chain's updates
  up to float32 rounding. Arguments are those of :func:`q_adam_mini`.

  ``params`` may hold INT8 weights (:class:`~qadam_mini_jax.weights.QuantizedParam`,
  from :func:`~qadam_mini_jax.weights.quantize_params`, with ``grads`` from
  :func:`~qadam_mini_jax.weights.value_and_grad`): ``step`` returns them
  re-quantized, ``Q(w - lr*(u + wd*w))``, with stochastic rounding on a stream
  of their own (Q-Adam-mini's ``--weight_quant``, no float master copy).
  """
  chain = q_adam_mini(learning_rate, b1, b2, eps, weight_decay, mask=mask, partition=partition,
                      quantization=quantization, stochastic_rounding=stochastic_rounding,
                      key=key, implementation="xla", shardings=shardings)
  return FusedOptimizer(chain.init, _writing_step(transform.AdamMiniConfig(
      b1, b2, eps, partition=partition, quantization=quantization,
      stochastic_rounding=stochastic_rounding, key=key, implementation=implementation,
      shardings=shardings), learning_rate, weight_decay, mask))


def _arguments(config: transform.AdamMiniConfig) -> dict[str, Any]:
  """``config`` as keyword arguments of :func:`~.transform.scale_by_adam_mini`."""
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _writing_step(config: transform.AdamMiniConfig, learning_rate, weight_decay, mask):
  """``step(grads, state, params, layer=None) -> (params, state)``: the chain
  ``chain(scale_by_adam_mini(config), add_decayed_weights, scale_by_learning_rate)``
  on its own state, writing the new parameters itself.

  The chain's own decay and learning-rate transforms give the scalars and
  advance their schedule counts exactly as the chain does. ``grads`` may
  hold ``None`` for leaves left as they are, and ``layer``
  (:class:`~.transform.LayerOf`) updates one layer of stacked leaves (see
  :func:`~.transform.adam_mini_step`).
  """
  _, adam_step = transform.adam_mini_step(config)
  scalars = _chain_scalars(learning_rate, weight_decay)

  def step(grads, state, params, layer=None):
    adam_state, decay_state, lr_state = state
    neg_lr, wd, decay_state, lr_state = scalars(decay_state, lr_state)
    whole = params if layer is None else layer.params
    decays = _decays(mask, config.partition, whole)
    params, adam_state = adam_step(
        grads, adam_state, transform.Epilogue(params, neg_lr, wd, decays), layer)
    return params, (adam_state, decay_state, lr_state)

  return step


def _chain_scalars(learning_rate, weight_decay):
  """``scalars(decay_state, lr_state) -> (-lr, wd, decay_state, lr_state)``: the
  chain's own decay and learning-rate transforms give the scalars and advance
  their schedule counts exactly as the chain does."""
  decay = optax.add_decayed_weights(weight_decay)
  scale = optax.scale_by_learning_rate(learning_rate)
  one = jnp.ones([], jnp.float32)

  def scalars(decay_state, lr_state):
    wd, decay_inner = decay.update(0.0 * one, decay_state.inner_state, one)
    neg_lr, lr_state = scale.update(one, lr_state)
    return neg_lr, wd, decay_state._replace(inner_state=decay_inner), lr_state
  return scalars


def _decays(mask, partition, params):
  """The decay mask of ``params`` (INT8 weights read as their float shapes)."""
  decays = _mask(mask, partition)
  return decays(weights.float_like(params)) if callable(decays) else decays


def _applying_step(preconditioner, learning_rate, weight_decay, mask, partition):
  """``step(grads, state, params) -> (params, state)`` of
  ``chain(preconditioner, add_decayed_weights, scale_by_learning_rate)``
  followed by ``optax.apply_updates``, each leaf written by
  :func:`.leaf_update.write_leaf` (INT8 weights re-quantized on their stream
  of ``key``, the preconditioner's inner Adam-mini key, at its step count).
  A leaf of size 0 is left as it is (``in_backward.per_leaf`` empties the part
  it does not update)."""
  partition = partition_lib.BlockPartition() if partition is None else partition
  scalars = _chain_scalars(learning_rate, weight_decay)

  def step(grads, state, params, layer=None):
    if layer is not None:
      raise TypeError("fused_q_galore updates one layer only through "
                      "in_backward.per_leaf(fused_q_galore(...)).")
    pre_state, decay_state, lr_state = state
    neg_lr, wd, decay_state, lr_state = scalars(decay_state, lr_state)
    directions, pre_state = preconditioner.update(grads, pre_state)
    shapes = weights.float_like(params)
    specs = partition_lib.block_specs(shapes, partition)
    s = leaf_update.StepScalars(None, None, None, None, None, count=pre_state.count,
                                key=pre_state.inner.key, neg_lr=neg_lr, wd=wd)
    flat = lambda tree: jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: x is None or isinstance(x, partition_lib.BlockSpec))[0]
    p_leaves, treedef = jax.tree.flatten(params, is_leaf=weights.is_quantized)
    out = []
    for (path, spec), p, u, decay in zip(
        flat(specs), p_leaves, treedef.flatten_up_to(directions),
        treedef.flatten_up_to(_decays(mask, partition, params))):
      if spec is None or not u.size:
        out.append(p)
        continue
      path = partition_lib.path_str(path)
      plan = leaf_update.LeafPlan(
          path=path, spec=spec, moment=None, stochastic=False,
          weights=weights.storage_of(p, path, spec, tuple(u.shape)), decay=bool(decay))
      out.append(leaf_update.write_leaf(plan, s, u, p))
    return treedef.unflatten(out), (pre_state, decay_state, lr_state)

  return step


#: The applying step of each ``q_galore`` chain, by its ``init``.
_APPLYING_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


#: The writing step of each ``adam_mini`` / ``q_adam_mini`` chain, by its ``init``.
_WRITING_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _registered(chain, config, learning_rate, weight_decay, mask):
  _WRITING_STEPS[chain.init] = _writing_step(config, learning_rate, weight_decay, mask)
  return chain


def writing_step(optimizer: Any) -> Callable[..., tuple[Any, Any]] | None:
  """The step that writes new parameters (``step(grads, state, params,
  layer=None)``, see :func:`_writing_step`) of an optimizer this module
  built: :func:`adam_mini`, :func:`q_adam_mini` (the same arithmetic as the
  chain followed by ``optax.apply_updates``) or :func:`fused_q_adam_mini`;
  ``None`` for any other.
  """
  if isinstance(optimizer, FusedOptimizer):
    return optimizer.step
  init = getattr(optimizer, "init", None)
  try:
    return _WRITING_STEPS.get(init)
  except TypeError:  # not weakly referable
    return None
