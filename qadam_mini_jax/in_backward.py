"""Updates inside the backward pass: each layer updated as soon as its gradient exists.

``jax.grad`` holds the whole gradient tree (4 bytes per parameter in fp32)
before any optimizer runs. For a model whose blocks are stacked (``nnx.scan``,
linen ``nn.scan``, an Equinox stack built with ``filter_vmap``),
:func:`train_step` builds a step that never holds it: the forward pass keeps
each block's input; the backward pass walks the layers in reverse, recomputes a
block, takes its VJP and at once updates that layer's parameters and optimizer
state, written in place into the stacked arrays (donate them); the embedding
and head parameters are updated last. This is the per-layer update of LOMO
(Lv et al. 2023, arXiv:2306.09782) and of Q-GaLore's 7B-on-16-GB run (Zhang et
al. 2024, arXiv:2407.08296, PyTorch backward hooks), with every parameter
updated, norms and head included.

The step does the arithmetic of ``jax.grad`` followed by the optimizer's step
(and ``optax.apply_updates``), with the same rounding streams, so its results
equal the ordinary step's up to float rounding. It takes this library's
:func:`~qadam_mini_jax.adam_mini`, :func:`~qadam_mini_jax.q_adam_mini` and
:func:`~qadam_mini_jax.fused_q_adam_mini` (INT8 weights too), or an optax
transformation declared per-leaf with :func:`per_leaf`. What needs the whole
gradient (``optax.clip_by_global_norm``, ``optax.apply_if_finite``, gradient
accumulation with ``optax.MultiSteps``) cannot run on one layer's gradient and
is not offered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qadam_mini_jax import alias
from qadam_mini_jax import leaf_update
from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import transform
from qadam_mini_jax import weights as weights_lib


class StepMetrics(NamedTuple):
  """What :func:`train_step`'s step reports: the loss and the global norm of the
  gradient (before clipping), both float32 scalars."""

  loss: jax.Array
  grad_norm: jax.Array


class PerLeaf(NamedTuple):
  """An optax transformation (or fused optimizer) declared per-leaf (:func:`per_leaf`)."""

  tx: optax.GradientTransformation | alias.FusedOptimizer

  def init(self, params: Any) -> Any:
    return self.tx.init(params)


def per_leaf(tx: optax.GradientTransformation | alias.FusedOptimizer) -> PerLeaf:
  """Declare that ``tx`` updates each leaf from that leaf's gradient, state and parameter alone.

  ``tx`` is an optax transformation (its updates applied with
  ``optax.apply_updates``) or a :class:`~qadam_mini_jax.FusedOptimizer` that
  writes the parameters itself (:func:`~qadam_mini_jax.fused_q_galore`, for
  INT8 weights).

  ``optax.adamw``, ``optax.adam``, ``optax.lion``, ``optax.sgd`` and chains
  of such transforms are, masks included; ``optax.clip_by_global_norm``,
  ``optax.apply_if_finite`` and ``optax.MultiSteps`` are not (they read the
  whole gradient), and :func:`train_step` would give them one layer at a
  time. :func:`train_step` calls ``tx.update`` on trees shaped like the
  parameters in which the part not being updated has size 0 on axis 0 and a
  stacked leaf holds one layer (its layer axis of size 1), so masks and rules
  that read paths, ranks or layer axes see what they see in the ordinary step.
  """
  if not isinstance(tx, alias.FusedOptimizer) and not (
      hasattr(tx, "init") and hasattr(tx, "update")):
    raise TypeError("per_leaf takes an optax GradientTransformation or a FusedOptimizer, got "
                    f"{type(tx).__name__}.")
  return PerLeaf(tx)


def _empty(x: jax.Array, axis: int = 0) -> jax.Array:
  return jax.lax.slice_in_dim(x, 0, 0, axis=axis)


def _per_leaf_step(tx: optax.GradientTransformation | alias.FusedOptimizer, layers: str):
  """``step(grads, state, params, layer=None)`` of a per-leaf optax transform
  (or fused optimizer).

  With ``layer`` (the views of :func:`train_step`'s loop: one layer of each
  stacked leaf, layer axis removed) it updates that layer; else the
  parameters outside ``params[layers]``. Either way one ``tx.update`` (or
  ``tx.step``) on the whole tree, the other part emptied (size 0 on axis 0) in
  the parameters, gradients and state.
  """
  def write(grads, state, params):
    if isinstance(tx, alias.FusedOptimizer):
      return tx.step(grads, state, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def view(tree, params, layer):
    """``tree`` with the part not updated as ``params``' emptied (``tree`` has holes
    there; in gradients an INT8 weight's part is its value's: a float array)."""
    def empty(x):
      if not weights_lib.is_quantized(x):
        return _empty(x)
      return jax.tree.map(_empty, x) if tree is params else jnp.zeros((0, *x.shape[1:]), x.dtype)
    empties = lambda k: jax.tree.map(empty, params[k], is_leaf=weights_lib.is_quantized)
    if layer is None:
      return {k: empties(k) if k == layers else v for k, v in tree.items()}
    return {k: jax.tree.map(lambda x: jnp.expand_dims(x, 0), v) if k == layers
            else empties(k) for k, v in tree.items()}

  def step(grads, state, params, layer=None):
    whole = params if layer is None else layer.params
    _check_rest_ranks(whole, layers)
    leaves, treedef = jax.tree.flatten(state)
    kinds = treedef.flatten_up_to(_state_axes(tx.init, whole, layers))
    state_view = []
    for x, (kind, axis) in zip(leaves, (k or (None, None) for k in kinds)):
      if kind == "layer":
        x = _empty(x, axis) if layer is None else jnp.expand_dims(x, axis)
      elif kind == "rest" and layer is not None:
        x = _empty(x, axis)
      state_view.append(x)
    p_view = view(params, params, layer)
    # The layer is a stack of one: its rounding streams are the model's layer's.
    with (contextlib.nullcontext() if layer is None else leaf_update.first_layer(layer.index)):
      new_params, new_state = write(view(grads, params, layer), treedef.unflatten(state_view),
                                    p_view)
    out = []
    for x, n, (kind, axis) in zip(leaves, treedef.flatten_up_to(new_state),
                                  (k or (None, None) for k in kinds)):
      if layer is None:
        out.append(x if kind == "layer" else n)
      else:
        out.append(n.squeeze(axis) if kind == "layer" else x)
    if layer is None:
      return {**new_params, layers: params[layers]}, treedef.unflatten(out)
    return ({**params, layers: jax.tree.map(lambda x: x.squeeze(0), new_params[layers])},
            treedef.unflatten(out))

  return step


def _check_rest_ranks(params: Any, layers: str) -> None:
  for path, x in jax.tree_util.tree_flatten_with_path(
      {k: v for k, v in params.items() if k != layers})[0]:
    if not jnp.ndim(x):
      raise ValueError(f"{partition_lib.path_str(path)}: a per_leaf optimizer in train_step "
                       "needs every parameter of rank >= 1 (it empties axis 0 of the part it "
                       "does not update); this one is a scalar.")


def _writing_step(optimizer: Any, layers: str) -> Callable[..., tuple[Any, Any]]:
  """The optimizer's ``step(grads, state, params, layer=None) -> (params, state)``."""
  if isinstance(optimizer, PerLeaf):
    return _per_leaf_step(optimizer.tx, layers)
  step = alias.writing_step(optimizer)
  if step is None:
    raise TypeError(
        f"train_step takes adam_mini, q_adam_mini or fused_q_adam_mini (not wrapped, e.g. in "
        f"optax.inject_hyperparams), or an optax transformation declared per_leaf(tx); got "
        f"{type(optimizer).__name__}. Transforms that read the whole gradient "
        "(clip_by_global_norm, apply_if_finite, MultiSteps) cannot run one layer at a time.")
  return step


def _layer_count(stack: Any, layers: str) -> int:
  """The stack's layer count (axis 0 of every array); ValueError naming a leaf that differs."""
  flat = jax.tree_util.tree_flatten_with_path(stack)[0]
  if not flat:
    raise ValueError(f"params[{layers!r}] holds no arrays.")
  count = None
  for path, x in flat:
    n = x.shape[0] if x.ndim else None
    count = n if count is None else count
    if n is None or n != count:
      raise ValueError(
          f"{layers}/{partition_lib.path_str(path)}: shape {tuple(x.shape)} does not stack "
          f"{count} layers on axis 0 like the other arrays of params[{layers!r}].")
  return count


def _state_axes(init: Callable[[Any], Any], params: Any, layers: str, *,
                rest: bool = True) -> Any:
  """Per state leaf, ``("layer", axis)`` if it holds one entry per layer of the
  stack, ``("rest", axis)`` if it grows on ``axis`` with a parameter outside
  ``params[layers]`` (looked for only with ``rest``), else ``None`` (a shared
  value: step count, key).

  Found by building the state's shapes once with every stacked array one layer
  longer, once with every other array two rows longer (axis 0). A state leaf
  that then takes another form (e.g. a float ``m`` that becomes INT8 past a
  size threshold) follows its parameter on axis 0; one that keeps its shape
  (e.g. the scale of the one INT8 group of a small norm) is shared: it is
  handed whole to every call, and only the call that updates its parameter
  reads it.
  """
  def grown(part, by):
    more = lambda x: (jax.ShapeDtypeStruct((x.shape[0] + by, *x.shape[1:]), x.dtype)
                      if jnp.ndim(x) else x)
    return jax.eval_shape(init, {k: jax.tree.map(more, v) if (k == layers) == (part == "layer")
                                 else v for k, v in params.items()})
  shapes = jax.eval_shape(init, params)
  parts = {"layer": grown("layer", 1), **({"rest": grown("rest", 2)} if rest else {})}

  def changes(a, b):
    if not hasattr(b, "shape"):  # took another form
      return [0]
    return [i for i, (m, n) in enumerate(zip(a.shape, b.shape)) if m != n]

  def axes(path, a, *grown_shapes):
    changed = [(kind, i) for kind, b in zip(parts, grown_shapes) for i in changes(a, b)]
    if not changed:
      return None
    if len(changed) > 1:
      raise ValueError(f"optimizer state {partition_lib.path_str(path)}: shape {a.shape} "
                       "does not follow one parameter on one axis; cannot update it one "
                       "layer at a time.")
    return changed[0]
  return jax.tree_util.tree_map_with_path(axes, shapes, *parts.values())


def _saved(x: jax.Array) -> jax.Array:
  """A block input as the forward pass keeps it: 2-byte floats as their bits
  (XLA:CPU read a saved bf16 stack through a float32 copy of all of it: 1 GiB
  at 7B, batch 1 x 2048)."""
  return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def _restored(x: jax.Array, dtype: Any) -> jax.Array:
  return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def _reads(embed: Callable[[Any, Any], jax.Array], rest: Any, batch: Any) -> list[bool]:
  """Per leaf of ``rest`` (an INT8 weight is one), whether ``embed(rest, batch)`` reads it."""
  leaves, treedef = jax.tree.flatten(rest, is_leaf=weights_lib.is_quantized)
  jaxpr = jax.make_jaxpr(lambda leaves, batch: embed(treedef.unflatten(leaves), batch))(
      leaves, batch).jaxpr
  read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
  arrays = iter(jaxpr.invars)
  return [any([id(next(arrays)) in read for _ in jax.tree.leaves(x)]) for x in leaves]


def _sum_squares(tree: Any) -> jax.Array:
  return sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree))


def train_step(embed: Callable[[Any, Any], jax.Array],
               block: Callable[[Any, jax.Array], jax.Array],
               head: Callable[[Any, jax.Array, Any], jax.Array],
               optimizer: Any, *, layers: str = "layers",
               clip_global_norm: float | None = None) -> Callable[..., tuple[Any, Any, Any]]:
  """A training step that updates each layer inside the backward pass.

  The model comes as pure pieces over a parameter dict ``params`` whose
  entry ``params[layers]`` holds the blocks stacked on axis 0 (every array,
  as ``nnx.scan`` and linen ``nn.scan`` store them); ``rest`` is the dict of
  the other entries:

  * ``embed(rest, batch) -> hidden``,
  * ``block(layer_params, hidden) -> hidden`` for one layer's parameters,
  * ``head(rest, hidden, batch) -> loss`` (a scalar).

  The optimizer is :func:`~qadam_mini_jax.adam_mini`,
  :func:`~qadam_mini_jax.q_adam_mini`, :func:`~qadam_mini_jax.fused_q_adam_mini`
  (``params`` may hold INT8 weights, read by the pieces through
  :func:`~qadam_mini_jax.weights.dequantize`) or :func:`per_leaf` of an optax
  transformation; its partition must declare the stacked axis
  (``BlockPartition(layers={layers: 0})``). Its state is ``optimizer.init(params)``,
  the same as for the ordinary step.

  With ``clip_global_norm`` the gradients are clipped by their global norm as
  ``optax.clip_by_global_norm`` does, exactly: a first backward pass computes
  every layer's gradient only for its norm (one more recomputation and VJP of
  each block: 1.29x the ordinary clipped step's time at 60M, 1.32x at 130M on CPU,
  ``benchmarks/in_backward_time.py``), the second updates.

  Returns:
    ``step(params, state, batch) -> (StepMetrics(loss, grad_norm), params, state)``; jit it with
    ``params`` and ``state`` donated so that the layers are written in place.
  """
  step_fn = _writing_step(optimizer, layers)
  init = optimizer.init

  def step(params, state, batch):
    if not isinstance(params, dict) or layers not in params:
      raise TypeError(f"train_step needs params as a dict with the stacked blocks under "
                      f"{layers!r} (e.g. nnx.state(model, nnx.Param).to_pure_dict()); got "
                      f"{type(params).__name__}" + (f" with keys {sorted(params)}."
                                                    if isinstance(params, dict) else "."))
    stack = params[layers]
    rest = {k: v for k, v in params.items() if k != layers}
    count = _layer_count(stack, layers)
    holes = lambda tree: jax.tree.map(lambda _: None, weights_lib.float_like(tree))

    # Forward: embedding, then each block, keeping each block's input.
    hidden, embed_vjp = weights_lib.vjp(lambda r: embed(r, batch), rest)
    hidden, inputs = jax.lax.scan(lambda h, p: (block(p, h), _saved(h)), hidden, stack)
    # The head reads its INT8 codes and the batch once the blocks have run: else
    # XLA:CPU dequantized the output layer (500 MiB in float32 at 7B) at the step's
    # start and kept it through the forward pass.
    head_rest, head_batch = partition_lib.read_after((rest, batch), [hidden])
    loss, head_vjp = weights_lib.vjp(lambda r, h: head(r, h, head_batch), head_rest, hidden)
    rest_grads, d_hidden = head_vjp(jnp.ones_like(loss))
    # The embedding's gradient is made once the loop has given its cotangent: else
    # XLA:CPU made the zeros it is scattered into (500 MiB at 7B) at the step's start.
    embed_reads = _reads(embed, rest, batch)

    def add_embed_grads(rest_grads, d_hidden):
      def read_grads(d_hidden):
        (grads,) = embed_vjp(d_hidden)
        return [g for g, read in zip(jax.tree.leaves(grads), embed_reads) if read]
      leaves, treedef = jax.tree.flatten(rest_grads)
      embed_grads = iter(partition_lib.run_after([d_hidden], read_grads, d_hidden))
      return treedef.unflatten([g + next(embed_grads) if read else g
                                for g, read in zip(leaves, embed_reads)])

    stack_axes = jax.tree.map(lambda _: (0,), stack)
    layer_grads = lambda p, x, d_hidden: weights_lib.vjp(block, p, x)[1](d_hidden)
    clip, norm = lambda tree: tree, None
    if clip_global_norm is not None:
      # A first backward pass for the gradient's global norm only.
      def norm_of_layer(layer, d_hidden, total, p, x):
        del layer
        grads, d_hidden = layer_grads(p, _restored(x, hidden.dtype), d_hidden)
        return d_hidden, total + _sum_squares(grads)
      d_first, total = partition_lib.layer_loop(
          norm_of_layer, (count,), (d_hidden, jnp.zeros([])), (None, None),
          (stack, inputs), (stack_axes, (0,)), reverse=True)
      rest_grads = add_embed_grads(rest_grads, d_first)
      norm = jnp.sqrt(total + _sum_squares(rest_grads))

      def clip(tree):  # as optax.clip_by_global_norm
        return jax.tree.map(lambda g: jnp.where(norm < clip_global_norm, g, (
            g / norm.astype(g.dtype)) * clip_global_norm), tree)

    # Backward: each layer's gradient, then at once that layer's update. The loop
    # reads its first layer once the head's gradient exists: read at the step's
    # start, the last layer's INT8 weights and state stayed alive through the forward.
    leaves, treedef = jax.tree.flatten(state)
    axes = [a and a[0] == "layer" and (a[1],)
            for a in treedef.flatten_up_to(_state_axes(init, params, layers, rest=False))]
    stacked = [k for k, a in enumerate(axes) if a]
    grad_holes = holes(rest)

    def one_layer(layer, p, state_slices, d_hidden, total, x):
      grads, d_hidden = layer_grads(p, _restored(x, hidden.dtype), d_hidden)
      total = total if norm is not None else total + _sum_squares(grads)
      grads = partition_lib.materialized(clip(grads))  # read by every update: transposed once
      view = list(leaves)
      for k, s in zip(stacked, state_slices):
        view[k] = s
      new_params, new_state = step_fn(
          {**grad_holes, layers: grads}, treedef.unflatten(view), {**params, layers: p},
          transform.LayerOf(layer, params))
      new_leaves = treedef.flatten_up_to(new_state)
      return new_params[layers], [new_leaves[k] for k in stacked], d_hidden, total

    stack, state_stacks, d_hidden, total = partition_lib.layer_loop(
        one_layer, (count,), (stack, [leaves[k] for k in stacked], d_hidden, jnp.zeros([])),
        (stack_axes, [axes[k] for k in stacked], None, None), (inputs,), ((0,),),
        reverse=True, after=(d_hidden,))
    if clip_global_norm is None:
      rest_grads = add_embed_grads(rest_grads, d_hidden)
      norm = jnp.sqrt(total + _sum_squares(rest_grads))
    for k, s in zip(stacked, state_stacks):
      leaves[k] = s

    # Then the embedding and head parameters, with the step's shared state.
    grads = {**clip(rest_grads), layers: holes(stack)}
    params, state = step_fn(grads, treedef.unflatten(leaves), {**params, layers: stack})
    return StepMetrics(loss, norm), params, state

  return step
