"""Tests of ``scale_by_adam_mini``: state layout, INT8 rounding, edge leaves."""

from __future__ import annotations

import functools
import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qadam_mini_jax
from tiny_models import nest
from qadam_mini_jax import (Int8Quantization, QuantizedArray, ScaleByAdamMiniState,
                            scale_by_adam_mini)

B1, B2, EPS = 0.9, 0.95, 1e-8


def _key_name(k):
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat(tree, is_leaf=None):
  return {"/".join(_key_name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def _is_q(x):
  return isinstance(x, (QuantizedArray, optax.MaskedNode))


def _random_like(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


def _quiet(fn, *args):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # partition "found no ..." warning
    return fn(*args)


# -----------------------------------------------------------------------------
# 1. State layout.
# -----------------------------------------------------------------------------

QUANT = Int8Quantization(group_size=256, min_size=512)

# path -> (shape, nu keep-dims shape, quantized?, scales shape)
STATE_LEAVES = {
    # (vocab, dim): one block per row; 2048 >= 512: INT8. Last axis 32 < 256, so a
    # quantization row is the whole tensor: 8 groups of 256.
    "embed/embedding": ((64, 32), (64, 1), True, (8,)),
    # Dense (in, out) MLP: per output column; INT8 groups run down each column
    # (within its block), 3 < 256 rows: one group per column.
    "mlp/kernel": ((3, 300), (1, 300), True, (1, 300)),
    # DenseGeneral query (in, heads, head_dim): one block per head; groups down
    # axis 0 (32 rows): one per (head, head_dim) column.
    "attn/query/kernel": ((32, 4, 8), (1, 4, 1), True, (1, 4, 8)),
    # Under min_size: float32 m. Whole-tensor block.
    "norm/scale": ((16,), (1,), False, None),
    "mlp/bias": ((300,), (300,), False, None),
}


def _state_params():
  rng = np.random.default_rng(0)
  return nest({k: jnp.asarray(rng.standard_normal(s), jnp.float32)
                for k, (s, *_) in STATE_LEAVES.items()})


def _np_block_mean_sq(path, g):
  """Hand-written block means of g^2, in nu's keep-dims shape."""
  g = np.asarray(g, np.float64) ** 2
  if path == "embed/embedding":
    return np.array([[g[r].mean()] for r in range(g.shape[0])])
  if path == "mlp/kernel":
    return np.array([[g[:, c].mean() for c in range(g.shape[1])]])
  if path == "attn/query/kernel":
    return np.array([[[g[:, h, :].mean()] for h in range(g.shape[1])]])
  if path == "norm/scale":
    return np.array([g.mean()])
  if path == "mlp/bias":
    return g
  raise KeyError(path)


def _np_groups(path, shape):
  """Hand-written quantization groups: list of (scale index, element index)."""
  if path == "mlp/kernel":  # down each of the 300 columns (3 rows: one group each)
    return [((0, c), (slice(None), c)) for c in range(shape[1])]
  if path == "attn/query/kernel":  # down axis 0 for each (head, head_dim)
    return [((0, h, d), (slice(None), h, d)) for h in range(shape[1]) for d in range(shape[2])]
  n = math.prod(shape)  # whole tensor flattened, 256 consecutive elements
  return [((i // 256,), slice(i, i + 256)) for i in range(0, n, 256)]


def _np_decode(codes, s):
  """Square-law code: s * sign(c) * (c/127)^2."""
  c = np.asarray(codes, np.float64)
  return np.sign(c) * (c / 127) ** 2 * np.asarray(s, np.float64)


def _np_level_below(m, s):
  """Index k of the code level at or below |m| (levels (k/127)^2 * s)."""
  return np.floor(127 * np.sqrt(np.abs(m) / s))


def _check_state_layout(state):
  assert isinstance(state, ScaleByAdamMiniState)
  assert ScaleByAdamMiniState._fields == ("count", "key", "mu", "nu")
  assert state.count.dtype == jnp.int32 and state.count.shape == ()
  assert state.key.dtype == jnp.uint32 and state.key.shape == (2,)
  mu = _flat(state.mu, is_leaf=_is_q)
  nu = _flat(state.nu)
  assert mu.keys() == nu.keys() == STATE_LEAVES.keys()
  for k, (shape, nu_shape, quantized, scales_shape) in STATE_LEAVES.items():
    assert nu[k].shape == nu_shape and nu[k].dtype == jnp.float32, k
    if quantized:
      assert isinstance(mu[k], QuantizedArray), k
      assert mu[k].codes.shape == shape and mu[k].codes.dtype == jnp.int8, k
      assert mu[k].scales.shape == scales_shape, k
      assert mu[k].scales.dtype == jnp.float32, k
    else:
      assert not isinstance(mu[k], QuantizedArray), k
      assert mu[k].shape == shape and mu[k].dtype == jnp.float32, k


def test_state_layout_and_values_after_one_step():
  params = _state_params()
  tx = scale_by_adam_mini(B1, B2, EPS, quantization=QUANT, stochastic_rounding="none")
  state0 = _quiet(tx.init, params)
  _check_state_layout(state0)
  assert int(state0.count) == 0
  g = _random_like(params, 1)
  updates, state1 = jax.jit(tx.update)(g, state0)
  _check_state_layout(state1)
  assert int(state1.count) == 1
  gf, mu, nu, u = _flat(g), _flat(state1.mu, is_leaf=_is_q), _flat(state1.nu), _flat(updates)
  for k, (shape, _, quantized, _) in STATE_LEAVES.items():
    g64 = np.asarray(gf[k], np.float64)
    v = (1 - B2) * _np_block_mean_sq(k, g64)
    np.testing.assert_allclose(nu[k], v, rtol=1e-5, err_msg=k)
    m = (1 - B1) * g64
    # Step 1: u = (m/(1-b1)) / (sqrt(v)/sqrt(1-b2) + eps) = g / (sqrt(mean g^2) + eps).
    den = np.broadcast_to(np.sqrt(_np_block_mean_sq(k, g64)), shape)
    np.testing.assert_allclose(u[k], g64 / (den + EPS), rtol=1e-5, atol=1e-6, err_msg=k)
    if quantized:
      codes, scales = np.asarray(mu[k].codes), np.asarray(mu[k].scales)
      for sidx, eidx in _np_groups(k, shape):
        group = m.reshape(-1)[eidx] if isinstance(eidx, slice) else m[eidx]
        gcodes = codes.reshape(-1)[eidx] if isinstance(eidx, slice) else codes[eidx]
        s = np.abs(group).max()
        np.testing.assert_allclose(scales[sidx], s, rtol=1e-6, err_msg=k)
        # Round to nearest: within half the gap between the two levels around m,
        # and the max element hits +-127.
        gap = (2 * _np_level_below(group, s) + 1) / 127**2 * s
        err = np.abs(_np_decode(gcodes, scales[sidx]) - group)
        assert (err <= 0.5 * gap * (1 + 1e-5) + 1e-7 * s).all(), k
        assert np.abs(gcodes).max() == 127, k
    else:
      np.testing.assert_allclose(mu[k], m, rtol=1e-6, atol=1e-9, err_msg=k)


@pytest.mark.parametrize("quantization, implementation", [
    (None, "xla"), (Int8Quantization(min_size=0), "xla"), (Int8Quantization(min_size=0), "pallas")],
    ids=["float", "int8", "int8-kernel"])
def test_eps_sits_outside_the_square_root_after_bias_correction(quantization, implementation):
  """Hand-computed: b1 = 1/2, b2 = 3/4, eps = 1 and the same gradient twice give
  m/(1-b1^t) = g and v/(1-b2^t) = mean_B g^2 at both steps, so
  u = g / (sqrt(mean_B g^2) + 1): 2/3 for |g| = 2 (eps inside the root: 2/sqrt(5);
  added before the bias correction: 1/2), and exactly 0, not NaN, for an all-zero block.
  The bias holds one block per element, the kernel one per column. INT8 ``m`` is
  exact at step 1 (its update uses the unrounded m); step 2 reads it back rounded."""
  g = {"mlp": {"bias": jnp.asarray([2.0, -1.0, 0.0]),
               "kernel": jnp.asarray([[2.0, 0.0], [-2.0, 0.0]])}}
  want = {"mlp/bias": [2 / 3, -1 / 2, 0.0], "mlp/kernel": [[2 / 3, 0.0], [-2 / 3, 0.0]]}
  tx = scale_by_adam_mini(0.5, 0.75, 1.0, quantization=quantization,
                          implementation=implementation)
  state = _quiet(tx.init, g)
  update = jax.jit(tx.update)
  for step in (1, 2):
    u, state = update(g, state)
    for k, v in _flat(u).items():
      exact = quantization is None or step == 1
      np.testing.assert_allclose(v, want[k], rtol=1e-6 if exact else 1e-2, atol=0,
                                 err_msg=f"{k} at step {step}")
      assert (np.asarray(v)[np.asarray(want[k]) == 0] == 0).all(), k


@pytest.mark.parametrize("rounding", ["none", "all"])
def test_state_shapes_and_dtypes_stable_across_steps_and_under_cond(rounding):
  params = _state_params()
  tx = scale_by_adam_mini(B1, B2, EPS, quantization=QUANT, stochastic_rounding=rounding)
  state0 = _quiet(tx.init, params)

  @jax.jit
  def step(state, g, pred):
    plain = tx.update(g, state)[1]
    cond = jax.lax.cond(pred, lambda s: tx.update(g, s)[1], lambda s: s, state)
    return plain, cond

  int8 = [m for m in jax.tree.leaves(state0.mu, is_leaf=lambda x: isinstance(x, QuantizedArray))
          if isinstance(m, QuantizedArray)]
  assert int8 and all(not m.codes.any() and not m.scales.any() for m in int8)  # m = 0 exactly
  state = state0
  for t in range(3):
    g = _random_like(params, 10 + t)
    plain, taken = step(state, g, True)
    _, skipped = step(state, g, False)
    chex.assert_trees_all_equal_shapes_and_dtypes(plain, state0)
    chex.assert_trees_all_equal_shapes_and_dtypes(taken, state0)
    chex.assert_trees_all_equal(taken, plain)  # same computation, same bits
    chex.assert_trees_all_equal(skipped, state)
    state = plain
  assert int(state.count) == 3


# -----------------------------------------------------------------------------
# 2. The embedding-decay property behind Q-Adam-mini's stochastic rounding.
# -----------------------------------------------------------------------------

ROWS, WIDTH, J = 4, 256, 5  # one quantization group per row; element J decays
WARMUP_STEPS, RTN_STEPS, SR_STEPS, NUM_KEYS = 20, 250, 30, 1024
J_GRAD = np.array([0.3, 0.45, 0.6, 0.8], np.float32)  # per row, during the warm-up


def _decay_grads(t):
  """Element 0 of each row: 1.0 always (pins the scale); J: J_GRAD while t<=warm-up."""
  g = jnp.zeros((ROWS, WIDTH), jnp.float32).at[:, 0].set(1.0)
  return g.at[:, J].set(jnp.where(t <= WARMUP_STEPS, jnp.asarray(J_GRAD), 0.0))


def _decay_tx(rounding, quantization=Int8Quantization(group_size=256, min_size=0)):
  return scale_by_adam_mini(B1, B2, EPS, quantization=quantization,
                            stochastic_rounding=rounding)


def _run(tx, state, first_t, steps):
  """Scan ``steps`` updates; returns the final state and per-step stored mu."""

  def body(state, t):
    _, state = tx.update({"embed": {"embedding": _decay_grads(t)}}, state)
    return state, state.mu["embed"]["embedding"]

  return jax.lax.scan(body, state, first_t + jnp.arange(steps))


def test_round_to_nearest_momentum_stalls_for_zero_gradient():
  params = {"embed": {"embedding": jnp.zeros((ROWS, WIDTH), jnp.float32)}}
  tx = _decay_tx("none")
  state, mus = jax.jit(lambda s: _run(tx, s, 1, RTN_STEPS))(_quiet(tx.init, params))
  codes, scales = np.asarray(mus.codes), np.asarray(mus.scales)  # (T, 4, 256), (T, 4, 1)
  # The pinned element: code 127 and scale (the group max) ~ 1 (m0 -> 1).
  assert (codes[-100:, :, 0] == 127).all()
  np.testing.assert_allclose(scales[-100:], 1.0, rtol=1e-5)
  # The zero-gradient element stalls: the same nonzero code over the last 100 steps,
  # although b1^(RTN_STEPS - WARMUP_STEPS) ~ 3e-11 of its value would remain in float.
  stalled = codes[-100:, :, J]
  assert (stalled == stalled[0]).all(), stalled
  assert (stalled[0] != 0).all(), stalled[0]
  assert _np_decode(codes[-1], scales[-1])[:, J].min() >= 1 / 127**2  # >= the lowest level
  # The same run with float32 momentum decays to (almost) zero.
  tx_f = _decay_tx("none", quantization=None)
  state_f, _ = jax.jit(lambda s: _run(tx_f, s, 1, RTN_STEPS))(_quiet(tx_f.init, params))
  assert np.abs(np.asarray(state_f.mu["embed"]["embedding"][:, J])).max() < 1e-8


def test_stochastic_rounding_momentum_decays_like_b1_power_in_mean():
  """From a stalled round-to-nearest state, SR makes E[deq m_J] = b1^k * m_J(0).

  Each step stores ``deq_k = m_k + r_k`` with E[r_k | m_k] = 0 and
  Var(r_k | m_k) <= gap^2/4, where gap bounds the distance between the two
  code levels around any value <= deq_0 (one level above its code), and
  ``m_{k+1} = b1*deq_k`` (zero gradient). So E[deq_k] = b1^k deq_0 and
  Var(deq_k) <= gap^2/4 * sum_{i<k} b1^(2i). Over NUM_KEYS keys x ROWS rows
  (independent streams) the empirical mean must be within 5 standard errors
  of b1^k * deq_0 at every step k.
  """
  params = {"embed": {"embedding": jnp.zeros((ROWS, WIDTH), jnp.float32)}}
  tx_rtn, tx_sr = _decay_tx("none"), _decay_tx("all")
  start, _ = jax.jit(lambda s: _run(tx_rtn, s, 1, 200))(_quiet(tx_rtn.init, params))
  q0 = start.mu["embed"]["embedding"]
  deq0 = _np_decode(q0.codes[:, J], q0.scales[:, 0])
  assert (deq0 > 0).all()  # stalled at a nonzero code
  s = float(np.asarray(q0.scales).max())
  top = float(np.abs(np.asarray(q0.codes[:, J])).max()) + 1  # highest level reachable
  gap = (2 * top + 1) / 127**2 * s

  words = jax.random.bits(jax.random.key(0), (NUM_KEYS, 2), jnp.uint32)

  @jax.jit
  @jax.vmap
  def run_key(w):
    _, mus = _run(tx_sr, start._replace(key=w), 201, SR_STEPS)
    c = mus.codes[:, :, J].astype(jnp.float32)
    return c * jnp.abs(c) / 127**2 * mus.scales[:, :, 0]  # (K, ROWS)

  deq = np.asarray(run_key(words), np.float64)  # (keys, K, ROWS)
  k = np.arange(1, SR_STEPS + 1)
  want = (B1 ** k)[:, None] * deq0[None, :]  # (K, ROWS)
  n = NUM_KEYS * ROWS
  mean = deq.mean(axis=0).mean(axis=1)  # (K,)
  want_mean = want.mean(axis=1)
  var_bound = gap**2 / 4 * np.cumsum(B1 ** (2 * np.arange(SR_STEPS)))  # per sample
  se = np.sqrt(var_bound / n)
  assert (np.abs(mean - want_mean) <= 5 * se).all(), np.c_[mean, want_mean, se]
  # It really decays (round-to-nearest would keep deq0 forever) ...
  assert mean[-1] < 0.1 * deq0.mean()
  # ... and each sample moved by at most one level gap per step from b1 * previous.
  prev = np.concatenate([np.broadcast_to(deq0, (NUM_KEYS, 1, ROWS)), deq[:, :-1]], axis=1)
  assert (np.abs(deq - B1 * prev) < gap * (1 + 1e-5)).all()


# -----------------------------------------------------------------------------
# 3. Reproducible counter-based stochastic rounding.
# -----------------------------------------------------------------------------


def _sr_params():
  w = jnp.asarray(np.random.default_rng(3).standard_normal((16, 64)), jnp.float32)
  return {"a": {"kernel": w}, "b": {"kernel": w}}  # two identical leaves


def _sr_run(key, steps=3, params=None):
  params = _sr_params() if params is None else params
  tx = scale_by_adam_mini(B1, B2, EPS, quantization=Int8Quantization(min_size=0),
                          stochastic_rounding="all", key=key)
  state = _quiet(tx.init, params)
  update = jax.jit(tx.update)
  for t in range(steps):
    g = _random_like(params, 100 + t)
    g = {"a": g["a"], "b": g["a"]}  # identical gradients for the identical leaves
    _, state = update(g, state)
  return state


def test_stochastic_rounding_same_key_is_bitwise_reproducible():
  chex.assert_trees_all_equal(_sr_run(3), _sr_run(3))
  # A typed key and the legacy raw key of the same seed give the same state.
  chex.assert_trees_all_equal(_sr_run(jax.random.key(11)), _sr_run(jax.random.PRNGKey(11)))


def test_stochastic_rounding_codes_are_floor_or_ceil():
  state = _sr_run(3, steps=1)
  g = _random_like(_sr_params(), 100)["a"]["kernel"]
  m = (1 - B1) * np.asarray(g, np.float64)  # 64 per row < 256: whole-tensor groups
  q = state.mu["a"]["kernel"]
  codes, scales = np.asarray(q.codes), np.asarray(q.scales).reshape(-1)
  s = np.repeat(scales, 256).reshape(m.shape)
  c = np.abs(codes.astype(np.float64))
  assert (np.sign(codes) * np.sign(m) >= 0).all()
  # The code is the level at or below |m| or the one above it (1e-4 slack:
  # float64 here, float32 in the library).
  k_lo = _np_level_below(np.abs(m) * (1 - 1e-4), s)
  k_hi = _np_level_below(np.abs(m) * (1 + 1e-4), s) + 1
  assert ((c >= k_lo) & (c <= k_hi)).all()
  # Both directions occur (not round-to-nearest, not always floor).
  k = _np_level_below(m, s)
  lo, hi = (k / 127) ** 2 * s, ((k + 1) / 127) ** 2 * s
  nearest = np.where(np.abs(m) - lo < hi - np.abs(m), k, k + 1)
  frac_away = np.mean(c != nearest)
  assert 0.1 < frac_away < 0.5, frac_away  # E = mean(min(f, 1-f)) ~ 1/4


def test_stochastic_rounding_streams_differ_by_key_step_and_leaf():
  s3, s4 = _sr_run(3), _sr_run(4)
  ca, cb = np.asarray(s3.mu["a"]["kernel"].codes), np.asarray(s3.mu["b"]["kernel"].codes)
  # Different keys: different codes.
  assert (np.asarray(s4.mu["a"]["kernel"].codes) != ca).mean() > 0.05
  # Different leaves with identical values and gradients: different codes.
  assert (ca != cb).mean() > 0.05
  # Different steps: the same stored state and gradient at another count.
  params = _sr_params()
  tx = scale_by_adam_mini(B1, B2, EPS, quantization=Int8Quantization(min_size=0),
                          stochastic_rounding="all", key=3)
  g = _random_like(params, 7)
  _, n1 = tx.update(g, s3)
  _, n2 = tx.update(g, s3._replace(count=s3.count + 5))
  c1, c2 = np.asarray(n1.mu["a"]["kernel"].codes), np.asarray(n2.mu["a"]["kernel"].codes)
  assert (c1 != c2).mean() > 0.05
  assert (np.abs(c1.astype(int) - c2) <= 1).all()  # only the rounding differs
  chex.assert_trees_all_equal(n1.nu, n2.nu)


def test_stochastic_rounding_seeds_use_all_their_bits():
  """Seeds >= 2^32 and wide (e.g. 'rbg', four words) keys: every word changes the
  stream (one compile: the key is state)."""
  params = _sr_params()
  tx = scale_by_adam_mini(B1, B2, EPS, quantization=Int8Quantization(min_size=0),
                          stochastic_rounding="all", key=2**32 + 3)
  state, update, g = _quiet(tx.init, params), jax.jit(tx.update), _random_like(params, 100)
  codes = lambda s: np.asarray(update(g, s)[1].mu["a"]["kernel"].codes)
  with_key = lambda key: codes(state._replace(key=qadam_mini_jax.random_bits.key_words(key)))
  high = codes(state)
  np.testing.assert_array_equal(high, with_key(2**32 + 3))
  assert (high != with_key(3)).mean() > 0.05
  assert (high != with_key(2**33 + 3)).mean() > 0.05
  wide = jnp.asarray([3, 0, 0, 0], jnp.uint32)
  assert (with_key(wide) != with_key(wide.at[3].set(1))).mean() > 0.05


def test_a_seed_wider_than_64_bits_is_refused_when_the_optimizer_is_built():
  with pytest.raises(ValueError, match=r"key must be an int in \[-2\*\*63, 2\*\*64\).*"
                                       r"got -9223372036854775809"):
    qadam_mini_jax.q_adam_mini(1e-3, key=-2**63 - 1)


def test_bad_stochastic_rounding_arguments_are_refused():
  with pytest.raises(ValueError, match=r"stochastic_rounding must be one of \('auto', 'all', "
                                       r"'none'\).*got 'sometimes'"):
    qadam_mini_jax.q_adam_mini(1e-3, stochastic_rounding="sometimes")
  # A mask computed from traced values cannot choose the rounding at trace time.
  params = _sr_params()
  tx = scale_by_adam_mini(B1, B2, EPS, quantization=Int8Quantization(min_size=0),
                          stochastic_rounding=lambda p: jax.tree.map(lambda x: x.sum() > 0, p))
  with pytest.raises(TypeError, match="static Python bools"):
    jax.jit(tx.update)(params, _quiet(tx.init, params))


def _model_tree(seed, layer_keys=("layers_0", "layers_1")):
  """An embedding, an output layer and one MLP kernel per layer (unstacked)."""
  rng = np.random.default_rng(seed)
  leaf = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return {"embed": {"embedding": leaf(64, 32)}, "lm_head": {"kernel": leaf(32, 64)},
          **{k: {"mlp": {"kernel": leaf(32, 48)}} for k in layer_keys}}


def _sr_codes(tx, params, steps=2):
  """INT8 codes of ``m`` by path after ``steps`` steps of gradients ``_model_tree(100 + t)``
  (taken at the params' paths), with every INT8 leaf rounding stochastically."""
  state = tx.init(params)
  for t in range(steps):
    g = _model_tree(100 + t)
    g = nest({path: _flat(g)[path] if path in _flat(g) else jnp.full(x.shape, 0.5 + t)
              for path, x in _flat(params).items()})
    _, state = jax.jit(tx.update)(g, state, params)
  return {path: np.asarray(q.codes) for path, q in _flat(state, _is_q).items()
          if isinstance(q, QuantizedArray)}


def _sr_tx(**partition):
  return scale_by_adam_mini(B1, B2, EPS, quantization=Int8Quantization(min_size=0),
                            stochastic_rounding="all", key=5,
                            partition=qadam_mini_jax.BlockPartition(**partition))


def _codes_of(codes, path):
  [got] = [c for p, c in codes.items() if p.endswith(path)]  # under masked/state prefixes
  return got


@pytest.mark.filterwarnings("ignore:Adam-mini partition found no")
def test_rounding_streams_are_keyed_by_path_not_position():
  """Freezing a subtree, adding a parameter or scanning the layers changes no
  other parameter's stochastic-rounding noise (leaf positions all shift here)."""
  params = _model_tree(0)
  base = _sr_codes(_sr_tx(), params)
  # The noise is real: round-to-nearest and another key give other codes.
  rtn = _sr_codes(scale_by_adam_mini(B1, B2, EPS, quantization=Int8Quantization(min_size=0),
                                     stochastic_rounding="none"), params)
  assert np.mean(base["mu/lm_head/kernel"] != rtn["mu/lm_head/kernel"]) > 0.1
  rekeyed = _sr_codes(scale_by_adam_mini(B1, B2, EPS, quantization=Int8Quantization(min_size=0),
                                         stochastic_rounding="all", key=6), params)
  assert np.mean(base["mu/lm_head/kernel"] != rekeyed["mu/lm_head/kernel"]) > 0.1

  # Freezing layers_0 with optax.masked: every other leaf's codes, bit for bit.
  frozen = nest({p: not p.startswith("layers_0") for p in _flat(params)})
  masked = _sr_codes(optax.masked(_sr_tx(), frozen), params)
  assert not any("layers_0" in p for p in masked)
  for path in ("embed/embedding", "layers_1/mlp/kernel", "lm_head/kernel"):
    np.testing.assert_array_equal(_codes_of(masked, path), base[f"mu/{path}"])

  # A new parameter sorted before all the others ("a_head"): the others unchanged.
  grown = _sr_codes(_sr_tx(), {"a_head": {"kernel": jnp.ones((32, 48))}, **params})
  for path in ("embed/embedding", "layers_0/mlp/kernel", "layers_1/mlp/kernel", "lm_head/kernel"):
    np.testing.assert_array_equal(grown[f"mu/{path}"], base[f"mu/{path}"])

  # The layers scanned into one stacked leaf: embedding and output unchanged.
  stacked = {k: v for k, v in params.items() if not k.startswith("layers_")}
  stacked["layers"] = jax.tree.map(lambda *x: jnp.stack(x), params["layers_0"], params["layers_1"])
  scanned = _sr_codes(_sr_tx(layers={"layers": 0}), stacked)
  for path in ("embed/embedding", "lm_head/kernel"):
    np.testing.assert_array_equal(scanned[f"mu/{path}"], base[f"mu/{path}"])


# -----------------------------------------------------------------------------
# 4. Leaves left alone and mismatched trees.
# -----------------------------------------------------------------------------


def test_int_and_empty_leaves_are_left_alone():
  params = {"mlp": {"kernel": jnp.ones((4, 8), jnp.float32)},
            "step": jnp.array([3, 4, 5], jnp.int32),
            "empty": jnp.zeros((0, 4), jnp.float32)}
  grads = {"mlp": {"kernel": jnp.full((4, 8), 0.5, jnp.float32)},
           "step": jnp.array([7, -2, 9], jnp.int32),  # nonzero: must be ignored
           "empty": jnp.zeros((0, 4), jnp.float32)}
  for tx in (scale_by_adam_mini(B1, B2, EPS),
             scale_by_adam_mini(B1, B2, EPS, quantization=Int8Quantization(min_size=0)),
             qadam_mini_jax.adam_mini(0.1, weight_decay=0.1),
             qadam_mini_jax.q_adam_mini(0.1, weight_decay=0.1,
                                        quantization=Int8Quantization(min_size=0))):
    state = _quiet(tx.init, params)
    update = jax.jit(tx.update)
    p = params
    for _ in range(2):
      u, state = update(grads, state, p)
      assert u["step"].shape == (3,) and u["empty"].shape == (0, 4)
      np.testing.assert_array_equal(u["step"], 0)
      p = optax.apply_updates(p, u)
    np.testing.assert_array_equal(p["step"], params["step"])
    assert p["step"].dtype == jnp.int32
    assert p["empty"].shape == (0, 4) and p["empty"].dtype == jnp.float32
    assert not np.allclose(p["mlp"]["kernel"], 1.0)  # the float leaf did move
  inner = _quiet(scale_by_adam_mini().init, params)
  assert isinstance(inner.mu["step"], optax.MaskedNode)
  assert isinstance(inner.nu["empty"], optax.MaskedNode)


def test_float0_gradient_of_int_leaf_passes_through():
  params = {"w": jnp.ones((2, 3)), "n": jnp.array(2, jnp.int32)}

  def loss(p):
    return jnp.sum(p["w"] ** 2) * p["n"]

  grads = jax.grad(loss, allow_int=True)(params)
  assert grads["n"].dtype == jax.dtypes.float0
  tx = scale_by_adam_mini()
  u, _ = tx.update(grads, _quiet(tx.init, params))
  assert u["n"].dtype == jax.dtypes.float0
  assert u["w"].shape == (2, 3)


def _expect_path_error(tx, init_params, update_params, path):
  state = _quiet(tx.init, init_params)
  grads = jax.tree.map(jnp.ones_like, update_params)
  with pytest.raises(ValueError, match=path):
    tx.update(grads, state)


def test_mismatched_tree_names_the_path():
  a = {"mlp": {"kernel": jnp.ones((4, 8))}, "norm": {"scale": jnp.ones(8)}}
  b = {"mlp": {"kernel": jnp.ones((4, 8))}, "other": {"scale": jnp.ones(8)}}
  _expect_path_error(scale_by_adam_mini(), a, b, "other/scale")


@pytest.mark.parametrize("quantization", [None, Int8Quantization(min_size=0)])
@pytest.mark.parametrize("path, init_shape, update_shape", [
    ("mlp/kernel", (4, 8), (4, 16)),   # nu shape differs too: (1, 8) vs (1, 16)
    ("norm/scale", (32,), (16,)),      # whole-tensor block: nu (1,) either way
    ("mlp/kernel", (4, 8), (1, 8)),    # per-column blocks: nu (1, 8) either way
])
def test_mismatched_leaf_shape_names_the_path(path, init_shape, update_shape,
                                              quantization):
  tx = scale_by_adam_mini(quantization=quantization)
  _expect_path_error(tx, nest({path: jnp.ones(init_shape)}),
                     nest({path: jnp.ones(update_shape)}), path)


# -----------------------------------------------------------------------------
# 5. bfloat16 parameters.
# -----------------------------------------------------------------------------


def _bf16_params():
  rng = np.random.default_rng(5)
  return {"embed": {"embedding": jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)},
          "mlp": {"kernel": jnp.asarray(rng.standard_normal((32, 64)), jnp.bfloat16)},
          "norm": {"scale": jnp.ones((32,), jnp.bfloat16)}}


@pytest.mark.parametrize("mode, mu_dtype", [  # optax's convention: m in the params' dtype
    ("float", jnp.bfloat16), ("float32", jnp.float32), ("int8", jnp.int8), ("bf16", jnp.bfloat16)])
def test_bf16_params(mode, mu_dtype):
  params = _bf16_params()
  kwargs = {"float": {}, "float32": dict(mu_dtype="float32"),
            "int8": dict(quantization=Int8Quantization(min_size=0)),
            "bf16": dict(mu_dtype="bfloat16")}[mode]
  tx = scale_by_adam_mini(B1, B2, EPS, **kwargs)
  state = _quiet(tx.init, params)
  update = jax.jit(tx.update)
  grads = _random_like(params, 6)
  for _ in range(2):
    u, state = update(grads, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(u, params)  # bf16 updates
    for nu in jax.tree.leaves(state.nu):
      assert nu.dtype == jnp.float32
    for mu in jax.tree.leaves(state.mu, is_leaf=_is_q):
      if mode == "int8":
        assert isinstance(mu, QuantizedArray)
        assert mu.codes.dtype == jnp.int8 and mu.scales.dtype == jnp.float32
      else:
        assert mu.dtype == mu_dtype
  # Values: constant gradients -> m = (1 - b1^2) g, u = g / sqrt(mean_B g^2). Bound:
  # bf16 rounding of u and of a bf16 m (relative 2^-9 each, 2^-7 allowed) and, for
  # INT8, the step-1 rounding error (<= s/2 round-to-nearest, < s for the
  # stochastically rounded embedding; s = group max|0.1 g|/127) carried into m_2
  # by b1 and divided by (1 - b1^2) and the denominator.
  g32 = {k: np.asarray(v, np.float32) for k, v in _flat(grads).items()}
  grads_f64 = {k: v.astype(np.float64) for k, v in g32.items()}
  for k, v in _flat(u).items():
    block = {"embed/embedding": 1, "mlp/kernel": 0, "norm/scale": None}[k]
    den = np.sqrt(np.mean(g32[k] ** 2, axis=block, keepdims=block is not None))
    want = g32[k] / den
    bound = 2**-7 * np.abs(want) + 1e-3
    if mode == "int8":  # groups: 256 consecutive elements of the flattened leaf
      flat = np.abs(0.1 * g32[k]).reshape(-1)
      s = np.concatenate([np.full(len(flat[i:i + 256]), flat[i:i + 256].max() / 127)
                          for i in range(0, flat.size, 256)]).reshape(want.shape)
      c = 1.0 if k == "embed/embedding" else 0.5  # stochastic_rounding="auto"
      bound = bound + B1 * c * s / (1 - B1**2) / den
    err = np.abs(np.asarray(v, np.float32) - want)
    assert (err <= bound).all(), (k, (err / bound).max())
    assert (err / bound).max() > 0.01  # not vacuous
  # v is float32 block means of the bf16 gradients: float64's to float32 summation
  # error (~1e-7 relative here), not to a bf16 ulp (4e-3).
  for k, nu in _flat(state.nu).items():
    block = {"embed/embedding": 1, "mlp/kernel": 0, "norm/scale": None}[k]
    g64 = np.asarray(grads_f64[k])
    want = (1 - B2**2) * np.mean(g64**2, axis=block, keepdims=block is not None)
    np.testing.assert_allclose(nu, np.reshape(want, nu.shape), rtol=1e-5, atol=0, err_msg=k)
  if mu_dtype == jnp.bfloat16:
    for k, m in _flat(state.mu).items():
      np.testing.assert_allclose(np.asarray(m, np.float32), (1 - B1**2) * g32[k],
                                 rtol=2**-7, err_msg=k)
  # Through the alias, bf16 params stay bf16.
  tx = qadam_mini_jax.adam_mini(1e-2, weight_decay=0.1, mu_dtype=kwargs.get("mu_dtype"))
  s = _quiet(tx.init, params)
  u, _ = tx.update(grads, s, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(optax.apply_updates(params, u), params)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_float16_params_with_gradients_whose_squares_underflow_float16(implementation):
  """|g| ~ 1e-4: g^2 (~1e-8) is below float16's smallest subnormal (6e-8), so v must
  be accumulated in float32 from the start; u = g / sqrt(mean_B g^2) at step 1."""
  rng = np.random.default_rng(8)
  g16 = {"mlp": {"kernel": jnp.asarray(1e-4 * rng.standard_normal((64, 32)), jnp.float16)},
         "norm": {"scale": jnp.asarray(1e-4 * rng.standard_normal((32,)), jnp.float16)}}
  tx = scale_by_adam_mini(B1, B2, EPS, quantization=Int8Quantization(min_size=1000),
                          implementation=implementation)
  state = _quiet(tx.init, g16)
  u, state = jax.jit(tx.update)(g16, state)
  assert isinstance(state.mu["mlp"]["kernel"], QuantizedArray)  # INT8 kernel, float16 norm
  assert state.mu["norm"]["scale"].dtype == jnp.float16
  for k, v in _flat(u).items():
    assert v.dtype == jnp.float16, k
    g = np.asarray(_flat(g16)[k], np.float64)
    den = np.sqrt(np.mean(g**2, axis=0 if k == "mlp/kernel" else None))
    np.testing.assert_allclose(np.asarray(v, np.float64), g / (den + EPS), rtol=2e-3,
                               atol=1e-3, err_msg=k)  # float16: 2^-11 relative


# -----------------------------------------------------------------------------
# Stacked (scanned) layers: the same optimizer as the unstacked model.
# -----------------------------------------------------------------------------

LAYERS, D, HEADS_, HD, F = 3, 96, 4, 24, 320
LAYER_SHAPES = {  # one layer's parameters; (in, out) kernels
    "attn/q_proj/kernel": (D, HEADS_ * HD), "attn/k_proj/kernel": (D, HEADS_ * HD),
    "attn/v_proj/kernel": (D, HEADS_ * HD), "attn/o_proj/kernel": (HEADS_ * HD, D),
    "mlp/up_proj/kernel": (D, F), "mlp/down_proj/kernel": (F, D), "attn_norm/scale": (D,),
}
TOP_SHAPES = {"embed/embedding": (200, D), "lm_head/kernel": (D, 200), "norm/scale": (D,)}


def _layered(seed, scale=1.0):
  """Per-layer and top-level arrays (layer l of a leaf scaled by 1000**-l: the
  stacked update must not mix layers of very different gradient size)."""
  rng = np.random.default_rng(seed)
  layers = [{k: rng.standard_normal(s).astype(np.float32) * scale * 1000.0**-l
             for k, s in LAYER_SHAPES.items()} for l in range(LAYERS)]
  top = {k: rng.standard_normal(s).astype(np.float32) * scale for k, s in TOP_SHAPES.items()}
  return layers, top


def _unstacked(layers, top):
  return nest({**top, **{f"layers_{l}/{k}": jnp.asarray(v) for l, layer in enumerate(layers)
                         for k, v in layer.items()}})


def _stacked(layers, top, axis):
  return nest({**top, **{f"layers/{k}": jnp.asarray(np.stack([layer[k] for layer in layers], axis))
                         for k in LAYER_SHAPES}})


def _close(actual, desired):
  """Equal up to float32 rounding, relative to the leaf's largest value."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(actual, desired, rtol=4 * 2**-23,
                             atol=1e-6 * np.abs(desired).max(initial=0))


def _stacked_leaf(tree, axis, k, l):
  """Layer ``l`` of the stacked leaf at path ``layers/k``."""
  return np.take(np.asarray(_flat(tree, _is_q)[f"layers/{k}"]), l, axis=axis)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("axis", [0, 1])
def test_stacked_layers_update_like_the_unstacked_model(axis, implementation):
  """Round-to-nearest: the INT8 state of the unstacked model bit for bit, and its
  updates and ``v`` up to the float32 summation order of the block means
  (XLA reduces a stacked ``(L, n)`` array in another order than an ``(n,)``)."""
  part = dict(num_heads=HEADS_, value_as_one_block=False)
  make = lambda **kw: qadam_mini_jax.q_adam_mini(
      1e-2, b2=B2, weight_decay=0.1, stochastic_rounding="none", implementation=implementation,
      partition=qadam_mini_jax.BlockPartition(**part, **kw))
  flat_tx, stacked_tx = make(), make(layers={"layers": axis})
  p_layers, p_top = _layered(0)
  flat_p, stacked_p = _unstacked(p_layers, p_top), _stacked(p_layers, p_top, axis)
  flat_s, stacked_s = flat_tx.init(flat_p), stacked_tx.init(stacked_p)
  for step in range(3):
    g_layers, g_top = _layered(10 + step)
    flat_u, flat_s = jax.jit(flat_tx.update)(_unstacked(g_layers, g_top), flat_s, flat_p)
    stacked_u, stacked_s = jax.jit(stacked_tx.update)(
        _stacked(g_layers, g_top, axis), stacked_s, stacked_p)
  flat_u = _flat(flat_u)
  stacked_state = stacked_s[0]
  for k in LAYER_SHAPES:
    for l in range(LAYERS):
      _close(_stacked_leaf(stacked_u, axis, k, l), flat_u[f"layers_{l}/{k}"])
      _close(_stacked_leaf(stacked_state.nu, axis, k, l), _flat(flat_s[0].nu)[f"layers_{l}/{k}"])
      mu_flat = _flat(flat_s[0].mu, _is_q)[f"layers_{l}/{k}"]
      mu_stacked = _flat(stacked_state.mu, _is_q)[f"layers/{k}"]
      if isinstance(mu_flat, QuantizedArray):
        [scale_axis] = qadam_mini_jax.transform.stacked_axes(
            qadam_mini_jax.BlockSpec((), layers=(axis,)), mu_flat.scales.ndim)
        np.testing.assert_array_equal(np.take(np.asarray(mu_stacked.codes), l, axis), mu_flat.codes)
        np.testing.assert_array_equal(np.take(np.asarray(mu_stacked.scales), l, scale_axis),
                                      mu_flat.scales)
      else:
        _close(np.take(np.asarray(mu_stacked), l, axis), mu_flat)
  for k in TOP_SHAPES:
    _close(_flat(stacked_u)[k], flat_u[k])


@pytest.mark.filterwarnings("ignore:Adam-mini partition found no")
def test_stacked_layers_round_stochastically_with_a_stream_per_layer():
  """Layers with equal inputs round differently (independent streams); each
  layer's codes are one of the two levels around its value, as unstacked."""
  tx = scale_by_adam_mini(B1, B2, quantization=QUANT, stochastic_rounding="all",
                          partition=qadam_mini_jax.BlockPartition(layers={"layers": 0}))
  g = {"layers": {"mlp": {"kernel": jnp.tile(jnp.asarray(
      np.random.default_rng(0).standard_normal((1, 256, 64)), jnp.float32), (4, 1, 1))}}}
  _, state = tx.update(g, tx.init(g))
  codes = np.asarray(state.mu["layers"]["mlp"]["kernel"].codes, np.int32)
  assert all((codes[l] != codes[0]).any() for l in range(1, 4))
  rtn = scale_by_adam_mini(B1, B2, quantization=QUANT, stochastic_rounding="none",
                           partition=qadam_mini_jax.BlockPartition(layers={"layers": 0}))
  nearest = np.asarray(rtn.update(g, rtn.init(g))[1].mu["layers"]["mlp"]["kernel"].codes, np.int32)
  assert np.abs(codes - nearest).max() <= 1


@functools.cache  # the same model for both kernel layouts: its initialisers take 4 s
def _equinox_lm(seed, dim=256, heads=4, ffn=384, vocab=300):
  """An Equinox LLaMA-like model: ``Linear.weight`` is ``(out, in)``."""
  import equinox as eqx  # pylint: disable=g-import-not-at-top
  key = jax.random.key(seed)

  class Block(eqx.Module):
    q_proj: eqx.nn.Linear
    k_proj: eqx.nn.Linear
    o_proj: eqx.nn.Linear
    up_proj: eqx.nn.Linear
    down_proj: eqx.nn.Linear
    attn_norm: eqx.nn.RMSNorm

  class Lm(eqx.Module):
    embed: eqx.nn.Embedding
    block: Block
    lm_head: eqx.nn.Linear

  k = jax.random.split(key, 7)
  block = Block(eqx.nn.Linear(dim, dim, use_bias=False, key=k[0]),
                eqx.nn.Linear(dim, dim, use_bias=False, key=k[1]),
                eqx.nn.Linear(dim, dim, key=k[2]), eqx.nn.Linear(dim, ffn, use_bias=False, key=k[3]),
                eqx.nn.Linear(ffn, dim, use_bias=False, key=k[4]), eqx.nn.RMSNorm(dim))
  return Lm(eqx.nn.Embedding(vocab, dim, key=k[5]), block,
            eqx.nn.Linear(dim, vocab, use_bias=False, key=k[6])), heads


def _as_flax(tree):
  """Equinox ``(out, in)`` weights as Flax ``(in, out)`` kernels (embeddings as they are)."""
  def convert(k, x):
    linear = x.ndim == 2 and not k.startswith("embed")
    return (k.replace("weight", "kernel"), x.T) if linear else (k, x)
  return dict(convert(k, x) for k, x in _flat(tree).items())


@pytest.mark.parametrize("kernel_layout", ["out_in", "in_out"])
def test_equinox_out_in_kernels_update_like_their_flax_transpose(kernel_layout):
  """``kernel_layout="out_in"`` on an Equinox model gives the update and INT8 state
  of the same weights in Flax ``(in, out)`` layout, transposed (and the Flax
  reading of the Equinox weights does not)."""
  pytest.importorskip("equinox")
  params, heads = _equinox_lm(0)
  grads = jax.tree.map(lambda x: jnp.asarray(
      np.random.default_rng(x.size).standard_normal(x.shape), x.dtype), params)
  kw = dict(b2=B2, weight_decay=0.1, stochastic_rounding="none")
  eqx_tx = qadam_mini_jax.q_adam_mini(1e-2, partition=qadam_mini_jax.BlockPartition(
      num_heads=heads, kernel_layout=kernel_layout), **kw)
  flax_tx = qadam_mini_jax.q_adam_mini(1e-2, partition=qadam_mini_jax.BlockPartition(
      num_heads=heads), **kw)
  # Jitted: the op-by-op update compiled each of its ~1000 operations on its own (30 s).
  eqx_u, eqx_s = _quiet(jax.jit(eqx_tx.update), grads, _quiet(eqx_tx.init, params), params)
  flax_params, flax_grads = nest(_as_flax(params)), nest(_as_flax(grads))
  flax_u, flax_s = _quiet(jax.jit(flax_tx.update), flax_grads,
                          _quiet(flax_tx.init, flax_params), flax_params)
  eqx_u, eqx_mu = _as_flax(eqx_u), _as_flax(jax.tree.map(
      lambda m: m.codes if isinstance(m, QuantizedArray) else m, eqx_s[0].mu, is_leaf=_is_q))
  flax_u, flax_mu = _flat(flax_u), _flat(flax_s[0].mu, _is_q)
  if kernel_layout == "in_out":  # (out, in) read as (in, out): per input neuron, wrong
    assert any(np.abs(eqx_u[k] - flax_u[k]).max() > 1e-3 * np.abs(flax_u[k]).max()
               for k in eqx_u)
    return
  for k, u in eqx_u.items():
    _close(u, flax_u[k])
    if isinstance(flax_mu[k], QuantizedArray):
      np.testing.assert_array_equal(eqx_mu[k], flax_mu[k].codes)


@pytest.mark.parametrize("axis", [0, 1])
def test_linen_scanned_model_trains_like_its_unrolled_twin(axis):
  """A linen LM whose blocks are ``nn.scan``-stacked (layer axis 0 or 1) and the same
  LM unrolled, from the same weights: real gradients, q_adam_mini updates equal."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  dim, ffn, vocab, layers = 64, 256, 128, 3

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      h = nn.RMSNorm(name="attn_norm")(x)
      x = x + nn.Dense(dim, name="o_proj")(nn.tanh(nn.Dense(dim, name="v_proj")(h)))
      h = nn.RMSNorm(name="mlp_norm")(x)
      return x + nn.Dense(dim, name="down_proj")(nn.silu(nn.Dense(ffn, name="up_proj")(h))), None

  class Lm(nn.Module):
    scanned: bool

    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(vocab, dim, name="embed")(tokens)
      if self.scanned:
        x, _ = nn.scan(Block, variable_axes={"params": axis}, split_rngs={"params": True},
                       length=layers)(name="layers")(x, None)
      else:
        for l in range(layers):
          x, _ = Block(name=f"layers_{l}")(x, None)
      return nn.Dense(vocab, use_bias=False, name="lm_head")(nn.RMSNorm(name="norm")(x))

  tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, vocab)
  stacked = jax.jit(Lm(True).init)(jax.random.key(0), tokens)["params"]
  unrolled = {k: v for k, v in stacked.items() if k != "layers"} | {
      f"layers_{l}": jax.tree.map(lambda x: jnp.take(x, l, axis), stacked["layers"])
      for l in range(layers)}

  def grads(model, params):
    def loss(p):
      logits = model.apply({"params": p}, tokens)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
    return jax.jit(jax.grad(loss))(params)  # op by op: each operation compiled on its own

  make = lambda **kw: qadam_mini_jax.q_adam_mini(
      1e-2, b2=B2, weight_decay=0.1, stochastic_rounding="none",
      partition=qadam_mini_jax.BlockPartition(**kw))
  tx_s, tx_u = make(layers={"layers": axis}), make()
  u_s, _ = _quiet(jax.jit(tx_s.update), grads(Lm(True), stacked), _quiet(tx_s.init, stacked),
                  stacked)
  u_u, _ = _quiet(jax.jit(tx_u.update), grads(Lm(False), unrolled),
                  _quiet(tx_u.init, unrolled), unrolled)
  for l in range(layers):
    for k, u in _flat(u_s["layers"]).items():
      # The scanned and unrolled forward passes round differently, so gradients
      # (and through the block means, updates) agree to float32 rounding only.
      np.testing.assert_allclose(np.take(np.asarray(u), l, axis),
                                 _flat(u_u[f"layers_{l}"])[k], rtol=1e-4, atol=1e-6)


def test_8bit_v_decays_like_b2_power_in_mean():
  """8-bit v (per-element blocks, as q_galore's inner Adam): element 0 of each
  group of 256 holds v at 1e-3 (so the group's scale stays put), the others
  start at 2.5e-4 (a level) and see zero gradients. Float v decays as b2^k;
  the stored v follows it in the mean over 16 x 255 elements (stochastic
  rounding), where rounding to nearest would keep every one at its first
  level (a decay of 0.1% per step against levels 9% apart)."""
  from qadam_mini_jax import low_rank, quantize, storage
  b2, shape, steps = 0.999, (16, 256), 300
  quant = Int8Quantization(256, 0)
  tx = qadam_mini_jax.scale_by_adam_mini(
      b2=b2, partition=low_rank.inner_partition(None), v_quantization=quant)
  first = jnp.full(shape, 0.5).at[:, 0].set(1.0)
  hold = jnp.zeros(shape).at[:, 0].set(np.sqrt(1e-3))  # element 0's v stays at (1 - b2) * 1

  @jax.jit
  def run(state):
    _, state = tx.update({"w": first}, state)
    def one(state, _):
      return tx.update({"w": hold}, state)[1], None
    return jax.lax.scan(one, state, length=steps)[0]
  state = run(tx.init({"w": jnp.zeros(shape)}))
  nu = state.nu["w"]
  assert isinstance(nu, QuantizedArray) and nu.codes.dtype == jnp.int8
  layout = storage.layout_for(qadam_mini_jax.BlockSpec(()), shape, quant)
  v = np.asarray(quantize.dequantize_log(nu, layout), np.float64)
  np.testing.assert_allclose(v[:, 0], 1e-3, rtol=1e-4)
  want = 2.5e-4 * b2**steps  # 0.74 of the start
  # Per element a random walk of jumps to the next level (9% away) with probability
  # ~1% a step: standard deviation ~16% of the value, ~0.3% over the 4080 elements.
  np.testing.assert_allclose(v[:, 1:].mean(), want, rtol=0.02)
