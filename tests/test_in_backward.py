"""in_backward.train_step: the same training as the ordinary step, without the gradient tree."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from llama_model import Llama, next_token_loss, pieces

import qadam_mini_jax as q
from qadam_mini_jax import in_backward
from tiny_models import TINY, computed_from

CONFIG = dataclasses.replace(TINY, num_layers=3, scan_layers=True)
PARTITION = q.BlockPartition(num_heads=CONFIG.num_heads, num_kv_heads=CONFIG.num_kv_heads,
                             layers={"layers": 0})
QUANT = q.Int8Quantization(group_size=8, min_size=0)  # every matrix in INT8 at this size
STEPS = 3


def _model():
  return Llama(CONFIG, nnx.Rngs(0))


def _params():
  return nnx.to_pure_dict(nnx.state(_model(), nnx.Param))


def _loss(embed, block, head, params, tokens):
  """The ordinary loss: the same pieces, blocks under ``lax.scan``."""
  x, _ = jax.lax.scan(lambda x, p: (block(p, x), None), embed(params, tokens), params["layers"])
  return head(params, x, tokens)


OPTIMIZERS = {
    "adam_mini": lambda: q.adam_mini(3e-3, weight_decay=0.1, partition=PARTITION),
    "q_adam_mini": lambda: q.q_adam_mini(3e-3, weight_decay=0.1, partition=PARTITION,
                                         quantization=QUANT, stochastic_rounding="all"),
    "fused_q_adam_mini+int8_weights": lambda: q.fused_q_adam_mini(
        3e-3, weight_decay=0.1, partition=PARTITION, quantization=QUANT),
    # The decay mask reads paths, ranks and layer axes (no decay on stacked norms).
    "optax.adamw": lambda: in_backward.per_leaf(optax.adamw(
        3e-3, weight_decay=0.1, mask=functools.partial(q.default_decay_mask,
                                                       partition=PARTITION))),
    # Q-GaLore's recipe: projectors refreshed at steps 0 and 2 by per-layer SVDs
    # inside the backward pass; INT8 m on R and INT8 weights, rounded on each
    # layer's own streams; INT4 projectors.
    "fused_q_galore+int8_weights": lambda: in_backward.per_leaf(q.fused_q_galore(
        3e-3, rank=4, update_proj_gap=2, weight_decay=0.1, partition=PARTITION,
        quantization=QUANT, v_quantization=QUANT, stochastic_rounding="all",
        int4_group_size=8)),
    # MicroAdam: each layer's ring (wrapping around at step 3) and 4-bit error feedback.
    "micro_adam": lambda: in_backward.per_leaf(q.micro_adam(
        3e-3, weight_decay=0.1, partition=PARTITION, window=2, block_size=64, error_bucket=32)),
    "q_adam_mini+clip": lambda: q.q_adam_mini(3e-3, weight_decay=0.1, partition=PARTITION,
                                              quantization=QUANT),
}
CLIP = 0.1  # below the gradients' norm (about 1.5): every step clips


def _ordinary_step(name, tx, loss):
  """``jax.grad`` + ``tx.update`` + ``apply_updates``, or the fused step (after
  ``optax.clip_by_global_norm`` for ``+clip``)."""
  if name.endswith("+clip"):
    clip = optax.clip_by_global_norm(CLIP)
    loss_and_grad = jax.value_and_grad(loss)

    def step(params, state, tokens):
      value, grads = loss_and_grad(params, tokens)
      clipped, _ = clip.update(grads, clip.init(params))
      updates, state = tx.update(clipped, state, params)
      return _metrics(value, grads), optax.apply_updates(params, updates), state
    return step
  tx = tx.tx if isinstance(tx, in_backward.PerLeaf) else tx
  if name.startswith("fused"):
    def step(params, state, tokens):
      value, grads = q.weights.value_and_grad(loss)(params, tokens)
      return (_metrics(value, grads), *tx.step(grads, state, params))
    return step

  def step(params, state, tokens):
    value, grads = jax.value_and_grad(loss)(params, tokens)
    updates, state = tx.update(grads, state, params)
    return _metrics(value, grads), optax.apply_updates(params, updates), state
  return step


def _metrics(loss, grads):
  return in_backward.StepMetrics(loss, optax.tree.norm(grads))


@functools.cache
def _runs(name):
  """Both steps, ``STEPS`` times from the same start, in one compilation."""
  tx = OPTIMIZERS[name]()
  params = _params()
  if "int8_weights" in name:
    params = q.quantize_params(params, PARTITION, QUANT)
  pieces_ = pieces(_model())
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, CONFIG.vocab)
  clip = CLIP if name.endswith("+clip") else None
  steps = (in_backward.train_step(*pieces_, tx, clip_global_norm=clip),
           _ordinary_step(name, tx, functools.partial(_loss, *pieces_)))

  def steps_of(step, params, state):
    def one(carry, _):
      metrics, params, state = step(*carry, tokens)
      return (params, state), metrics
    (params, state), metrics = jax.lax.scan(one, (params, state), length=STEPS)
    return metrics, params, state

  run = jax.jit(lambda params, state: [steps_of(step, params, state) for step in steps])
  return run(params, tx.init(params))


def _int8_leaves(tree):
  return [x for x in jax.tree.leaves(tree) if x.dtype == jnp.int8]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_same_training_as_the_ordinary_step(name):
  """Losses, parameters and state after 3 steps; INT8 codes agree but for the
  few that float rounding puts on the other side of a level (the gradients of
  the two programs differ in the last bit; with the wrong rounding stream of
  a layer, about half of the stochastically rounded codes would differ)."""
  (metrics, params, state), (ref_metrics, ref_params, ref_state) = _runs(name)
  np.testing.assert_allclose(metrics.loss, ref_metrics.loss, rtol=1e-5)
  np.testing.assert_allclose(metrics.grad_norm, ref_metrics.grad_norm, rtol=1e-5)
  assert metrics.loss[-1] < metrics.loss[0]
  if name.endswith("+clip"):
    assert (metrics.grad_norm > CLIP).all()
  floats = lambda tree: [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  for a, b in zip(floats((params, state)), floats((ref_params, ref_state))):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5)
  codes, ref_codes = _int8_leaves((params, state)), _int8_leaves((ref_params, ref_state))
  assert len(codes) == len(ref_codes)
  assert (len(codes) > 0) == (name not in ("optax.adamw", "adam_mini", "micro_adam"))
  if name == "micro_adam":  # the ring's indices and the 4-bit error codes, per layer
    ints = lambda tree: [x for x in jax.tree.leaves(tree) if x.dtype in (jnp.int16, jnp.uint8)]
    assert len(ints(state)) == 2 * len(jax.tree.leaves(params))
    for a, b in zip(ints(state), ints(ref_state)):
      assert (np.asarray(a) != np.asarray(b)).mean() < 0.01
  if "galore" in name:  # the projected m: (layers, rank, out) or (layers, in, rank)
    assert any(x.shape[0] == CONFIG.num_layers and 4 in x.shape[1:] for x in codes)
  for a, b in zip(codes, ref_codes):
    differ = np.asarray(a) != np.asarray(b)
    assert differ.mean() < 0.01, differ.mean()
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def _toy():
  """A model whose gradients the two programs compute bit for bit (one token: each
  weight gradient is a product, no sum), with INT8 weights: its pieces, params,
  partition, quantization and tokens."""
  layers, dim = 3, 32
  keys = jax.random.split(jax.random.key(0), 3)
  params = {"embed": {"embedding": jax.random.normal(keys[0], (16, dim))},
            "layers": {"mlp": {"kernel": 0.1 * jax.random.normal(keys[1], (layers, dim, dim))}},
            "lm_head": {"kernel": 0.1 * jax.random.normal(keys[2], (dim, 16))}}
  partition = q.BlockPartition(layers={"layers": 0}, rules={"mlp/kernel": "mlp"})
  quant = q.Int8Quantization(group_size=32, min_size=0)

  def embed(rest, tokens):
    return q.weights.dequantize(rest["embed"]["embedding"])[tokens]

  def block(layer, x):
    return x + jnp.tanh(x @ q.weights.dequantize(layer["mlp"]["kernel"]))

  def head(rest, x, tokens):
    logits = x @ q.weights.dequantize(rest["lm_head"]["kernel"])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(tokens.size), tokens])

  return ((embed, block, head), q.quantize_params(params, partition, quant), partition, quant,
          jnp.array([3]))


@pytest.mark.parametrize("name", ["fused_q_adam_mini", "fused_q_galore"])
def test_same_codes_where_the_gradients_are_the_same(name):
  """Where the two programs' gradients agree bit for bit, every INT8 code (m and
  weights, stochastic rounding on every leaf) after one step is the ordinary
  fused step's, so each layer draws the same counter-based streams."""
  pieces_, params, partition, quant, tokens = _toy()
  kwargs = dict(weight_decay=0.1, partition=partition, quantization=quant,
                stochastic_rounding="all")
  tx = (q.fused_q_adam_mini(1e-2, **kwargs) if name == "fused_q_adam_mini" else
        in_backward.per_leaf(q.fused_q_galore(1e-2, rank=4, int4_group_size=8,
                                              v_quantization=quant, **kwargs)))
  state = tx.init(params)

  @jax.jit
  def both(params, state):
    ordinary = _ordinary_step("fused", tx, functools.partial(_loss, *pieces_))
    return (in_backward.train_step(*pieces_, tx)(params, state, tokens),
            ordinary(params, state, tokens))
  got, want = both(params, state)
  codes, ref_codes = _int8_leaves(got), _int8_leaves(want)
  # Three weights, three m; q_galore: three v too (on R for the projected MLP kernel).
  assert len(codes) == (6 if name == "fused_q_adam_mini" else 9)
  if name == "fused_q_galore":
    assert sum(x.shape == (3, 4, 32) for x in codes) == 2
  for a, b in zip(codes, ref_codes):
    np.testing.assert_array_equal(a, b)


def test_the_fused_kernel_updates_each_layer_in_backward():
  """``implementation="pallas"`` (interpret mode here) inside the backward pass:
  the jnp path's codes but for float32 rounding, two steps."""
  pieces_, params, partition, quant, tokens = _toy()
  runs = []
  for implementation in ("xla", "pallas"):
    tx = q.fused_q_adam_mini(1e-2, weight_decay=0.1, partition=partition, quantization=quant,
                             stochastic_rounding="all", implementation=implementation)
    step, p, s = jax.jit(in_backward.train_step(*pieces_, tx)), params, tx.init(params)
    for _ in range(2):
      _, p, s = step(p, s, tokens)
    runs.append(_int8_leaves((p, s)))
  assert len(runs[0]) == 6
  for a, b in zip(*runs):
    diff = np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32))
    assert diff.max() <= 1 and diff.mean() < 1e-2


def test_the_step_holds_one_layer_gradient_not_the_tree():
  """Compiled with parameters and state donated, the in-backward step writes
  the stacked parameters and ``m`` in place and its temporaries do not grow
  with depth: below six and a half layers' parameters in float32 (a layer's
  parameters, its gradient as the matmuls leave it and written once more in the
  parameters' layout, its new values, the padded float32 ``m`` of its INT8
  groups) plus the activations and the head's gradients. A copy of even the smallest
  stacked leaf (16 layers of one 128x128 kernel) exceeds it; the ordinary step
  holds all 16 layers' gradients."""
  config = dataclasses.replace(CONFIG, dim=128, ffn_dim=384, num_heads=4, num_kv_heads=4,
                               head_dim=None, num_layers=16, vocab=64)
  model = Llama(config, nnx.Rngs(0))
  params = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  tx = q.q_adam_mini(1e-3, partition=q.BlockPartition(num_heads=4, layers={"layers": 0}))
  state = jax.eval_shape(tx.init, params)
  seq = 16
  tokens = jax.ShapeDtypeStruct((1, seq), jnp.int32)

  def temp(step):
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes
  layer = 4 * sum(x.size // config.num_layers for x in jax.tree.leaves(params["layers"]))
  activations = 4 * seq * config.dim * (config.num_layers + 8)
  attention = 4 * 4 * seq * seq * config.num_heads
  head = 4 * 2 * config.vocab * config.dim
  in_backward_temp = temp(in_backward.train_step(*pieces(model), tx))
  assert in_backward_temp < 6.5 * layer + activations + attention + head, in_backward_temp
  ordinary = _ordinary_step("q_adam_mini", tx, lambda p, t: next_token_loss(
      nnx.merge(nnx.graphdef(model), p)(t), t))
  assert temp(ordinary) > config.num_layers * layer > 2 * in_backward_temp


def _sub_jaxprs(eqn):
  """The jaxprs inside ``eqn`` (a loop's body, a conditional's branches, a call's)."""
  for value in eqn.params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


def _makes(eqn, primitive, shape):
  """Whether ``eqn``, or an equation inside it, is ``primitive`` giving ``shape``."""
  return ((eqn.primitive.name == primitive and eqn.outvars[0].aval.shape == shape)
          or any(_makes(e, primitive, shape) for j in _sub_jaxprs(eqn) for e in j.eqns))


def test_the_head_and_the_embedding_gradient_wait_for_their_inputs():
  """XLA:CPU may start any work whose inputs exist at the step's start and keep
  its result alive: it dequantized the INT8 output layer (500 MiB of float32 at
  7B) and made the zeros the embedding's gradient is scattered into (500 MiB)
  there. Every read of the head's codes is computed from the forward loop's
  result, and the embedding's gradient is made inside a conditional computed
  from the backward loop's."""
  params = q.quantize_params(_params(), PARTITION, QUANT)
  tx = q.fused_q_adam_mini(1e-3, partition=PARTITION, quantization=QUANT)
  tokens = jnp.zeros((2, 8), jnp.int32)
  jaxpr = jax.make_jaxpr(in_backward.train_step(*pieces(_model()), tx))(
      params, tx.init(params), tokens).jaxpr
  forward, backward = [e for e in jaxpr.eqns if e.primitive.name in ("scan", "while")]
  paths = [q.partition.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  head_codes = jaxpr.invars[paths.index("lm_head/kernel/codes")]
  readers = [e for e in jaxpr.eqns if head_codes in e.invars]
  assert readers and all(set(forward.outvars) & computed_from(jaxpr, e) for e in readers)
  embedding = (CONFIG.vocab, CONFIG.dim)
  scatters = [e for e in jaxpr.eqns if _makes(e, "scatter-add", embedding)]
  assert [e.primitive.name for e in scatters] == ["cond"], scatters
  assert set(backward.outvars) & computed_from(jaxpr, scatters[0])


def test_int8_m_is_written_over_its_codes_once_the_new_weights_exist():
  """The embedding's, head's and norm's INT8 ``m`` and weights, updated after the
  loop: XLA recomputes the new ``m`` in each fusion that reads it, the new
  weights' too, so unless ``m``'s codes are written after those, it copied the
  old codes at the step's start (125 MiB each for the embedding and head at 7B)."""
  params = q.quantize_params(_params(), PARTITION, QUANT)
  tx = q.fused_q_adam_mini(1e-3, partition=PARTITION, quantization=QUANT)
  step = jax.jit(in_backward.train_step(*pieces(_model()), tx), donate_argnums=(0, 1))
  hlo = step.lower(params, tx.init(params), jnp.zeros((2, 8), jnp.int32)).compile().as_text()
  assert not re.findall(r"= s8\S* copy\(%state\S*mu\S*codes", hlo)


def test_the_embedding_s_gradient_is_taken_for_the_parameters_it_reads():
  """An INT8 weight is one parameter; the head's are not the embedding's."""
  embed, _, _ = pieces(_model())
  params = _params()
  rest = {k: v for k, v in q.quantize_params(params, PARTITION, QUANT).items() if k != "layers"}
  tokens = jnp.zeros((1, 4), jnp.int32)
  assert in_backward._reads(embed, rest, tokens) == [k == "embed" for k in sorted(rest)]
  tied = lambda rest, tokens: embed(rest, tokens) + rest["norm"]["scale"]
  assert in_backward._reads(tied, rest, tokens) == [k in ("embed", "norm") for k in sorted(rest)]


def test_refusals_name_what_is_wrong():
  model = _model()
  params = _params()
  embed, block, head = pieces(model)
  tokens = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(TypeError, match="inject_hyperparams"):
    in_backward.train_step(embed, block, head, optax.inject_hyperparams(q.adam_mini)(1e-3))
  with pytest.raises(TypeError, match="per_leaf"):
    in_backward.train_step(embed, block, head, optax.adamw(1e-3))
  adam = in_backward.per_leaf(optax.adam(1e-3))
  scalar = {**params, "temperature": jnp.ones([])}
  with pytest.raises(ValueError, match="temperature: a per_leaf optimizer .* scalar"):
    jax.eval_shape(in_backward.train_step(embed, block, head, adam), scalar,
                   adam.init(scalar), tokens)
  step = in_backward.train_step(embed, block, head, q.adam_mini(1e-3, partition=PARTITION))
  with pytest.raises(TypeError, match="dict with the stacked blocks under 'layers'"):
    jax.eval_shape(step, {"blocks": params["layers"]}, None, tokens)
  bad = {**params, "layers": {**params["layers"], "extra": jnp.zeros((2, 4))}}
  with pytest.raises(ValueError, match="layers/extra: shape \\(2, 4\\) does not stack 3 layers"):
    jax.eval_shape(step, bad, None, tokens)
  undeclared = q.adam_mini(1e-3, partition=dataclasses.replace(PARTITION, layers=None))
  step = in_backward.train_step(embed, block, head, undeclared)
  with pytest.raises(ValueError, match="declare them with BlockPartition\\(layers="):
    jax.eval_shape(step, params, undeclared.init(params), tokens)


def _same_as_ordinary(embed, block, head, params, partition, tokens, **kw):
  """Two steps of q_adam_mini (stochastic rounding everywhere) in backward and
  the ordinary way: losses to float rounding, m codes all but a few."""
  tx = q.q_adam_mini(1e-2, partition=partition, stochastic_rounding="all",
                     quantization=q.Int8Quantization(group_size=16, min_size=0), **kw)
  steps = (in_backward.train_step(embed, block, head, tx),
           _ordinary_step("q_adam_mini", tx, functools.partial(_loss, embed, block, head)))

  @jax.jit
  def run(params, state):
    out = []
    for step in steps:
      p, s, losses = params, state, []
      for _ in range(2):
        metrics, p, s = step(p, s, tokens)
        losses.append(metrics.loss)
      out.append((jnp.stack(losses), s))
    return out
  (losses, state), (ref_losses, ref_state) = run(params, tx.init(params))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(_int8_leaves(state), _int8_leaves(ref_state)):
    assert (np.asarray(a) != np.asarray(b)).mean() < 0.01
  return len(_int8_leaves(state))


def test_a_linen_nn_scan_model_cut_into_pieces():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  dim, ffn, vocab, layers = 32, 64, 48, 3

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      h = nn.RMSNorm(name="mlp_norm")(x)
      up = nn.Dense(ffn, use_bias=False, name="up_proj")(h)
      return x + nn.Dense(dim, use_bias=False, name="down_proj")(nn.silu(up)), None

  class Lm(nn.Module):
    def setup(self):
      self.embed = nn.Embed(vocab, dim)
      self.layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=layers)()
      self.norm = nn.RMSNorm()
      self.lm_head = nn.Dense(vocab, use_bias=False)

    def __call__(self, tokens):
      x, _ = self.layers(self.embed(tokens), None)
      return self.lm_head(self.norm(x))

  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, vocab)
  params = Lm().init(jax.random.key(0), tokens)["params"]
  assert params["layers"]["up_proj"]["kernel"].shape == (layers, dim, ffn)

  # The pieces: each submodule applied to its own parameters.
  def embed(rest, tokens):
    return nn.Embed(vocab, dim).apply({"params": rest["embed"]}, tokens)

  def block(layer, x):
    return Block().apply({"params": layer}, x, None)[0]

  def head(rest, x, tokens):
    x = nn.RMSNorm().apply({"params": rest["norm"]}, x)
    logits = nn.Dense(vocab, use_bias=False).apply({"params": rest["lm_head"]}, x)
    return next_token_loss(logits, tokens)

  np.testing.assert_allclose(_loss(embed, block, head, params, tokens),
                             next_token_loss(Lm().apply({"params": params}, tokens), tokens),
                             rtol=1e-6)
  partition = q.BlockPartition(layers={"layers": 0})
  # INT8 m: embedding, both kernels, the stacked norm, the final norm, head.
  assert _same_as_ordinary(embed, block, head, params, partition, tokens) == 6


def test_an_equinox_stacked_block_cut_into_pieces():
  eqx = pytest.importorskip("equinox")
  dim, ffn, vocab, layers = 32, 64, 48, 3

  class Block(eqx.Module):
    norm: jax.Array
    up_proj: eqx.nn.Linear
    down_proj: eqx.nn.Linear

    def __init__(self, key):
      up, down = jax.random.split(key)
      self.norm = jnp.ones(dim)
      self.up_proj = eqx.nn.Linear(dim, ffn, use_bias=False, key=up)
      self.down_proj = eqx.nn.Linear(ffn, dim, use_bias=False, key=down)

    def __call__(self, x):  # (batch, seq, dim)
      h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * self.norm
      return x + jnp.einsum("...f,df->...d", jax.nn.silu(h @ self.up_proj.weight.T),
                            self.down_proj.weight)

  keys = jax.random.split(jax.random.key(0), layers + 2)
  params = {"embed": {"embedding": jax.random.normal(keys[0], (vocab, dim))},
            "layers": eqx.filter_vmap(Block)(keys[2:]),  # every array stacked on axis 0
            "lm_head": eqx.nn.Linear(dim, vocab, use_bias=False, key=keys[1])}
  assert params["layers"].up_proj.weight.shape == (layers, ffn, dim)

  def embed(rest, tokens):
    return rest["embed"]["embedding"][tokens]

  def block(layer, x):
    return layer(x)

  def head(rest, x, tokens):
    return next_token_loss(x @ rest["lm_head"].weight.T, tokens)

  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, vocab)
  partition = q.BlockPartition(layers={"layers": 0}, kernel_layout="out_in")
  # INT8 m: embedding, both weights, the stacked norm, head.
  assert _same_as_ordinary(embed, block, head, params, partition, tokens) == 5
