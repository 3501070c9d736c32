"""galore / scale_by_galore against a NumPy GaLore written from the paper's equations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qadam_mini_jax
from qadam_mini_jax import alias, low_rank, partition as partition_lib, projection, random_bits, weights
from test_int4 import np_int4
from test_weights import _quantize_numpy

PARTITION = partition_lib.BlockPartition(layers={"layers": 0, "blocks": 1})
LR, B1, B2, EPS, WD, SCALE = 1e-2, 0.9, 0.99, 1e-8, 0.1, 0.25


def _params():
  """Projected: a stacked MLP kernel (layer axis 0; 8 x 12: rows projected), one
  stacked at axis 1 (12 x 6: columns projected), an attention output kernel
  (heads, head_dim, out) = 8 x 8 (square: the input side, rows). Not projected:
  embedding and norm."""
  shapes = {"layers": {"mlp": {"kernel": (2, 8, 12)}},
            "blocks": {"mlp": {"kernel": (12, 3, 6)}},
            "attn": {"o_proj": {"kernel": (4, 2, 8)}},
            "embed": {"embedding": (16, 8)}, "norm": {"scale": (8,)}}
  keys = iter(jax.random.split(jax.random.key(0), 16))
  return jax.tree.map(lambda s: jax.random.normal(next(keys), s), shapes,
                      is_leaf=lambda s: isinstance(s, tuple))


def _gradients(params, steps):
  keys = jax.random.split(jax.random.key(1), steps)
  return [jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape) * (1 + jnp.abs(p)), params)
          for k in keys]


# -- the NumPy reference ---------------------------------------------------------

def _np_vectors(g, rank, rows):
  """First ``rank`` singular vectors on the projected side, largest entry positive."""
  u, _, vt = np.linalg.svd(g.astype(np.float64), full_matrices=False)
  vec = u[:, :rank] if rows else vt[:rank].T
  pivot = vec[np.argmax(np.abs(vec), axis=0), np.arange(rank)]
  return vec * np.where(pivot < 0, -1.0, 1.0)


class _NpMatrix:
  """GaLore (arXiv:2403.03507, Alg. 2) on one matrix, Adam inside, fixed gap."""

  def __init__(self, rank, gap, stored):
    self.rank, self.gap, self.stored, self.p, self.m, self.v = rank, gap, stored, None, 0.0, 0.0

  def direction(self, g, t):
    rows = g.shape[0] < g.shape[1] or g.shape[0] == g.shape[1]  # Flax (in, out): input rows
    if t % self.gap == 0:
      self.p = self.stored(_np_vectors(g, self.rank, rows))
    r = self.p.T @ g if rows else g @ self.p
    self.m = B1 * self.m + (1 - B1) * r
    self.v = B2 * self.v + (1 - B2) * r * r
    n = (self.m / (1 - B1 ** (t + 1))) / (np.sqrt(self.v / (1 - B2 ** (t + 1))) + EPS)
    return SCALE * (self.p @ n if rows else n @ self.p.T)


class _NpAdam:
  def __init__(self):
    self.m, self.v = 0.0, 0.0

  def direction(self, g, t):
    self.m = B1 * self.m + (1 - B1) * g
    self.v = B2 * self.v + (1 - B2) * g * g
    return (self.m / (1 - B1 ** (t + 1))) / (np.sqrt(self.v / (1 - B2 ** (t + 1))) + EPS)


def _np_galore(params, grads, rank, gap, stored=lambda p: p):
  """Updates of every step, per leaf, from per-layer matrices."""
  p = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}
  views = {  # leaf -> (to matrices, from matrices)
      "layers/mlp/kernel": (lambda x: [x[i] for i in range(2)], lambda ms: np.stack(ms, 0)),
      "blocks/mlp/kernel": (lambda x: [x[:, i] for i in range(3)], lambda ms: np.stack(ms, 1)),
      "attn/o_proj/kernel": (lambda x: [x.reshape(8, 8)], lambda ms: ms[0].reshape(4, 2, 8)),
  }
  opt = {k: ([_NpMatrix(rank, gap, stored) for _ in views[k][0](p[k])] if k in views
             else _NpAdam())
         for k in p}
  decays = {"layers/mlp/kernel", "blocks/mlp/kernel", "attn/o_proj/kernel", "embed/embedding"}
  out = []
  for t, g in enumerate(grads):
    g = {k: np.asarray(v, np.float64) for k, v in _flat(g).items()}
    step = {}
    for k in p:
      if k in views:
        to, back = views[k]
        d = back([o.direction(m, t) for o, m in zip(opt[k], to(g[k]))])
      else:
        d = opt[k].direction(g[k], t)
      step[k] = -LR * (d + (WD * p[k] if k in decays else 0.0))
      p[k] = p[k] + step[k]
    out.append(step)
  return out


def _flat(tree):
  return {partition_lib.path_str(path): x
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _run(tx, params, grads):
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append(u)
  return out, state


def _assert_equal_to(reference, ours):
  for t, (u, ref) in enumerate(zip(ours, reference)):
    for path, x in _flat(u).items():
      np.testing.assert_allclose(x, ref[path], rtol=2e-4, atol=1e-6,
                                 err_msg=f"step {t}, {path}")


def test_galore_equals_a_numpy_galore_from_the_equations():
  params = _params()
  grads = _gradients(params, 5)
  ours, state = _run(alias.galore(LR, rank=3, update_proj_gap=2, b1=B1, b2=B2, eps=EPS,
                                  weight_decay=WD, partition=PARTITION), params, grads)
  _assert_equal_to(_np_galore(params, grads, rank=3, gap=2), ours)
  projectors = state[0].projectors
  chex.assert_shape(projectors["layers"]["mlp"]["kernel"].matrix, (2, 8, 3))
  chex.assert_shape(projectors["blocks"]["mlp"]["kernel"].matrix, (3, 6, 3))
  chex.assert_shape(projectors["attn"]["o_proj"]["kernel"].matrix, (8, 3))
  assert isinstance(projectors["embed"]["embedding"], optax.MaskedNode)
  # The inner Adam's state has the rank-3 shapes: r x 12, 12 x r, r x 8.
  inner_mu = state[0].inner.mu
  chex.assert_shape([inner_mu["layers"]["mlp"]["kernel"], inner_mu["blocks"]["mlp"]["kernel"],
                     inner_mu["attn"]["o_proj"]["kernel"]], [(2, 3, 12), (12, 3, 3), (3, 8)])


def test_int4_projectors_are_the_rounded_singular_vectors():
  """The reference with each P replaced by its INT4 round trip (groups of 4 of a d x 3 P)."""
  params = _params()
  grads = _gradients(params, 3)
  ours, state = _run(alias.galore(LR, rank=3, update_proj_gap=2, b1=B1, b2=B2, eps=EPS,
                                  weight_decay=WD, partition=PARTITION, int4_group_size=4),
                     params, grads)
  _assert_equal_to(_np_galore(params, grads, rank=3, gap=2,
                              stored=lambda p: np_int4(p[None], 4)[0][0]), ours)
  stored = state[0].projectors["layers"]["mlp"]["kernel"].matrix
  chex.assert_shape([stored.packed, stored.scale], [(2, 12), (2, 6)])  # 8 x 3 per layer


def test_rank_at_least_the_smaller_side_is_adamw():
  params = _params()
  grads = _gradients(params, 3)
  ours, _ = _run(alias.galore(LR, rank=8, b1=B1, b2=B2, eps=EPS, weight_decay=WD,
                              partition=PARTITION), params, grads)
  mask = alias.default_decay_mask(params, PARTITION)
  adamw, _ = _run(optax.adamw(LR, B1, B2, EPS, weight_decay=WD, mask=mask), params, grads)
  chex.assert_trees_all_equal(ours, adamw)


def test_agrees_with_optax_contrib_galore_where_conventions_coincide():
  """Square matrices (both project the left side) within one refresh period
  (the singular vectors' signs cancel)."""
  params = {"mlp": {"kernel": jax.random.normal(jax.random.key(2), (8, 8))},
            "bias": jnp.zeros(8)}
  grads = _gradients(params, 3)
  ours, _ = _run(alias.galore(LR, rank=2, update_proj_gap=10, scale=0.5, weight_decay=0.0),
                 params, grads)
  theirs, _ = _run(optax.contrib.galore(LR, rank=2, update_proj_gap=10, scale=0.5), params, grads)
  chex.assert_trees_all_close(ours, theirs, rtol=1e-4, atol=1e-7)


def _lazy(cos_threshold):
  """A gradient of one fixed direction (cosine 1 at every refresh), gap 1."""
  params = {"mlp": {"kernel": jnp.zeros((6, 10))}}
  g = {"mlp": {"kernel": jnp.outer(jnp.arange(1.0, 7.0), jnp.ones(10))
               + 0.01 * jax.random.normal(jax.random.key(3), (6, 10))}}
  tx = low_rank.scale_by_galore(rank=2, update_proj_gap=1, cos_threshold=cos_threshold)
  state, update = tx.init(params), jax.jit(tx.update)
  gaps = []
  for _ in range(20):
    _, state = update(g, state)
    gaps.append(int(state.projectors["mlp"]["kernel"].gap))
  return gaps


def test_lazy_refresh_doubles_the_gap_of_a_stable_subspace():
  # Refreshes at 0..5 (gap 1); the 5th cosine (step 5) fills the queue: gap 2,
  # refresh at 6 -> 4, at 8 -> 8, at 16 -> 16.
  assert _lazy(0.4) == [1] * 5 + [2] + [4] * 2 + [8] * 8 + [16] * 4
  assert _lazy(None) == [1] * 20


def test_a_refresh_that_is_not_finite_keeps_the_layers_projector():
  params = _params()
  tx = alias.galore(LR, rank=3, update_proj_gap=1, partition=PARTITION)
  g = _gradients(params, 1)[0]
  _, state = tx.update(g, tx.init(params), params)
  bad = {**g, "layers": {"mlp": {"kernel": g["layers"]["mlp"]["kernel"].at[0, 0, 0].set(jnp.nan)}}}
  _, after = tx.update(bad, state, params)
  before, now = (s[0].projectors["layers"]["mlp"]["kernel"] for s in (state, after))
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[0], now), jax.tree.map(lambda x: x[0], before))
  # The other layer refreshed from the same gradient: cosine 1 joined its queue.
  np.testing.assert_array_equal(now.filled, [0, 1])
  np.testing.assert_allclose(now.cosines[1, -1], 1.0, rtol=1e-5)


def test_hyperparameters_are_traced_and_checked():
  params = _params()
  tx = optax.inject_hyperparams(alias.galore, static_args=("rank",))(
      learning_rate=LR, rank=3, weight_decay=WD, partition=PARTITION)
  grads = _gradients(params, 1)
  ours, _ = _run(tx, params, grads)
  reference = _run(alias.galore(LR, rank=3, weight_decay=WD, partition=PARTITION), params,
                   grads)[0]
  chex.assert_trees_all_close(ours, reference, rtol=1e-3, atol=1e-7)  # two programs: the SVD
  with pytest.raises(ValueError, match="rank must be a positive int"):
    alias.galore(LR, rank=0)
  with pytest.raises(ValueError, match="update_proj_gap must be an integer >= 1"):
    alias.galore(LR, update_proj_gap=0)
  with pytest.raises(partition_lib.PartitionError, match="norm/scale: .* not a matrix"):
    alias.galore(LR, projected=lambda path, shape: True).init({"norm": {"scale": jnp.ones(4)}})


def test_q_galore_without_its_quantization_is_galore():
  params = _params()
  grads = _gradients(params, 5)
  kwargs = dict(rank=3, update_proj_gap=2, b1=B1, b2=B2, eps=EPS, weight_decay=WD,
                partition=PARTITION)
  plain, _ = _run(alias.q_galore(LR, quantization=None, v_quantization=None,
                                 int4_group_size=None, cos_threshold=None, **kwargs),
                  params, grads)
  chex.assert_trees_all_close(plain, _run(alias.galore(LR, **kwargs), params, grads)[0],
                              rtol=1e-4, atol=1e-7)


def test_q_galore_keeps_adams_m_and_v_in_8_bits_on_r():
  """INT8 m and 8-bit v (groups of 8, every leaf) on R and on the unprojected
  leaves; the updates stay within rounding of galore's with the same INT4
  projectors."""
  params = _params()
  grads = _gradients(params, 4)
  kwargs = dict(rank=3, update_proj_gap=2, b1=B1, b2=B2, eps=EPS, weight_decay=WD,
                partition=PARTITION, int4_group_size=4, cos_threshold=None)
  eight_bits = qadam_mini_jax.Int8Quantization(8, 0)
  ours, state = _run(alias.q_galore(LR, quantization=eight_bits, v_quantization=eight_bits,
                                    **kwargs), params, grads)
  reference, _ = _run(alias.galore(LR, **kwargs), params, grads)
  for moment in (state[0].inner.mu, state[0].inner.nu):
    assert isinstance(moment["blocks"]["mlp"]["kernel"], qadam_mini_jax.QuantizedArray)
    chex.assert_shape(moment["blocks"]["mlp"]["kernel"].codes, (12, 3, 3))  # R: layer axis 1
    chex.assert_shape(moment["embed"]["embedding"].codes, (16, 8))
  chex.assert_shape(state[0].inner.nu["norm"]["scale"].codes, (8,))
  for path, x in _flat(ours[-1]).items():
    y = np.asarray(_flat(reference[-1])[path]).ravel()
    cos = np.dot(np.asarray(x).ravel(), y) / np.linalg.norm(x) / np.linalg.norm(y)
    assert cos > 0.99, (path, cos)


def test_fused_q_galore_requantizes_the_chains_step():
  """INT8 weights (stacked at axis 0 and 1, a 3-D kernel, the embedding): the
  q_galore chain's step on their float values, re-quantized with stochastic
  rounding on the weights' stream (fused_q_adam_mini's: key, step, path,
  layer); the same state as the chain's."""
  quant = qadam_mini_jax.Int8Quantization(8, 0)
  kwargs = dict(rank=3, update_proj_gap=1, weight_decay=WD, partition=PARTITION, key=7,
                quantization=quant, int4_group_size=4)
  qp = weights.quantize_params(_params(), PARTITION, quant)
  start = weights.dequantize_params(qp)
  grads = _gradients(start, 1)[0]
  chain, fused = alias.q_galore(LR, **kwargs), alias.fused_q_galore(LR, **kwargs)
  u, chain_state = jax.jit(chain.update)(grads, chain.init(start), start)
  float_new = optax.apply_updates(start, u)
  new, state = jax.jit(fused.step)(grads, fused.init(qp), qp)
  chex.assert_trees_all_close(state, chain_state, rtol=1e-6, atol=1e-7)
  assert not weights.is_quantized(new["norm"]["scale"])
  nearest = weights.dequantize_params(weights.quantize_params(float_new, PARTITION, quant,
                                                              stochastic=False))
  values, nearest, floats = map(_flat, (weights.dequantize_params(new), nearest, float_new))
  for path, x in values.items():
    if path != "norm/scale":  # at most a level (scale/127) from the nearest
      level = 1.125 * np.abs(floats[path]).max() / 127
      assert np.abs(x - nearest[path]).max() <= level * (1 + 1e-6), path
      assert (x != nearest[path]).any(), path
    else:
      assert np.mean(np.isclose(x, nearest[path], rtol=1e-6, atol=0)) > 0.999, path
  kernel = new["layers"]["mlp"]["kernel"]  # axis 0: each layer on its own stream
  seeds = random_bits.stream_seeds(random_bits.key_words(7), jnp.int32(1),
                                   random_bits.path_stream("layers/mlp/kernel"),
                                   random_bits.WEIGHTS)
  for layer in range(2):
    noise = random_bits.uniform((8, 12), *random_bits.layer_seeds(*seeds, layer))
    want = _quantize_numpy(np.asarray(float_new["layers"]["mlp"]["kernel"][layer]),
                           kernel.layout, noise)
    got = np.asarray(values["layers/mlp/kernel"][layer])
    assert np.mean(np.isclose(got, want, rtol=1e-6, atol=0)) > 0.99


def test_a_range_finder_whose_sketch_spans_each_matrix_is_the_svd():
  """``range_finder`` reaches every projected leaf (stacked at 0 and 1, 3-D): with
  more sketch columns than the smaller side the sketch spans the whole range,
  so the projectors, and the updates over 3 steps across a refresh, are the
  SVD's; a bare sketch's are not."""
  params = _params()
  grads = _gradients(params, 3)
  kwargs = dict(rank=3, update_proj_gap=2, b1=B1, b2=B2, eps=EPS, partition=PARTITION)
  finder = projection.RandomizedRange(oversample=16, power_iterations=0)
  sketched, _ = _run(alias.galore(LR, range_finder=finder, **kwargs), params, grads)
  exact = [_flat(u) for u in _run(alias.galore(LR, **kwargs), params, grads)[0]]
  _assert_equal_to(exact, sketched)
  # A bare sketch (rank columns, no power iteration) of these full-rank gradients is not.
  bare, _ = _run(alias.galore(LR, range_finder=projection.RandomizedRange(0, 0), **kwargs),
                 params, grads)
  assert np.abs(_flat(bare[0])["layers/mlp/kernel"] - exact[0]["layers/mlp/kernel"]).max() > 1e-4
  with pytest.raises(TypeError, match="RandomizedRange"):
    alias.galore(LR, range_finder=(8, 2))
