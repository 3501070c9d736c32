"""Block partition of a parameter pytree into Adam-mini's Hessian blocks.

Adam-mini (Zhang et al. 2024, arXiv:2406.16793, Algorithm 1 and Sec. 2.3) keeps one
second-moment scalar per dense Hessian sub-block: one per token for embedding and
output layers, one per head for query and key, one per output neuron for value,
attention output and MLP layers, and one per tensor for everything else.

A :class:`BlockSpec` says, for one leaf, which axes a block spans. The second
moment ``v`` of that leaf is stored "keep-dims": it has the parameter's rank, the
reduced axes have size 1 and a heads axis has size ``num_heads``.

:class:`BlockPartition` holds the rules that map parameter paths to specs. The
defaults recognise LLaMA-style names in Flax layouts: ``nnx.Linear``/``nn.Dense``
kernels are ``(in, out)``, ``nnx.Embed`` tables are ``(vocab, dim)``, and
``DenseGeneral`` query/key/value kernels are ``(in, heads, head_dim)``.
Names are matched against whole path components, never loose substrings.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np


class BlockSpec(NamedTuple):
  """Which elements of one parameter share one second-moment scalar.

  Attributes:
    axes: axes of the parameter that a block spans (size 1 in ``v``).
    heads: ``(axis, num_heads)`` to split ``axis`` into ``(num_heads,
      head_dim)`` first: one block per head, also spanning ``head_dim``.
      ``axis`` must not be listed in ``axes``.
    rule: name of the rule that produced the spec (for :func:`describe`).
    layers: axes that stack layers (scanned models): never in ``axes``; the
      INT8 groups, rounding streams and storage choice of the leaf are those
      of each layer alone.
  """

  axes: tuple[int, ...]
  heads: tuple[int, int] | None = None
  rule: str = "custom"
  layers: tuple[int, ...] = ()


# Rule names, in the order the default rules try them.
PER_ELEMENT = "per_element"  # biases: plain Adam
EMBEDDING = "embedding"  # one block per token (row of a (vocab, dim) table)
QUERY = "query"  # one block per head
KEY = "key"  # one block per (kv) head
QKV = "fused_qkv"  # one block per head over all q, k and v heads
VALUE = "value"  # one block per output neuron (or one block, see switch)
ATTN_OUT = "attn_out"  # one block per output neuron
MLP = "mlp"  # one block per output neuron
OUTPUT = "output"  # one block per token (output column of a (dim, vocab) kernel)
WHOLE = "whole"  # one block for the whole tensor

#: Default names, matched as whole path components (case-insensitive).
DEFAULT_NAMES: dict[str, tuple[str, ...]] = {
    EMBEDDING: ("embed", "embedding", "embed_tokens", "embeddings", "wte",
                "tok_embeddings", "token_embedding", "word_embeddings", "embd"),
    QKV: ("qkv", "qkv_proj", "wqkv", "c_attn", "query_key_value"),
    QUERY: ("q_proj", "wq", "query", "q"),
    KEY: ("k_proj", "wk", "key", "k"),
    VALUE: ("v_proj", "wv", "value", "v"),
    ATTN_OUT: ("o_proj", "wo", "out_proj", "out", "attn_out", "dense_out"),
    MLP: ("mlp", "feed_forward", "ffn", "feedforward", "gate_proj", "up_proj",
          "down_proj", "w1", "w2", "w3", "fc1", "fc2", "c_fc", "wi", "wi_0",
          "wi_1"),
    OUTPUT: ("lm_head", "output", "head", "unembed", "final_layer",
             "output_layer", "logits"),
}

Rule = Union[str, BlockSpec, Callable[[str, tuple[int, ...]], BlockSpec]]

KERNEL_LAYOUTS = ("in_out", "out_in")


class PartitionError(ValueError):
  """A block rule does not fit a parameter (the message names its path)."""


def path_str(path: tuple[Any, ...]) -> str:
  """'/'-joined names of a key path (a trailing nnx ``.value`` is dropped)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  if len(parts) > 1 and parts[-1] == "value":
    parts.pop()
  return "/".join(parts)


def is_trainable(leaf: Any) -> bool:
  """Leaves the optimizer updates: non-empty floating-point arrays."""
  return (hasattr(leaf, "dtype") and hasattr(leaf, "shape")
          and jnp.issubdtype(leaf.dtype, jnp.floating)
          and math.prod(leaf.shape) > 0)


def _matches(pattern: str, components: list[str]) -> bool:
  """Whether ``pattern`` fully matches a suffix of whole path components."""
  return any(re.fullmatch(pattern, "/".join(components[i:]), re.IGNORECASE)
             for i in range(len(components)))


@dataclasses.dataclass(frozen=True)
class BlockPartition:
  """Rules mapping each parameter to its :class:`BlockSpec` (Adam-mini Sec. 2.3).

  Attributes:
    num_heads: query heads, needed for 2-D ``(in, heads*head_dim)`` query
      kernels (3-D ``(in, heads, head_dim)`` kernels give it by their shape).
    num_kv_heads: key heads for grouped-query attention (default
      ``num_heads``).
    head_dim: alternative to head counts: heads are ``axis_size // head_dim``
      (this is GQA-aware by itself and allows ``head_dim != dim / num_heads``).
    value_as_one_block: one block for the whole value kernel instead of one
      per output neuron; the authors' recommendation for runs under ~10-20k
      steps.
    query_key_per_neuron: one block per output neuron of the query and key
      kernels (as for value) instead of one per head: ``head_dim`` times more
      ``v`` scalars there, still a negligible share. On the 0.8M-parameter
      byte-level LLaMA of ``benchmarks/results/compare`` it halves Adam-mini's
      gap to AdamW (2.5% to 1.2% in validation loss); the paper's per-head
      blocks stay the default.
    kernel_layout: ``"in_out"`` for Flax kernels (``nnx.Linear``, ``nn.Dense``,
      ``DenseGeneral``: input axis first) or ``"out_in"`` for Equinox
      ``Linear.weight`` and weights converted from PyTorch (output axes
      first, input axis last; 3-D query/key kernels ``(heads, head_dim, in)``).
      Embedding tables are ``(vocab, dim)`` in both.
    layers: stacked (scanned) layers: a mapping from a regular expression,
      matched against whole path components anywhere in a parameter's path
      (``"layers"`` matches ``"decoder/layers/mlp/wi_0/kernel"``), to the
      position of the layer axis in those parameters: 0 for ``nnx.scan``,
      linen ``nn.scan`` and Levanter, 1 for MaxText (``param_scan_axis=1``),
      or a tuple of positions for nested scans. Every rule then applies to
      each layer's slice, so the blocks, INT8 groups, stochastic-rounding
      streams and weight decay are those of the unstacked model.
    rules: user rules tried before the defaults: either a mapping from a
      regular expression (matched against whole trailing path components, so
      ``"q_proj/kernel"`` matches ``"layers/0/attn/q_proj/kernel"``) to a rule,
      or a callable ``(path, shape) -> rule | None``. A rule is a rule name
      (``"embedding"``, ``"query"``, ``"key"``, ``"fused_qkv"``, ``"value"``,
      ``"attn_out"``, ``"mlp"``, ``"output"``, ``"whole"``,
      ``"per_element"``), a :class:`BlockSpec`, or a callable ``(path, shape)
      -> BlockSpec``. In stacked layers, rules see one layer's shape.
  """

  num_heads: int | None = None
  num_kv_heads: int | None = None
  head_dim: int | None = None
  value_as_one_block: bool = False
  query_key_per_neuron: bool = False
  kernel_layout: str = "in_out"
  layers: Mapping[str, int | tuple[int, ...]] | None = None
  rules: Mapping[str, Rule] | Callable[[str, tuple[int, ...]], Rule | None] | None = None

  def __post_init__(self):
    if self.kernel_layout not in KERNEL_LAYOUTS:
      raise ValueError(f"BlockPartition.kernel_layout must be one of {KERNEL_LAYOUTS}, "
                       f"got {self.kernel_layout!r}.")
    for name in ("num_heads", "num_kv_heads", "head_dim"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
                                or value < 1):
        raise ValueError(f"BlockPartition.{name} must be a positive int, got {value!r}.")
    if not (self.rules is None or callable(self.rules) or isinstance(self.rules, Mapping)):
      raise ValueError("BlockPartition.rules must be a mapping from path patterns to rules or a "
                       f"callable (path, shape) -> rule, got {self.rules!r}.")
    if self.layers is not None and not isinstance(self.layers, Mapping):
      raise ValueError("BlockPartition.layers must be a mapping from path patterns to layer "
                       f"axes, got {self.layers!r}.")
    for pattern, axes in (self.layers or {}).items():
      axes = (axes,) if isinstance(axes, (int, np.integer)) else axes
      if not isinstance(axes, (tuple, list)) or not all(
          isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axes):
        raise ValueError(f"BlockPartition.layers[{pattern!r}] must be an int or a tuple of ints "
                         f"(layer axis positions), got {self.layers[pattern]!r}.")

  # -- rule lookup ------------------------------------------------------------

  def rule_for(self, path: str, shape: tuple[int, ...]) -> Rule:
    """The rule for one parameter: user rules first, then the defaults."""
    components = path.split("/")
    if callable(self.rules):
      rule = self.rules(path, shape)
      if rule is not None:
        return rule
    elif self.rules:
      for pattern, rule in self.rules.items():
        if _matches(pattern, components):
          return rule
    return self._default_rule(components, shape)

  def _default_rule(self, components: list[str], shape: tuple[int, ...]) -> str:
    names = [c.lower() for c in components]
    if names[-1] == "bias":
      return PER_ELEMENT
    if len(shape) < 2:
      return WHOLE
    for rule, known in DEFAULT_NAMES.items():
      if any(n in known for n in names[:-1]) or (rule == EMBEDDING and names[-1] in known):
        return rule
    return WHOLE

  # -- specs ------------------------------------------------------------------

  def layer_axes(self, path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Positions of the layer axes of one parameter (``()`` outside stacked layers)."""
    components = path.split("/")
    for pattern, axes in (self.layers or {}).items():
      if any(re.fullmatch(pattern, "/".join(components[i:j]), re.IGNORECASE)
             for i in range(len(components)) for j in range(i + 1, len(components) + 1)):
        axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
        if any(not 0 <= a < len(shape) for a in axes) or len(set(axes)) != len(axes):
          raise PartitionError(
              f"{path}: layer axes {axes} (layers={{{pattern!r}: ...}}) do not fit shape {shape}.")
        return tuple(sorted(axes))
    return ()

  def spec(self, path: str, shape: tuple[int, ...]) -> BlockSpec:
    """The :class:`BlockSpec` of one parameter; raises :class:`PartitionError`.

    In stacked layers the rule is applied to one layer's shape and its axes
    are mapped back around the layer axes.
    """
    layers = self.layer_axes(path, shape)
    kept = [i for i in range(len(shape)) if i not in layers]
    inner = tuple(shape[i] for i in kept)
    rule = self.rule_for(path, inner)
    if isinstance(rule, BlockSpec):
      spec = rule
    elif isinstance(rule, str):
      spec = self._named_spec(rule, path, inner)
    elif callable(rule):
      spec = rule(path, inner)
    else:
      raise PartitionError(f"{path}: a rule must be a name, a BlockSpec or a "
                           f"callable, got {rule!r}.")
    _check_spec(spec, path, inner)
    if not layers:
      return spec
    spec = normalize_spec(spec, len(inner))
    heads = None if spec.heads is None else (kept[spec.heads[0]], spec.heads[1])
    return BlockSpec(tuple(kept[a] for a in spec.axes), heads, spec.rule, layers)

  def _heads(self, rule: str, path: str, shape: tuple[int, ...], axis: int) -> int:
    """Number of heads that ``axis`` of a 2-D query/key/QKV kernel splits into."""
    size = shape[axis]
    if self.head_dim is not None:
      if size % self.head_dim:
        raise PartitionError(
            f"{path}: {rule} axis {axis} of size {size} is not a multiple of "
            f"head_dim={self.head_dim} (shape {shape}).")
      return size // self.head_dim
    kv_heads = self.num_kv_heads or self.num_heads
    heads = {QUERY: self.num_heads, KEY: kv_heads,
             QKV: self.num_heads and self.num_heads + 2 * kv_heads}[rule]
    if heads is None:
      raise PartitionError(
          f"{path}: the {rule} rule needs the head count of a 2-D kernel "
          f"{shape}; pass BlockPartition(num_heads=..., num_kv_heads=...) or "
          "head_dim=..., or use a 3-D (in, heads, head_dim) kernel.")
    if size % heads:
      raise PartitionError(
          f"{path}: {rule} axis {axis} of size {size} does not split into "
          f"{heads} heads (shape {shape}).")
    return heads

  def _check_head_axis(self, rule: str, path: str, shape: tuple[int, ...]) -> None:
    """A 3-D ``(in, heads, head_dim)`` kernel must agree with the configured heads.

    This is what catches a stacked ``(layers, in, heads*head_dim)`` kernel
    whose layer axis was not declared (``layers=``).
    """
    heads = {QUERY: self.num_heads, KEY: self.num_kv_heads or self.num_heads}[rule]
    if (heads is not None and shape[1] != heads) or (
        self.head_dim is not None and shape[2] != self.head_dim):
      raise PartitionError(
          f"{path}: a 3-D {rule} kernel {shape} is read as (in, heads, head_dim), which "
          f"contradicts num_heads/num_kv_heads={heads}, head_dim={self.head_dim}; if it "
          "stacks layers, declare them with BlockPartition(layers={...}).")

  def _named_spec(self, rule: str, path: str, shape: tuple[int, ...]) -> BlockSpec:
    """A named rule's spec; ``(out..., in)`` kernels are read through their
    ``(in, out...)`` view (the input axis moved first)."""
    if self.kernel_layout == "in_out" or len(shape) < 2 or rule in (PER_ELEMENT, WHOLE, EMBEDDING):
      return self._in_out_spec(rule, path, shape)
    full = (len(shape) - 1,) + tuple(range(len(shape) - 1))  # view axis -> leaf axis
    view = tuple(shape[a] for a in full)
    try:
      spec = self._in_out_spec(rule, path, view)
    except PartitionError as e:  # its axes and shape are the view's: say so
      raise PartitionError(f"{str(e).rstrip('.')} (kernel_layout='out_in': axes and shape of "
                           f"its (in, out...) view {view}; the leaf's shape is {shape}).") from None
    heads = None if spec.heads is None else (full[spec.heads[0]], spec.heads[1])
    return BlockSpec(tuple(full[a] for a in spec.axes), heads, spec.rule)

  def _in_out_spec(self, rule: str, path: str, shape: tuple[int, ...]) -> BlockSpec:
    ndim = len(shape)
    all_axes = tuple(range(ndim))
    if rule == PER_ELEMENT:
      return BlockSpec((), None, rule)
    if rule == WHOLE or (rule == VALUE and self.value_as_one_block):
      return BlockSpec(all_axes, None, rule)
    if ndim < 2:
      raise PartitionError(
          f"{path}: the {rule} rule needs a kernel of rank >= 2, got shape {shape}.")
    if rule == EMBEDDING:  # (vocab, dim...): one block per row
      return BlockSpec(all_axes[1:], None, rule)
    if rule in (QUERY, KEY, QKV) and self.query_key_per_neuron:  # (in, out...)
      return BlockSpec((0,), None, rule)
    if rule in (QUERY, KEY, QKV):
      if ndim == 3 and rule != QKV:  # (in, heads, head_dim)
        self._check_head_axis(rule, path, shape)
        return BlockSpec((0, 2), None, rule)
      if ndim != 2:
        raise PartitionError(
            f"{path}: the {rule} rule expects (in, heads*head_dim) or "
            f"(in, heads, head_dim), got shape {shape}.")
      return BlockSpec((0,), (1, self._heads(rule, path, shape, 1)), rule)
    if rule == VALUE:  # (in, out...) : one block per output neuron
      return BlockSpec((0,), None, rule)
    if rule in (MLP, OUTPUT) and ndim > 2:
      raise PartitionError(
          f"{path}: a {rule} kernel is (in, out), got shape {shape}; if it stacks layers, "
          "declare them with BlockPartition(layers={...}), else give it a rule (rules=).")
    if rule in (ATTN_OUT, MLP, OUTPUT):  # (in..., out); DenseGeneral attention out: (heads, head_dim, out)
      return BlockSpec(all_axes[:-1], None, rule)
    raise PartitionError(f"{path}: unknown rule name {rule!r}.")


def _check_spec(spec: Any, path: str, shape: tuple[int, ...]) -> None:
  if not isinstance(spec, BlockSpec):
    raise PartitionError(f"{path}: a rule returned {spec!r}, not a BlockSpec.")
  ndim = len(shape)
  axes = spec.axes
  if any(not -ndim <= a < ndim for a in axes) or len(set(a % max(ndim, 1) for a in axes)) != len(axes):
    raise PartitionError(f"{path}: block axes {axes} are invalid for shape {shape}.")
  if spec.heads is not None:
    axis, heads = spec.heads
    if not 0 <= axis < ndim or axis in {a % ndim for a in axes}:
      raise PartitionError(
          f"{path}: heads axis {axis} is invalid for shape {shape} and axes {axes}.")
    if heads < 1 or shape[axis] % heads:
      raise PartitionError(
          f"{path}: axis {axis} of size {shape[axis]} does not split into "
          f"{heads} heads (shape {shape}).")


def normalize_spec(spec: BlockSpec, ndim: int) -> BlockSpec:
  """Spec with non-negative, sorted axes."""
  return spec._replace(axes=tuple(sorted(a % ndim for a in spec.axes)))


def layer_slice(spec: BlockSpec, shape: tuple[int, ...]) -> tuple[BlockSpec, tuple[int, ...]]:
  """The spec and shape of one layer of a stacked leaf (the leaf itself if unstacked)."""
  if not spec.layers:
    return spec, shape
  kept = [i for i in range(len(shape)) if i not in spec.layers]
  inner = {full: k for k, full in enumerate(kept)}
  heads = None if spec.heads is None else (inner[spec.heads[0]], spec.heads[1])
  return (BlockSpec(tuple(inner[a] for a in spec.axes), heads, spec.rule),
          tuple(shape[i] for i in kept))


def is_axes(a: Any) -> bool:
  """Whether ``a`` is a tuple of layer-axis positions (a leaf of an axes pytree)."""
  return isinstance(a, tuple) and all(isinstance(i, int) for i in a)


def _axes_or_none(a: Any) -> bool:
  """A leaf of an axes pytree that may also say ``None`` (not stacked)."""
  return a is None or is_axes(a)


def per_layer(fn: Callable[..., Any], in_axes: tuple[Any, ...], out_axes: tuple[Any, ...]):
  """``fn`` of one layer's arrays, mapped over the layer axes of a stacked leaf.

  ``in_axes`` / ``out_axes`` give, per argument / result (a pytree prefix),
  the ascending positions of the layer axes in the stacked array, or ``None``
  for an argument shared by all layers.
  """
  def nth(axes, k):
    return jax.tree.map(lambda a: None if a is None else a[k] - k, axes,
                        is_leaf=_axes_or_none)
  count = len(jax.tree.leaves(out_axes, is_leaf=is_axes)[0])
  for k in reversed(range(count)):
    fn = jax.vmap(fn, in_axes=nth(in_axes, k), out_axes=nth(out_axes, k))
  return fn


def _starts(x: jax.Array, axes: tuple[int, ...], index: list[jax.Array]) -> list[jax.Array]:
  out = [jnp.zeros([], jnp.int32)] * x.ndim
  for a, i in zip(axes, index):
    out[a] = i
  return out


def take_layer(tree: Any, axes: Any, index: list[jax.Array]) -> Any:
  """Layer ``index`` (one position per layer axis) of each array of ``tree``.

  ``axes`` is a pytree prefix of ``tree`` holding the layer axes of each array
  (a tuple), or ``None`` for a part that is not stacked (returned as it is).
  """
  def take(a, x):
    if a is None:
      return x
    window = [1 if i in a else n for i, n in enumerate(x.shape)]
    return jax.lax.dynamic_slice(x, _starts(x, a, index), window).squeeze(a)
  return jax.tree.map(take, axes, tree, is_leaf=_axes_or_none)


def put_layer(tree: Any, axes: Any, layer: Any, index: list[jax.Array]) -> Any:
  """``tree`` with layer ``index`` of each stacked array replaced by ``layer``'s
  (as :func:`take_layer`; parts with ``None`` axes are left as they are)."""
  def put(a, x, v):
    if a is None:
      return x
    return jax.lax.dynamic_update_slice(x, jnp.expand_dims(v, a), _starts(x, a, index))
  return jax.tree.map(put, axes, tree, layer, is_leaf=_axes_or_none)


#: The arrays every layer loop's first read waits for (see :func:`updates_wait_for`).
_WAIT_FOR: contextvars.ContextVar = contextvars.ContextVar("updates_wait_for", default=())


@contextlib.contextmanager
def updates_wait_for(*arrays: jax.Array):
  """Updates traced in this block read their stacked leaves only once ``arrays`` exist.

  For a metric computed from the gradients in the same step (their global norm,
  for logging)::

    grad_norm = optax.tree.norm(grads)
    with qadam_mini_jax.updates_wait_for(grad_norm):
      updates, opt_state = tx.update(grads, opt_state, params)

  The updates that go one layer at a time (:func:`layer_loop`: ``q_adam_mini``'s
  INT8 ``m``, Q-GaLore, MicroAdam, INT8 weights) write each stacked leaf's
  result over its gradient or state in place, and XLA orders work by data
  alone: a metric that also reads the gradient could run after the writes, so
  XLA copied every stacked gradient to keep it. With the metric an input of
  each loop's first read, nothing is copied, and no first layer is read (and
  kept through the backward pass) at the step's start either. In
  ``benchmarks/fits.py`` (CPU) this took ``q_adam_mini``'s temporaries at 13B
  from 60.0 to 53.8 GiB. The values are unchanged; only the order is.
  """
  for i, x in enumerate(arrays):
    if not isinstance(x, jax.Array):
      raise TypeError(f"updates_wait_for takes arrays; argument {i} is {type(x).__name__}.")
  token = _WAIT_FOR.set(_WAIT_FOR.get() + arrays)
  try:
    yield
  finally:
    _WAIT_FOR.reset(token)


def layer_loop(fn: Callable[..., tuple[Any, ...]], sizes: tuple[int, ...], carry: tuple[Any, ...],
               carry_axes: tuple[Any, ...], consts: tuple[Any, ...] = (),
               const_axes: tuple[Any, ...] = (), *, reverse: bool = False,
               after: tuple[jax.Array, ...] = ()) -> tuple[Any, ...]:
  """``fn`` of one layer at a time, its results written over the stacked arrays they replace.

  ``fn(layer, *carry_layer, *const_layer)`` gets layer ``layer`` (uint32, the
  row-major index over the layer axes of sizes ``sizes``) of each pytree of
  ``carry`` and ``consts`` (layer axes per pytree prefix in ``carry_axes`` /
  ``const_axes``, as :func:`take_layer`) and returns the new layer of each
  ``carry`` pytree, which is written back into it; a ``carry`` whose axes are
  ``None`` is handed over whole and replaced whole (a running value). Layers
  go from the first to the last, or the reverse; the first is read once the
  arrays ``after`` (and those of :func:`updates_wait_for`) exist, not at the
  step's start. Unlike :func:`per_layer`
  (``vmap``), only one layer's temporaries are alive at a time, and XLA
  updates each ``carry`` array in place when nothing reads it afterwards (a
  gradient that the result replaces, a donated state).
  """
  count = math.prod(sizes)

  def unravel(i):
    layer = count - 1 - i if reverse else i
    index = []
    for n in reversed(sizes):
      index.insert(0, layer % n)
      layer = layer // n
    return index

  def read(stacks, running, i):
    return tuple(r if a is None else take_layer(t, a, unravel(i))
                 for t, r, a in zip(stacks, running, carry_axes))

  # Each iteration gets its layer of the carried stacks as loop state of its own,
  # read after the previous layer was written. Nothing reads a stack after it is
  # written in place, so XLA copies none (reading the layer in the same iteration as
  # the write, XLA fused the read into consumers that may run after the write and
  # copied every carried stack at every layer to keep the old values). The next
  # layer is read only once every stack is written: read as soon as its own stack
  # was, it would overwrite loop state that other writes still read, and XLA copied
  # each layer's loop state at every iteration (for AdamW in the backward pass:
  # its parameters and both moments).
  def body(i, state):
    stacks, current = state
    index = unravel(i)
    layer = (count - 1 - i if reverse else i).astype(jnp.uint32)
    new = fn(layer, *current, *(take_layer(t, a, index) for t, a in zip(consts, const_axes)))
    stacks = tuple(t if a is None else put_layer(t, a, v, index)
                   for t, a, v in zip(stacks, carry_axes, new))
    written = jax.tree.leaves([t for t, a in zip(stacks, carry_axes) if a is not None])
    following = jnp.minimum(i + 1, count - 1) + _zero_after(written)  # past the last: unused
    return stacks, read(stacks, new, following)

  stacks = tuple(None if a is None else c for c, a in zip(carry, carry_axes))
  wait_for = [*after, *_WAIT_FOR.get()]
  first = _zero_after(wait_for) if wait_for else 0  # 0 once those arrays exist
  stacks, current = jax.lax.fori_loop(0, count, body, (stacks, read(stacks, carry, first)))
  return tuple(c if a is None else t for t, c, a in zip(stacks, current, carry_axes))


def read_after(tree: Any, arrays: list[jax.Array], flag: jax.Array | None = None) -> Any:
  """``tree`` whose integer arrays (INT8 codes, token ids) are read only once ``arrays`` exist.

  Each gets a zero computed from ``arrays`` added (XLA fuses the add into
  its readers), so what reads it depends on them by data: XLA:CPU orders work
  by data alone (it drops ``jax.lax.optimization_barrier`` before scheduling).
  Float arrays are returned as they are. An array that is a fusion's result
  (not a loop's, a reduction's or an argument) is read from its buffer only
  with ``flag``, a traced boolean of any value that XLA cannot fold: the zero
  is then read inside a conditional on it; else XLA may recompute the element
  it reads from the fusion's inputs, and wait for those instead.
  """
  if flag is None:
    zero = _zero_after(list(arrays))
  else:
    zero = jax.lax.cond(flag, _zero_after, lambda _: jnp.zeros([], jnp.int32), list(arrays))
  return jax.tree.map(lambda x: x + zero.astype(x.dtype)
                      if jnp.issubdtype(x.dtype, jnp.integer) else x, tree)


def _zero_after(arrays: list[jax.Array]) -> jax.Array:
  """An int32 zero that XLA computes only once every one of ``arrays`` exists.

  The minimum of ``0`` and one element of each array, taken as unsigned
  words: always zero, but XLA cannot know it, so an index plus this zero is
  a data dependence on every array.
  """
  words = [jnp.zeros([], jnp.uint32)]
  for x in arrays:
    if x.size:
      x = x[(0,) * x.ndim]
      if jnp.issubdtype(x.dtype, jnp.floating):
        x = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
      words.append(x.astype(jnp.uint32))
  return jnp.min(jnp.stack(words)).astype(jnp.int32)


def materialized(tree: Any) -> Any:
  """``tree``'s arrays, each written once into a buffer of its own in its default
  layout (the result of a conditional that XLA cannot resolve at compile time).

  For values that several fusions read: a layer's weight gradient leaves its
  matmul transposed and in the compute dtype, and XLA:CPU fused the conversion
  and transposition into each reader (every moment's update, the parameter's,
  the gradient norm), each reading it transposed again. Updated in the
  backward pass (:mod:`.in_backward`), AdamW took 1.20x the ordinary step's
  time at 130M, 0.97x with its gradient written once
  (``benchmarks/in_backward_time.py``); ``jax.lax.optimization_barrier`` did
  not change the time. It costs a copy of ``tree`` (one layer's gradient)
  beside the one the conditional reads.
  """
  return run_after(jax.tree.leaves(tree), lambda t: t, tree)


def run_after(arrays: list[jax.Array], fn: Callable[..., Any], *args: Any) -> Any:
  """``fn(*args)``, run once ``arrays`` exist, as a conditional that XLA cannot
  resolve at compile time (its predicate reads ``arrays``; the other branch,
  never taken, gives zeros).

  XLA:CPU orders work by data alone and may start any operation without inputs
  (the zeros a gather's transpose scatters into) or that reads only arguments
  (an INT8 weight's dequantization) at the step's start, keeping its result
  alive until it is read; inside a conditional nothing of ``fn`` can be moved
  before the conditional runs. Its results are buffers of their own: nothing
  after it recomputes them from their inputs.
  """
  always = _zero_after(list(arrays)) == 0
  zeros = lambda *a: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *a))
  return jax.lax.cond(always, fn, zeros, *args)


def recorded_layers(params: Any, name: str = "layers") -> dict[str, tuple[int, ...]]:
  """``BlockPartition(layers=...)`` from the layer axes Flax recorded in ``params``.

  ``nnx.scan``/``nnx.vmap`` with ``transform_metadata={nnx.PARTITION_NAME:
  name}`` and linen ``nn.scan`` with ``metadata_params={nn.PARTITION_NAME:
  name}`` insert ``name`` into the sharding names of every partitioned
  parameter they stack (nnx ``Variable`` ``out_sharding``, linen
  ``nn.Partitioned.names``). Pass the tree before unboxing
  (``nnx.state(model, nnx.Param)``, linen's boxed ``variables["params"]``).
  Each recorded parameter stands for the largest subtree around it whose
  leaves all have the same layer count on those axes, so unannotated leaves of
  the same stack (a bias, a norm) count too.
  """
  def names_of(x):
    if hasattr(x, "get_metadata"):  # nnx.Variable
      return x.get_metadata().get("out_sharding")
    return getattr(x, "names", None) if hasattr(x, "unbox") else None  # linen nn.Partitioned

  shapes = {path_str(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: names_of(x) is not None)[0]:
    axes = tuple(i for i, n in enumerate(names_of(leaf) or ()) if n == name)
    if not axes:
      continue
    path = path_str(path)
    parts, count = path.split("/"), tuple(shapes[path][a] for a in axes)
    stacked = lambda shape: len(shape) > axes[-1] and tuple(shape[a] for a in axes) == count
    depth = len(parts)
    while depth > 1 and all(stacked(shape) for p, shape in shapes.items()
                            if p.split("/")[:depth - 1] == parts[:depth - 1]):
      depth -= 1
    out[re.escape("/".join(parts[:depth]))] = axes
  return out


def block_specs(params: Any, partition: BlockPartition, *, warn: bool = False,
                present: Any = ()) -> Any:
  """A pytree of :class:`BlockSpec` (``None`` for leaves left alone) like ``params``.

  With ``warn=True`` it warns when no embedding, output, query or key
  parameter was found and some leaf fell back to one block for the whole
  tensor: usually a sign that the names need ``rules=``. Rules
  in ``present`` (held by parts of the model outside ``params``) count as found.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  specs = []
  for path, leaf in leaves:
    if not is_trainable(leaf):
      specs.append(None)
      continue
    shape = tuple(leaf.shape)
    specs.append(normalize_spec(partition.spec(path_str(path), shape), len(shape)))
  # Only leaves that fell back to one block for the whole tensor can be misnamed.
  if warn and any(s is not None and s.rule == WHOLE and s.axes for s in specs):
    found = {s.rule for s in specs if s is not None} | set(present)
    missing = [r for r in (EMBEDDING, OUTPUT, QUERY, KEY)
               if r not in found and not (r in (QUERY, KEY) and QKV in found)]
    if missing:
      warnings.warn(
          "Adam-mini partition found no " + ", ".join(missing) + " parameter; "
          "those get per-tensor blocks. Check qadam_mini_jax.describe(params) "
          "and pass BlockPartition(rules=...) if names differ.", stacklevel=3)
  return jax.tree_util.tree_unflatten(treedef, specs)


def num_blocks(spec: BlockSpec, shape: tuple[int, ...]) -> int:
  """Number of second-moment scalars for a parameter of ``shape``."""
  return math.prod(block_shape(spec, shape))


def block_shape(spec: BlockSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Keep-dims shape of ``v`` for a parameter of ``shape``."""
  out = [1 if i in spec.axes else n for i, n in enumerate(shape)]
  if spec.heads is not None:
    out[spec.heads[0]] = spec.heads[1]
  return tuple(out)


def _split(x: jax.Array, spec: BlockSpec) -> tuple[jax.Array, tuple[int, ...]]:
  """View with the heads axis split into (heads, head_dim); reduced axes there."""
  if spec.heads is None:
    return x, spec.axes
  axis, heads = spec.heads
  shape = x.shape
  view = x.reshape(shape[:axis] + (heads, shape[axis] // heads) + shape[axis + 1:])
  axes = tuple(a if a < axis else a + 1 for a in spec.axes) + (axis + 1,)
  return view, axes


def block_mean(x: jax.Array, spec: BlockSpec) -> jax.Array:
  """Mean of ``x`` over each block, keep-dims (shape :func:`block_shape`)."""
  view, axes = _split(x, spec)
  mean = jnp.mean(view, axis=axes, keepdims=True)
  return mean.reshape(block_shape(spec, x.shape))


def broadcast_block(v: jax.Array, spec: BlockSpec, shape: tuple[int, ...]) -> jax.Array:
  """Expand a keep-dims block array ``v`` back to the parameter ``shape``."""
  if spec.heads is None:
    return jnp.broadcast_to(v, shape)
  axis, heads = spec.heads
  split = shape[:axis] + (heads, shape[axis] // heads) + shape[axis + 1:]
  v = v.reshape(v.shape[:axis] + (heads, 1) + v.shape[axis + 1:])
  return jnp.broadcast_to(v, split).reshape(shape)
