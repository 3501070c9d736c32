"""The optimizers the training script can select, with one shared recipe around them.

Every optimizer gets the same schedule (linear warmup, cosine decay to
``min_lr_ratio * lr``), global-norm gradient clipping, decoupled weight decay on
the same leaves (:func:`qadam_mini_jax.default_decay_mask`: kernels and
embeddings, not norms), with ``grad_accum > 1`` ``optax.MultiSteps``, and
with ``skip_nonfinite`` ``optax.apply_if_finite`` around it all.

A model with ``scan_layers`` stacks its blocks on axis 0 of every ``layers/``
parameter: :func:`block_partition` declares that axis (``layers={"layers":
0}``), and the decay mask, Adam-mini's blocks and INT8 groups and Adafactor's
update clipping are then per layer, as in the unscanned model.

* ``adamw``: ``optax.adamw``.
* ``adam_mini``, ``q_adam_mini``: this library, with the Adam-mini block
  partition chosen by ``partition`` (see :data:`PARTITIONS`). With
  ``weight_quant`` the weights themselves are INT8 (:func:`quantize_weights`)
  and :func:`fused_step` updates them (no float master copy).
* ``adafactor``: ``optax.adafactor`` with factored second moments, no
  momentum, update clipping 1.0 (per layer: :func:`clip_by_layer_rms`) and
  ``multiply_by_parameter_scale=False`` (so its learning rate means what
  Adam's does); weight decay ``lr * wd``.
* ``mu_dtype`` (``adamw``, ``adam_mini``, ``lion``): the first moment's dtype,
  e.g. ``"bfloat16"`` (2 bytes per parameter instead of 4); ``None``: the
  parameters' (float32).
* ``galore``, ``q_galore``: this library's GaLore and Q-GaLore (INT4
  projectors, lazy per-layer refresh, INT8 ``m``), rank ``rank`` (default a
  quarter of the model's width) refreshed every ``update_proj_gap`` steps;
  the learning rate applies to every parameter, projected or not. With
  ``weight_quant``, ``q_galore`` is Q-GaLore's whole recipe: INT8 weights
  written by ``fused_q_galore``.
* ``micro_adam``: this library's MicroAdam (a window of the last 10 sparse
  gradients, the top 1% of each block of 1024, with 4-bit error feedback;
  no moments kept).
* ``lion``: ``optax.lion``; its learning rate is ``LION_LR_SCALE`` times the
  one given and its weight decay ``1 / LION_LR_SCALE`` times (the Lion paper's
  advice: a sign update needs a 3-10x smaller step), keeping ``lr * wd``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

import qadam_mini_jax
from qadam_mini_jax import in_backward
from llama_model import LlamaConfig

OPTIMIZERS = ("adamw", "adam_mini", "q_adam_mini", "adafactor", "lion", "galore", "q_galore",
              "micro_adam")
#: Those whose fused step writes INT8 weights (``--weight-quant``).
WEIGHT_QUANT_OPTIMIZERS = ("q_adam_mini", "q_galore")
LION_LR_SCALE = 0.1

#: Adam-mini block partitions (``--partition``):
#: ``qk_per_neuron`` (default here): the reference partition, except that query
#: and key get one ``v`` per output neuron (per channel of each head) instead of
#: one per head (``BlockPartition(query_key_per_neuron=True)``): one float per
#: query/key output channel instead of one per head, a negligible cost. At the
#: small scale of this example it halves the gap to AdamW, 2.5% to 1.2%
#: (benchmarks/results/compare/compare.md).
#: ``reference``: the paper's and the reference code's: one ``v`` per token for
#: the embedding and output layer, per head for query/key, per output neuron
#: for value, attention output and MLP, per tensor for norms.
#: ``value_one_block``: the reference with the value kernel as one block (the
#: authors' advice for runs under ~10-20k steps).
PARTITIONS = ("qk_per_neuron", "reference", "value_one_block")
#: ``q_adam_mini``'s ``stochastic_rounding``: ``auto`` (embedding and output
#: layers, the paper's choice), ``all`` INT8 leaves, or ``none``.
ROUNDINGS = ("auto", "all", "none")
#: The optimizers that take ``stochastic_rounding`` (their INT8 state and weights).
ROUNDING_OPTIMIZERS = ("q_adam_mini", "q_galore")
#: ``mu_dtype``: the first moment's dtype, for the optimizers that store it in float.
MU_DTYPES = ("float32", "bfloat16")
MU_DTYPE_OPTIMIZERS = ("adamw", "adam_mini", "lion")
DEFAULT_PARTITION = "qk_per_neuron"

#: Settings that change the optimizer state's structure or meaning: a
#: checkpoint resumes only under the same values.
STRUCTURAL_FIELDS = ("name", "partition", "grad_accum", "stochastic_rounding", "skip_nonfinite",
                     "weight_quant", "mu_dtype", "rank")
#: ``skip_nonfinite``: ``optax.apply_if_finite`` skips at most this many
#: non-finite (micro-batch) gradients in a row, then applies them.
MAX_SKIPPED_IN_A_ROW = 10


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Everything that defines the optimizer and its schedule."""

  name: str = "q_adam_mini"
  lr: float = 3e-3
  total_steps: int = 1000
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  grad_accum: int = 1
  partition: str = DEFAULT_PARTITION
  stochastic_rounding: str = "auto"  # which INT8 leaves: "auto", "all" or "none"
  seed: int = 0
  skip_nonfinite: bool = False  # optax.apply_if_finite around the whole optimizer
  weight_quant: bool = False  # INT8 weights, no float master copy (WEIGHT_QUANT_OPTIMIZERS)
  mu_dtype: str | None = None  # first moment's dtype (MU_DTYPE_OPTIMIZERS); None: the params'
  rank: int | None = None  # galore, q_galore: the projections' rank; None: the model's dim / 4
  update_proj_gap: int = 200  # galore, q_galore: steps between projector refreshes

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f"unknown optimizer {self.name!r}; choose from {', '.join(OPTIMIZERS)}.")
    if self.stochastic_rounding not in ROUNDINGS:
      raise ValueError(f"unknown stochastic_rounding {self.stochastic_rounding!r}; choose from "
                       f"{', '.join(ROUNDINGS)}.")
    if self.stochastic_rounding != "auto" and self.name not in ROUNDING_OPTIMIZERS:
      raise ValueError(f"--stochastic-rounding needs --optimizer {', '.join(ROUNDING_OPTIMIZERS)}: "
                       f"{self.name} has no stochastic rounding to set.")
    if self.partition not in PARTITIONS:
      raise ValueError(f"unknown partition {self.partition!r}; choose from {', '.join(PARTITIONS)}.")
    if self.mu_dtype not in (None, *MU_DTYPES):
      raise ValueError(f"unknown mu_dtype {self.mu_dtype!r}; choose from {', '.join(MU_DTYPES)}.")
    if self.mu_dtype is not None and self.name not in MU_DTYPE_OPTIMIZERS:
      raise ValueError(f"--mu-dtype needs --optimizer {', '.join(MU_DTYPE_OPTIMIZERS)}: "
                       f"{self.name} has no float first moment to set.")
    if (self.rank is not None and self.rank < 1) or self.update_proj_gap < 1:
      raise ValueError(f"rank={self.rank} and update_proj_gap={self.update_proj_gap} must be >= 1.")
    if self.lr <= 0 or self.total_steps < 1 or self.grad_accum < 1:
      raise ValueError("lr must be > 0, total_steps and grad_accum >= 1.")
    if self.weight_quant and (self.name not in WEIGHT_QUANT_OPTIMIZERS or self.grad_accum > 1
                              or self.skip_nonfinite):
      raise ValueError("--weight-quant needs --optimizer q_adam_mini or q_galore, whose fused "
                       "steps write the INT8 weights, without --grad-accum or --skip-nonfinite (they would "
                       f"need float updates); got {self.name}, grad_accum={self.grad_accum}, "
                       f"skip_nonfinite={self.skip_nonfinite}.")
    if not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, total_steps].")


def schedule(c: OptimizerConfig) -> optax.Schedule:
  """Linear warmup from 0 to ``lr``, then cosine decay to ``min_lr_ratio * lr``."""
  return optax.warmup_cosine_decay_schedule(
      0.0, c.lr, c.warmup_steps, c.total_steps, end_value=c.lr * c.min_lr_ratio)


def block_partition(c: OptimizerConfig, model: LlamaConfig) -> qadam_mini_jax.BlockPartition:
  """The Adam-mini partition of ``c.partition`` for this model's heads and layer axis."""
  return qadam_mini_jax.BlockPartition(
      num_heads=model.num_heads, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
      value_as_one_block=c.partition == "value_one_block",
      query_key_per_neuron=c.partition == "qk_per_neuron",
      layers={"layers": 0} if model.scan_layers else None)


def clip_by_layer_rms(threshold: float,
                      partition: qadam_mini_jax.BlockPartition) -> optax.GradientTransformation:
  """``optax.clip_by_block_rms`` with one block per layer of stacked (scanned) leaves."""
  def clip(path, u):
    layers = partition.layer_axes(jax.tree_util.keystr(path, simple=True, separator="/"),
                                  u.shape)
    axes = tuple(i for i in range(u.ndim) if i not in layers)
    return u / jnp.maximum(1.0, jnp.sqrt(jnp.mean(u * u, axis=axes, keepdims=True)) / threshold)

  return optax.stateless(lambda updates, params: jax.tree_util.tree_map_with_path(clip, updates))


def core(c: OptimizerConfig, model: LlamaConfig,
         shardings: Any = None) -> optax.GradientTransformation:
  """The optimizer itself (no clipping or accumulation).

  ``shardings`` (the parameters' ``NamedSharding``s, for sharded training) go
  to ``adam_mini``/``q_adam_mini``, whose state then follows them; the optax
  baselines need no such argument and ignore it.
  """
  lr, partition = schedule(c), block_partition(c, model)
  mask = functools.partial(qadam_mini_jax.default_decay_mask, partition=partition)
  if c.name == "adamw":
    return optax.adamw(lr, c.b1, c.b2, mu_dtype=c.mu_dtype, weight_decay=c.weight_decay,
                       mask=mask)
  if c.name == "adam_mini":
    return qadam_mini_jax.adam_mini(lr, c.b1, c.b2, weight_decay=c.weight_decay, mask=mask,
                                    partition=partition, mu_dtype=c.mu_dtype,
                                    shardings=shardings)
  if c.name == "q_adam_mini":
    return qadam_mini_jax.q_adam_mini(**q_adam_mini_args(c, model), shardings=shardings)
  if c.name == "galore":
    return qadam_mini_jax.galore(**low_rank_args(c, model))
  if c.name == "q_galore":
    return qadam_mini_jax.q_galore(**low_rank_args(c, model), key=c.seed,
                                   stochastic_rounding=c.stochastic_rounding)
  if c.name == "micro_adam":
    return qadam_mini_jax.micro_adam(lr, c.b1, c.b2, weight_decay=c.weight_decay, mask=mask,
                                     partition=partition)
  if c.name == "adafactor":  # optax.adafactor's chain, clipping per layer
    return optax.chain(
        optax.scale_by_factored_rms(), clip_by_layer_rms(1.0, partition),
        optax.scale_by_learning_rate(lr, flip_sign=False),
        optax.add_decayed_weights(lambda count: c.weight_decay * lr(count), mask),
        optax.scale(-1))
  return optax.lion(lambda count: LION_LR_SCALE * lr(count), c.b1, 0.99, mu_dtype=c.mu_dtype,
                    weight_decay=c.weight_decay / LION_LR_SCALE, mask=mask)


def q_adam_mini_args(c: OptimizerConfig, model: LlamaConfig) -> dict[str, Any]:
  """Keyword arguments of ``q_adam_mini`` / ``fused_q_adam_mini`` for this recipe."""
  partition = block_partition(c, model)
  return dict(learning_rate=schedule(c), b1=c.b1, b2=c.b2, weight_decay=c.weight_decay,
              mask=functools.partial(qadam_mini_jax.default_decay_mask, partition=partition),
              partition=partition, key=c.seed, stochastic_rounding=c.stochastic_rounding)


def low_rank_args(c: OptimizerConfig, model: LlamaConfig) -> dict[str, Any]:
  """Keyword arguments of ``galore`` / ``q_galore`` / ``fused_q_galore`` but
  ``key`` and ``stochastic_rounding``, for this recipe."""
  partition = block_partition(c, model)
  return dict(learning_rate=schedule(c), rank=c.rank or model.dim // 4,
              update_proj_gap=c.update_proj_gap, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay,
              mask=functools.partial(qadam_mini_jax.default_decay_mask, partition=partition),
              partition=partition)


def fused_optimizer(c: OptimizerConfig, model: LlamaConfig) -> qadam_mini_jax.FusedOptimizer:
  """The optimizer that writes INT8 weights (``weight_quant``): ``fused_q_adam_mini``
  or ``fused_q_galore``; its state is :func:`core`'s."""
  if c.name == "q_galore":
    return qadam_mini_jax.fused_q_galore(**low_rank_args(c, model), key=c.seed,
                                         stochastic_rounding=c.stochastic_rounding)
  return qadam_mini_jax.fused_q_adam_mini(**q_adam_mini_args(c, model))


def quantize_weights(c: OptimizerConfig, model: LlamaConfig, params: Any) -> Any:
  """``params`` with INT8 weights under ``weight_quant`` (re-quantized with
  stochastic rounding unless ``stochastic_rounding="none"``), else as they are."""
  if not c.weight_quant:
    return params
  return qadam_mini_jax.weights.quantize_params(
      params, block_partition(c, model), stochastic=c.stochastic_rounding != "none")


def fused_step(c: OptimizerConfig, model: LlamaConfig):
  """``step(grads, opt_state, params) -> (params, opt_state)`` for INT8 weights.

  The state is :func:`make`'s (clipping, then ``q_adam_mini`` or ``q_galore``):
  the gradients are clipped by global norm, then :func:`fused_optimizer` adds
  each update and re-quantizes the weights.
  """
  clip = optax.clip_by_global_norm(c.clip_norm)
  fused = fused_optimizer(c, model)

  def step(grads, opt_state, params):
    clip_state, state = opt_state
    grads, clip_state = clip.update(grads, clip_state)
    params, state = fused.step(grads, state, params)
    return params, (clip_state, state)
  return step


#: What ``--update-in-backward`` takes: updates that need no more than a leaf's own gradient.
IN_BACKWARD_OPTIMIZERS = ("adamw", "adam_mini", "q_adam_mini", "lion", "galore", "q_galore",
                          "micro_adam")


def in_backward_optimizer(c: OptimizerConfig, model: LlamaConfig):
  """The optimizer of :func:`make` (its state is :func:`core_state`'s) as
  ``qadam_mini_jax.in_backward.train_step`` takes it; the clipping goes to
  ``train_step(clip_global_norm=c.clip_norm)``."""
  if c.name not in IN_BACKWARD_OPTIMIZERS or c.grad_accum > 1 or c.skip_nonfinite:
    raise ValueError(f"{c.name} with grad_accum={c.grad_accum}, skip_nonfinite="
                     f"{c.skip_nonfinite} cannot update each layer inside the backward pass.")
  if c.weight_quant:
    fused = fused_optimizer(c, model)
    return in_backward.per_leaf(fused) if c.name == "q_galore" else fused
  if c.name in ("adam_mini", "q_adam_mini"):
    return core(c, model)
  return in_backward.per_leaf(core(c, model))


def make(c: OptimizerConfig, model: LlamaConfig,
         shardings: Any = None) -> optax.GradientTransformation:
  """Clipping, then the optimizer; in ``optax.MultiSteps`` to accumulate, in
  ``optax.apply_if_finite`` to skip non-finite gradients.

  ``shardings``: the parameters' shardings, see :func:`core`.
  """
  tx = optax.chain(optax.clip_by_global_norm(c.clip_norm), core(c, model, shardings))
  tx = optax.MultiSteps(tx, c.grad_accum) if c.grad_accum > 1 else tx
  return optax.apply_if_finite(tx, MAX_SKIPPED_IN_A_ROW) if c.skip_nonfinite else tx


def state_nbytes(c: OptimizerConfig, model: LlamaConfig, params: Any) -> int:
  """Bytes of the optimizer's own state (without gradient-accumulation buffers)."""
  shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),  # unsharded
                        qadam_mini_jax.weights.float_like(params))
  return qadam_mini_jax.tree_nbytes(jax.eval_shape(core(c, model).init, shapes))


def core_state(c: OptimizerConfig, opt_state: Any) -> Any:
  """The optimizer's own part of a state of :func:`make` (what :func:`state_nbytes` counts)."""
  if c.skip_nonfinite:
    opt_state = opt_state.inner_state
  if c.grad_accum > 1:
    opt_state = opt_state.inner_opt_state
  return opt_state[1]  # after clip_by_global_norm's (empty) state
