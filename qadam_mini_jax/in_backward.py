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

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qadam_mini_jax import alias
from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import transform
from qadam_mini_jax import weights as weights_lib


class PerLeaf(NamedTuple):
  """An optax transformation declared per-leaf (:func:`per_leaf`)."""

  tx: optax.GradientTransformation

  def init(self, params: Any) -> Any:
    return self.tx.init(params)


def per_leaf(tx: optax.GradientTransformation) -> PerLeaf:
  """Declare that ``tx`` updates each leaf from that leaf's gradient, state and parameter alone.

  ``optax.adamw``, ``optax.adam``, ``optax.lion``, ``optax.sgd`` and chains
  of such transforms are; ``optax.clip_by_global_norm``,
  ``optax.apply_if_finite`` and ``optax.MultiSteps`` are not (they read the
  whole gradient), and :func:`train_step` would give them one layer at a
  time. The state must hold trees like the parameters beside shared values
  (as ``optax.tree_utils.tree_map_params`` assumes).
  """
  if not hasattr(tx, "init") or not hasattr(tx, "update"):
    raise TypeError(f"per_leaf takes an optax GradientTransformation, got {type(tx).__name__}.")
  return PerLeaf(tx)


class _ParamsSlot:
  """Stands for the parameter tree in a state built by ``tx.init(_ParamsSlot())``."""


jax.tree_util.register_pytree_node(_ParamsSlot, lambda _: ((), None), lambda *_: _ParamsSlot())


def _per_leaf_step(tx: optax.GradientTransformation, layers: str):
  """``step(grads, state, params, layer=None)`` of a per-leaf optax transform.

  It updates the stacked blocks (``layer`` given: one layer's views) or the
  other parameters (``layer=None``), as one call of ``tx.update`` on that part
  of the trees (the parts of the state that are like the parameters cut the
  same way, the rest of the state shared).
  """
  is_slot = lambda x: isinstance(x, _ParamsSlot)
  try:
    slots = tx.init(_ParamsSlot())
  except Exception as e:  # noqa: BLE001  (any failure means the same: not per-leaf)
    raise TypeError(
        f"per_leaf: {type(e).__name__} from tx.init on a stand-in parameter tree ({e}); "
        "the state of a per-leaf transformation holds trees like the parameters (e.g. "
        "optax.adamw, optax.adam, optax.lion).") from None
  treedef = jax.tree.structure(slots, is_leaf=is_slot)
  is_params = [is_slot(x) for x in jax.tree.leaves(slots, is_leaf=is_slot)]

  def step(grads, state, params, layer=None):
    if layer is None:
      part = lambda tree: {k: v for k, v in tree.items() if k != layers}
      merge = lambda tree, new: {**tree, **new}
    else:
      part = lambda tree: tree[layers]
      merge = lambda tree, new: {**tree, layers: new}
    entries = treedef.flatten_up_to(state)
    sub_state = treedef.unflatten([part(e) if p else e for e, p in zip(entries, is_params)])
    sub_params = part(params)
    updates, sub_state = tx.update(part(grads), sub_state, sub_params)
    new_entries = treedef.flatten_up_to(sub_state)
    state = treedef.unflatten([merge(e, n) if p else n
                               for e, n, p in zip(entries, new_entries, is_params)])
    return merge(params, optax.apply_updates(sub_params, updates)), state

  return step


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


def _state_layer_axes(init: Callable[[Any], Any], params: Any, layers: str, count: int) -> Any:
  """Per state leaf, its layer axis (a 1-tuple) if it holds one entry per layer, else ``None``.

  Found by building the state's shapes for ``count`` and ``count + 1`` layers:
  a leaf of a stacked parameter grows by one on its layer axis, a shared
  value (step count, key) or another parameter's leaf does not change.
  """
  def grown(x):
    return jax.ShapeDtypeStruct((x.shape[0] + 1, *x.shape[1:]), x.dtype)
  shapes = jax.eval_shape(init, params)
  more = jax.eval_shape(init, {**params, layers: jax.tree.map(grown, params[layers])})

  def axes(path, a, b):
    changed = [i for i, (m, n) in enumerate(zip(a.shape, b.shape)) if m != n]
    if not changed:
      return None
    if len(changed) > 1 or a.shape[changed[0]] != count or b.shape[changed[0]] != count + 1:
      raise ValueError(f"optimizer state {partition_lib.path_str(path)}: shape {a.shape} "
                       f"does not keep one entry per layer on one axis; cannot update it one "
                       "layer at a time.")
    return (changed[0],)
  return jax.tree_util.tree_map_with_path(axes, shapes, more)


def train_step(embed: Callable[[Any, Any], jax.Array],
               block: Callable[[Any, jax.Array], jax.Array],
               head: Callable[[Any, jax.Array, Any], jax.Array],
               optimizer: Any, *, layers: str = "layers") -> Callable[..., tuple[Any, Any, Any]]:
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

  Returns:
    ``step(params, state, batch) -> (loss, params, state)``; jit it with
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
    hidden, inputs = jax.lax.scan(lambda h, p: (block(p, h), h), hidden, stack)
    loss, head_vjp = weights_lib.vjp(lambda r, h: head(r, h, batch), rest, hidden)
    rest_grads, d_hidden = head_vjp(jnp.ones_like(loss))

    # Backward: each layer's gradient, then at once that layer's update.
    leaves, treedef = jax.tree.flatten(state)
    axes = treedef.flatten_up_to(_state_layer_axes(init, params, layers, count))
    stacked = [k for k, a in enumerate(axes) if a is not None]
    grad_holes = holes(rest)

    def one_layer(layer, p, state_slices, d_hidden, x):
      _, block_vjp = weights_lib.vjp(block, p, x)
      grads, d_hidden = block_vjp(d_hidden)
      view = list(leaves)
      for k, s in zip(stacked, state_slices):
        view[k] = s
      new_params, new_state = step_fn(
          {**grad_holes, layers: grads}, treedef.unflatten(view), {**params, layers: p},
          transform.LayerOf(layer, params))
      new_leaves = treedef.flatten_up_to(new_state)
      return new_params[layers], [new_leaves[k] for k in stacked], d_hidden

    stack, state_stacks, d_hidden = partition_lib.layer_loop(
        one_layer, (count,), (stack, [leaves[k] for k in stacked], d_hidden),
        (jax.tree.map(lambda _: (0,), stack), [axes[k] for k in stacked], None),
        (inputs,), ((0,),), reverse=True)
    (embed_grads,) = embed_vjp(d_hidden)
    for k, s in zip(stacked, state_stacks):
      leaves[k] = s

    # Then the embedding and head parameters, with the step's shared state.
    grads = {**jax.tree.map(jnp.add, rest_grads, embed_grads), layers: holes(stack)}
    params, state = step_fn(grads, treedef.unflatten(leaves), {**params, layers: stack})
    return loss, params, state

  return step
