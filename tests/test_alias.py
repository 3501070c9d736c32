"""Tests of ``adam_mini`` / ``q_adam_mini`` against an independent NumPy reference.

The reference below re-derives Adam-mini (Zhang et al. 2024, arXiv:2406.16793)
from its equations, in float64 NumPy, with the Hessian blocks of every leaf of a
small LLaMA-shaped Flax tree written out by hand as explicit index lists. It
shares no code with ``qadam_mini_jax.partition``.

For every block B of every leaf:

    m   <- b1*m + (1-b1)*g
    v_B <- b2*v_B + (1-b2)*mean_{i in B}(g_i^2)
    p   <- p*(1 - lr*wd)                    (decayed leaves only)
    p   <- p - lr*(m/(1-b1^t)) / (sqrt(v_B)/sqrt(1-b2^t) + eps)
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qadam_mini_jax
from tiny_models import nest
from qadam_mini_jax import BlockPartition, Int8Quantization, QuantizedArray

LR, B1, B2, EPS, WD = 1e-2, 0.9, 0.95, 1e-8, 0.1
STEPS = 12
PARTITION = BlockPartition(num_heads=4, num_kv_heads=2)
VOCAB, DIM, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 32, 4, 2, 8, 64

# -----------------------------------------------------------------------------
# The LLaMA-shaped tree (Flax layouts: Dense kernels (in, out), Embed (vocab, dim))
# and, per leaf, its Adam-mini blocks written by hand.
# -----------------------------------------------------------------------------

ALL = slice(None)


def _rows(n):  # one block per row of a (n, ...) table: per token
  return [(r, ALL) for r in range(n)]


def _cols(n):  # one block per output column of an (in, n) kernel: per output neuron
  return [(ALL, c) for c in range(n)]


def _heads(n, width):  # one block per head: columns h*width:(h+1)*width, all rows
  return [(ALL, slice(h * width, (h + 1) * width)) for h in range(n)]


# path -> (shape, blocks, keep-dims shape of nu (block order = nu.reshape(-1)), decayed)
LEAVES = {
    "embed/embedding": ((VOCAB, DIM), _rows(VOCAB), (VOCAB, 1), True),
    "layers/0/attn/q_proj/kernel": ((DIM, HEADS * HEAD_DIM), _heads(HEADS, HEAD_DIM),
                                    (1, HEADS), True),
    "layers/0/attn/k_proj/kernel": ((DIM, KV_HEADS * HEAD_DIM), _heads(KV_HEADS, HEAD_DIM),
                                    (1, KV_HEADS), True),
    "layers/0/attn/v_proj/kernel": ((DIM, KV_HEADS * HEAD_DIM), _cols(KV_HEADS * HEAD_DIM),
                                    (1, KV_HEADS * HEAD_DIM), True),
    "layers/0/attn/o_proj/kernel": ((DIM, DIM), _cols(DIM), (1, DIM), True),
    "layers/0/mlp/gate_proj/kernel": ((DIM, FFN), _cols(FFN), (1, FFN), True),
    "layers/0/mlp/up_proj/kernel": ((DIM, FFN), _cols(FFN), (1, FFN), True),
    "layers/0/mlp/up_proj/bias": ((FFN,), [(i,) for i in range(FFN)], (FFN,), False),
    "layers/0/mlp/down_proj/kernel": ((FFN, DIM), _cols(DIM), (1, DIM), True),
    "layers/0/attn_norm/scale": ((DIM,), [(ALL,)], (1,), False),
    "norm/scale": ((DIM,), [(ALL,)], (1,), False),
    "lm_head/kernel": ((DIM, VOCAB), _cols(VOCAB), (1, VOCAB), True),
}
# Leaves whose m is stochastically rounded under stochastic_rounding="auto".
STOCHASTIC_LEAVES = {"embed/embedding", "lm_head/kernel"}


def _key_name(k):
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat(tree):
  return {"/".join(_key_name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_blocks_cover_each_element_once():
  for path, (shape, blocks, nu_shape, _) in LEAVES.items():
    count = np.zeros(shape, np.int64)
    for idx in blocks:
      count[idx] += 1
    assert (count == 1).all(), path
    assert len(blocks) == math.prod(nu_shape), path


_check_blocks_cover_each_element_once()


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  return {p: (0.5 * rng.standard_normal(s)).astype(np.float32)
          for p, (s, *_) in LEAVES.items()}


def make_grads(steps, seed=1):
  """Gradients whose scale varies along every axis (so a wrong block is visible)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    g = {}
    for p, (s, *_) in LEAVES.items():
      scale = np.ones(s)
      for axis, n in enumerate(s):
        shape = [1] * len(s)
        shape[axis] = n
        scale = scale * np.exp(rng.standard_normal(shape)).reshape(shape)
      g[p] = (rng.standard_normal(s) * scale).astype(np.float32)
    out.append(g)
  return out


def lr_constant(t):
  del t
  return LR


def numpy_adam_mini(params, grads, lr_fn=lr_constant, b1=B1, b2=B2, eps=EPS, wd=WD,
                    leaves=None):
  """float64 Adam-mini; returns per-step param dicts and final (m, block v)."""
  leaves = LEAVES if leaves is None else leaves
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros(len(leaves[k][1])) for k in p}
  history = []
  for t, g in enumerate(grads, start=1):
    lr = lr_fn(t)
    for k in p:
      _, blocks, _, decayed = leaves[k]
      gk = g[k].astype(np.float64)
      m[k] = b1 * m[k] + (1 - b1) * gk
      denom = np.empty_like(gk)
      for b, idx in enumerate(blocks):
        v[k][b] = b2 * v[k][b] + (1 - b2) * np.mean(gk[idx] ** 2)
        denom[idx] = np.sqrt(v[k][b]) / np.sqrt(1 - b2**t) + eps
      if decayed:
        p[k] = p[k] * (1 - lr * wd)
      p[k] = p[k] - lr * (m[k] / (1 - b1**t)) / denom
    history.append({k: x.copy() for k, x in p.items()})
  return history, m, v


def numpy_denominators(grads, b2=B2, eps=EPS):
  """Per step, per element ``sqrt(v_B)/sqrt(1-b2^t) + eps`` (float64)."""
  v = {k: np.zeros(len(LEAVES[k][1])) for k in LEAVES}
  out = []
  for t, g in enumerate(grads, start=1):
    dens = {}
    for k, (shape, blocks, _, _) in LEAVES.items():
      gk = g[k].astype(np.float64)
      dens[k] = np.empty(shape)
      for b, idx in enumerate(blocks):
        v[k][b] = b2 * v[k][b] + (1 - b2) * np.mean(gk[idx] ** 2)
        dens[k][idx] = np.sqrt(v[k][b]) / np.sqrt(1 - b2**t) + eps
    out.append(dens)
  return out


def run_optax(tx, params, grads, *, keep_states=False):
  """Run ``tx`` under jit; returns per-step flat param dicts (and states)."""

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p = nest({k: jnp.asarray(v) for k, v in params.items()})
  with warnings.catch_warnings():
    # The tree has embedding, output, query and key leaves: no partition warning.
    warnings.filterwarnings("error", message="Adam-mini partition")
    state = tx.init(p)
  params_hist, states = [], []
  for g in grads:
    p, state = step(p, state, nest({k: jnp.asarray(v) for k, v in g.items()}))
    params_hist.append({k: np.asarray(v) for k, v in _flat(p).items()})
    states.append(state)
  return (params_hist, states) if keep_states else params_hist


def _adam_mini_state(chain_state):
  (state,) = [s for s in chain_state if isinstance(s, qadam_mini_jax.ScaleByAdamMiniState)]
  return state


# -----------------------------------------------------------------------------
# 1. adam_mini against the NumPy reference.
# -----------------------------------------------------------------------------

# Tolerance: the library runs in float32 (unit roundoff 2^-24 ~ 6e-8). Each step
# adds a rounding error of about half an ulp of |p| <= ~2 (~1.2e-7) in p - lr*u and
# a relative error of a few ulps in u (|lr*u| <= ~0.1 here, so ~1e-8); over 12
# steps that is at most ~2e-6 absolute, and the measured max error is ~4.4e-7.
# rtol=1e-5, atol=2e-6 is above float32 noise but far below the effect of a
# wrong block or missing weight decay (>= 1e3 x and 8e3 x ATOL here, see
# test_reference_is_sensitive_to_the_blocks).
RTOL, ATOL = 1e-5, 2e-6


def test_adam_mini_matches_numpy_reference_leaf_by_leaf():
  params, grads = make_params(), make_grads(STEPS)
  tx = qadam_mini_jax.adam_mini(LR, B1, B2, EPS, WD, partition=PARTITION)
  got, states = run_optax(tx, params, grads, keep_states=True)
  want, m_ref, v_ref = numpy_adam_mini(params, grads)
  assert len(got) == STEPS
  for t in range(STEPS):
    assert got[t].keys() == LEAVES.keys()
    for k in LEAVES:
      np.testing.assert_allclose(got[t][k], want[t][k], rtol=RTOL, atol=ATOL,
                                 err_msg=f"{k} at step {t + 1}")
  # The state too: first moment per element and one second moment per block.
  state = _adam_mini_state(states[-1])
  assert int(state.count) == STEPS
  mu, nu = _flat(state.mu), _flat(state.nu)
  for k, (_, _, nu_shape, _) in LEAVES.items():
    assert mu[k].dtype == jnp.float32 and nu[k].dtype == jnp.float32, k
    assert nu[k].shape == nu_shape, k
    # m is a float32 sum of terms up to max|g|: allow a few ulps of that scale.
    np.testing.assert_allclose(np.asarray(mu[k]), m_ref[k], rtol=1e-5,
                               atol=1e-6 * np.abs(m_ref[k]).max(), err_msg=k)
    np.testing.assert_allclose(np.asarray(nu[k]).reshape(-1), v_ref[k], rtol=1e-5,
                               atol=1e-9, err_msg=k)


def test_reference_is_sensitive_to_the_blocks():
  """The gradients make a wrong partition visible far beyond the tolerance."""
  params, grads = make_params(), make_grads(STEPS)
  want, _, _ = numpy_adam_mini(params, grads)
  # Same reference with embedding blocks per column instead of per row, and with
  # k_proj blocks per query head (4) instead of per kv head (2).
  wrong_leaves = {**LEAVES,
                  "embed/embedding": ((VOCAB, DIM), _cols(DIM), (1, DIM), True),
                  "layers/0/attn/k_proj/kernel": ((DIM, KV_HEADS * HEAD_DIM),
                                                  _heads(HEADS, HEAD_DIM // 2),
                                                  (1, HEADS), True)}
  wrong, _, _ = numpy_adam_mini(params, grads, leaves=wrong_leaves)
  for k in ("embed/embedding", "layers/0/attn/k_proj/kernel"):
    assert np.abs(wrong[-1][k] - want[-1][k]).max() > 1e3 * ATOL, k
  # ... and without weight decay.
  no_wd, _, _ = numpy_adam_mini(params, grads, wd=0.0)
  diff = np.abs(no_wd[-1]["lm_head/kernel"] - want[-1]["lm_head/kernel"]).max()
  assert diff > 1e2 * ATOL


def test_default_decay_mask():
  mask = _flat(qadam_mini_jax.default_decay_mask(
      nest({k: jnp.zeros(s) for k, (s, *_) in LEAVES.items()})))
  assert mask == {k: decayed for k, (_, _, _, decayed) in LEAVES.items()}


def test_default_decay_mask_by_name_where_rank_would_decay():
  """Norms of rank 2 are left undecayed by their name: a per-head QK-norm
  ``(heads, head_dim)`` and a stacked ``(L, D)`` norm whose layer axis was not
  declared; a 2-D kernel beside them decays."""
  params = nest({"attn/q_norm/scale": jnp.zeros((HEADS, HEAD_DIM)),
                 "attn/k_norm/scale": jnp.zeros((KV_HEADS, HEAD_DIM)),
                 "blocks/post_attention_layernorm/scale": jnp.zeros((3, DIM)),
                 "blocks/ln_2/scale": jnp.zeros((3, DIM)),
                 "blocks/mlp/kernel": jnp.zeros((DIM, FFN))})
  assert _flat(qadam_mini_jax.default_decay_mask(params)) == {
      "attn/q_norm/scale": False, "attn/k_norm/scale": False,
      "blocks/post_attention_layernorm/scale": False, "blocks/ln_2/scale": False,
      "blocks/mlp/kernel": True}


# A tree with an INT8-sized kernel, an embedding and a norm, and a decay mask
# unlike the default (which decays the kernel and the embedding, not the norm).
MASK_LR, MASK_WD = 0.5, 1.0
MASK_PARAMS = {"embed/embedding": (16, 64), "mlp/kernel": (64, 32), "norm/scale": (32,)}
USER_MASK = {"embed/embedding": False, "mlp/kernel": True, "norm/scale": True}


@pytest.mark.parametrize("callable_mask", [False, True], ids=["pytree", "callable"])
@pytest.mark.parametrize("factory", ["adam_mini", "q_adam_mini", "fused_q_adam_mini"])
def test_mask_argument_chooses_the_decayed_leaves(factory, callable_mask):
  """Zero gradients leave only the decay: ``p * (1 - lr*wd)`` where the mask says so
  and ``p`` unchanged elsewhere (u = 0/(0 + eps) = 0 exactly)."""
  rng = np.random.default_rng(4)
  params = {k: rng.standard_normal(s).astype(np.float32) for k, s in MASK_PARAMS.items()}
  mask = nest(USER_MASK)
  kw = dict(mask=(lambda p: mask) if callable_mask else mask)
  if factory != "adam_mini":
    kw["quantization"] = Int8Quantization(min_size=1000)  # the kernel's m in INT8
  if factory == "fused_q_adam_mini":
    kw["implementation"] = "pallas"  # the decay is the kernel's (interpret mode off GPU)
  tx = getattr(qadam_mini_jax, factory)(MASK_LR, weight_decay=MASK_WD, **kw)
  p = nest({k: jnp.asarray(v) for k, v in params.items()})
  zeros = jax.tree.map(jnp.zeros_like, p)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # the partition's "found no attention"
    state = tx.init(p)
    if factory == "fused_q_adam_mini":
      new, _ = jax.jit(tx.step)(zeros, state, p)
    else:
      u, _ = jax.jit(tx.update)(zeros, state, p)
      new = optax.apply_updates(p, u)
  for k, v in _flat(new).items():
    want = params[k] * (1 - MASK_LR * MASK_WD) if USER_MASK[k] else params[k]
    np.testing.assert_allclose(v, want, rtol=1e-6, err_msg=k)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("mask", [None, {"mlp/kernel": False}], ids=["default", "no-decay"])
def test_int8_weights_decay_only_where_the_mask_says(mask, implementation):
  """The fused step on an INT8 weight: decayed by ``1 - lr*wd`` (far beyond a
  quantization step) by default, and kept within rounding where the mask says no."""
  rng = np.random.default_rng(5)
  w = rng.standard_normal((64, 32)).astype(np.float32)
  params = nest({"mlp/kernel": jnp.asarray(w)})
  part, quant = BlockPartition(), Int8Quantization(min_size=1000)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    qp = qadam_mini_jax.quantize_params(params, part, quant, stochastic=False)
    opt = qadam_mini_jax.fused_q_adam_mini(
        MASK_LR, weight_decay=MASK_WD, mask=mask and nest(mask), partition=part,
        quantization=quant, implementation=implementation)
    new, _ = opt.step(nest({"mlp/kernel": jnp.zeros_like(params["mlp"]["kernel"])}),
                      opt.init(qp), qp)
  before = np.asarray(qadam_mini_jax.weights.dequantize(qp["mlp"]["kernel"]))
  after = np.asarray(qadam_mini_jax.weights.dequantize(new["mlp"]["kernel"]))
  step = np.asarray(new["mlp"]["kernel"].scales).max() / 127  # the largest quantization step
  want = before * (1 - MASK_LR * MASK_WD) if mask is None else before
  assert np.abs(after - want).max() <= step
  assert np.abs(before - (before * (1 - MASK_LR * MASK_WD))).mean() > 10 * step  # visible


# -----------------------------------------------------------------------------
# 2. q_adam_mini(quantization=None) is adam_mini.
# -----------------------------------------------------------------------------


def test_q_adam_mini_without_quantization_is_adam_mini_with_every_hyperparameter():
  """Not the defaults: b1, b2, eps and weight decay all differ from them (eps = 0.03 is
  comparable to the smallest blocks' sqrt(v), so where eps sits shows), and each must
  reach the update of both aliases."""
  hp = dict(b1=0.8, b2=0.99, eps=0.03, wd=0.3)
  params, grads = make_params(), make_grads(STEPS)
  want, _, _ = numpy_adam_mini(params, grads, **hp)
  args = (LR, hp["b1"], hp["b2"], hp["eps"], hp["wd"])
  q = run_optax(qadam_mini_jax.q_adam_mini(*args, partition=PARTITION, quantization=None),
                params, grads)
  for t in range(STEPS):
    for k in LEAVES:
      np.testing.assert_allclose(q[t][k], want[t][k], rtol=RTOL, atol=ATOL,
                                 err_msg=f"{k} at step {t + 1}")
  a = run_optax(qadam_mini_jax.adam_mini(*args, partition=PARTITION), params, grads)
  for t in range(STEPS):
    for k in LEAVES:
      np.testing.assert_array_equal(q[t][k], a[t][k], err_msg=f"{k} at step {t + 1}")


# -----------------------------------------------------------------------------
# 3. q_adam_mini with INT8 momentum against adam_mini.
# -----------------------------------------------------------------------------

GROUP = 256


def _groups(key, shape):
  """Flat index arrays of a leaf's quantization groups, in the order of its scales.

  Kernels (blocks per output neuron or head, so their blocks reduce axis 0) are
  grouped down each column, 256 rows at a time: here every kernel has <= 64
  rows, so one group per column. The other leaves (embedding rows, norms, the
  bias) are grouped along rows of >= 256 trailing elements: all of them here
  are at most 2048 elements with a last axis under 256, so their row is the
  whole tensor, cut into 256 consecutive row-major elements.
  """
  n = int(np.prod(shape))
  flat = np.arange(n).reshape(shape)
  if key.endswith("/kernel"):
    rows, cols = shape
    return [flat[i:i + GROUP, j] for i in range(0, rows, GROUP) for j in range(cols)]
  return [np.arange(i, min(i + GROUP, n)) for i in range(0, n, GROUP)]


def _dequantize_np(key, q: QuantizedArray):
  """Square-law code: value = s * sign(c) * (c/127)^2 with s = the group's max|m|.

  Returns the values and each element's group max ``s``.
  """
  codes = np.asarray(q.codes)
  scales = np.asarray(q.scales).reshape(-1)
  flat = codes.reshape(-1).astype(np.float64)
  per_elem = np.empty_like(flat)
  groups = _groups(key, codes.shape)
  assert scales.shape == (len(groups),)
  for gi, index in enumerate(groups):
    per_elem[index] = scales[gi]
  values = np.sign(flat) * (flat / 127) ** 2 * per_elem
  return values.reshape(codes.shape), per_elem.reshape(codes.shape)


def _level_gap(m, s):
  """Distance between the two code levels around |m| in a group of max s."""
  k = np.floor(127 * np.sqrt(np.abs(m) / np.where(s > 0, s, 1)))
  return (2 * k + 1) / 127**2 * s


def test_q_adam_mini_int8_stays_within_derived_bound_of_adam_mini():
  """INT8 momentum error, per step and over the trajectory.

  Per step (from the state the INT8 run itself is in): the update uses the
  full-precision ``m_t = b1*deq(m_{t-1}) + (1-b1)*g_t``; what is stored is
  ``deq_t = s*sign(c)*(c/127)^2`` with ``s = max_group|m_t|``. With ``gap_t``
  the distance between the two code levels around ``|m_t|``,
  ``|deq_t - m_t| <= gap_t/2`` for round-to-nearest leaves and ``< gap_t`` for
  stochastically rounded leaves (embedding and lm_head under "auto").

  Trajectory bound (element-wise, a priori): v depends only on g, so both runs
  share the denominators ``den_t``. With ``r_t = deq_t - m_t`` and
  ``d_t = m^int8_t - m^float_t``, ``d_1 = 0`` and ``d_t = b1*(r_{t-1} + d_{t-1})``,
  so ``|d_t| <= D_t`` with ``D_t = b1*(c*gap_{t-1} + D_{t-1})`` (c = 1/2 or 1).
  The parameter gap ``e_t = (1-lr*wd)*e_{t-1} - lr*d_t/((1-b1^t)*den_t)`` obeys
  ``|e_t| <= E_t = E_{t-1} + lr*D_t/((1-b1^t)*den_t)``. The test checks
  ``|p^int8_t - p^float_t| <= E_t + 2e-6`` (float32 slack as in test 1).

  Also, a global number: max over leaves of
  ``||p^int8 - p^float|| / ||p^float - p_0||`` after 12 steps was measured at
  0.069 (embedding, stochastic rounding; lr 1e-2, b1 0.9, 12 steps; 0.054-0.080
  over other seeds and keys); the test allows 0.2 (~3x).
  """
  params, grads = make_params(), make_grads(STEPS)
  tx_f = qadam_mini_jax.adam_mini(LR, B1, B2, EPS, WD, partition=PARTITION)
  tx_q = qadam_mini_jax.q_adam_mini(LR, B1, B2, EPS, WD, partition=PARTITION,
                                    quantization=Int8Quantization(min_size=0))
  p_f = run_optax(tx_f, params, grads)
  p_q, states = run_optax(tx_q, params, grads, keep_states=True)
  dens = numpy_denominators(grads)

  prev_deq = {k: np.zeros(s, np.float32) for k, (s, *_) in LEAVES.items()}
  D = {k: np.zeros(s) for k, (s, *_) in LEAVES.items()}
  E = {k: np.zeros(s) for k, (s, *_) in LEAVES.items()}
  prev_gap = {k: np.zeros(s) for k, (s, *_) in LEAVES.items()}
  for t in range(1, STEPS + 1):
    mu = _flat(_adam_mini_state(states[t - 1]).mu)
    mu = {k: QuantizedArray(*[mu[f"{k}/{f}"] for f in ("codes", "scales")]) for k in LEAVES}
    for k, (shape, *_) in LEAVES.items():
      q = mu[k]
      assert q.codes.dtype == jnp.int8 and q.codes.shape == shape, k
      assert q.scales.dtype == jnp.float32, k
      deq, scale = _dequantize_np(k, q)
      m_full = (np.float32(B1) * prev_deq[k]
                + np.float32(1 - B1) * grads[t - 1][k]).astype(np.float32)
      # Scales are the group max |m|.
      flat = np.abs(m_full).reshape(-1)
      want_scales = np.array([flat[ix].max() for ix in _groups(k, shape)])
      np.testing.assert_allclose(np.asarray(q.scales).reshape(-1), want_scales,
                                 rtol=1e-5, err_msg=f"{k} step {t}")
      c = 1.0 if k in STOCHASTIC_LEAVES else 0.5
      err = np.abs(deq - m_full)
      gap = _level_gap(m_full, scale)
      assert (err <= c * gap * (1 + 1e-5) + 1e-12).all(), (
          f"{k} step {t}: max |deq-m|/gap = {(err / gap).max()} > {c}")
      if k not in STOCHASTIC_LEAVES:
        assert (err / gap).max() > 0.3, k  # really rounded (not trivially exact)
      else:  # really stochastic: the far level in E[min(f, 1-f)] ~ 1/4 of the cases
        away = np.mean(err > 0.5 * gap * (1 + 1e-5) + 1e-12)
        assert 0.1 < away < 0.45, f"{k} step {t}: {away:.3f} not rounded to nearest"
      # A-priori trajectory bound.
      D[k] = B1 * (c * prev_gap[k] + D[k]) if t > 1 else np.zeros(shape)
      E[k] = E[k] + LR * D[k] / ((1 - B1**t) * dens[t - 1][k])
      p_gap = np.abs(p_q[t - 1][k].astype(np.float64) - p_f[t - 1][k])
      assert (p_gap <= E[k] + 2e-6).all(), (
          f"{k} step {t}: gap {p_gap.max()} exceeds bound at {np.argmax(p_gap - E[k])}")
      prev_deq[k], prev_gap[k] = deq.astype(np.float32), gap

  p0 = make_params()
  rel = {k: np.linalg.norm(p_q[-1][k] - p_f[-1][k]) / np.linalg.norm(p_f[-1][k] - p0[k])
         for k in LEAVES}
  assert max(rel.values()) < 0.2, rel
  assert max(rel.values()) > 0  # INT8 really changed something


# -----------------------------------------------------------------------------
# 4. optax.inject_hyperparams: runtime hyperparameters, no recompilation.
# -----------------------------------------------------------------------------


def _kwargs(overrides):
  kwargs = dict(learning_rate=LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD,
                partition=PARTITION, quantization=Int8Quantization(min_size=0))
  kwargs.update(overrides)
  return kwargs


def _make_injected(**overrides):
  return optax.inject_hyperparams(qadam_mini_jax.q_adam_mini)(**_kwargs(overrides))


def _make_direct(**overrides):
  return qadam_mini_jax.q_adam_mini(**_kwargs(overrides))


def _counting_step(tx):
  """A jitted step and a list holding how many times it was traced."""
  traces = [0]

  @jax.jit
  def step(p, s, g):
    traces[0] += 1
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return step, traces


_STEPS_CACHE = {}  # (injected?, config) -> (tx, step, traces): compile each once


def _cached(injected, config):
  cache_key = (injected, tuple(sorted(config.items())))
  if cache_key not in _STEPS_CACHE:
    tx = (_make_injected if injected else _make_direct)(**config)
    _STEPS_CACHE[cache_key] = (tx, *_counting_step(tx))
  return _STEPS_CACHE[cache_key]


SWITCH_STEPS, SWITCH_AT = 8, 4


def _tree_data():
  params, grads = make_params(), make_grads(SWITCH_STEPS)
  p0 = nest({k: jnp.asarray(v) for k, v in params.items()})
  return p0, [nest({k: jnp.asarray(v) for k, v in g.items()}) for g in grads]


def _run_injected(config, changes):
  """Injected run; at step SWITCH_AT, ``state.hyperparams`` gets ``changes``."""
  p, gtrees = _tree_data()
  tx, step, traces = _cached(True, config)
  state = tx.init(p)
  for t in range(SWITCH_STEPS):
    if t == SWITCH_AT:
      # Traces and executables so far (the first call's uncommitted inputs may
      # take a cache entry of their own); none may be added from here on.
      seen = (traces[0], step._cache_size())
      for name, value in changes.items():
        old = state.hyperparams[name]
        state.hyperparams[name] = jnp.asarray(value, old.dtype)
    p, state = step(p, state, gtrees[t])
  for name, value in changes.items():
    np.testing.assert_allclose(state.hyperparams[name], value, rtol=1e-7)
  assert traces[0] == 1, f"traced {traces[0]} times"
  assert (traces[0], step._cache_size()) == seen, "recompiled after the change"
  return _flat(p)


def _run_direct(first, second):
  """q_adam_mini(**first) for SWITCH_AT steps, then q_adam_mini(**second)."""
  p, gtrees = _tree_data()
  tx_a, step_a, _ = _cached(False, first)
  _, step_b, _ = _cached(False, second)
  state = tx_a.init(p)
  for t in range(SWITCH_STEPS):
    p, state = (step_a if t < SWITCH_AT else step_b)(p, state, gtrees[t])
  return _flat(p)


def _assert_close(injected, direct, what):
  # Traced vs constant hyperparameters may compile to slightly different float32
  # arithmetic; measured differences are 0 here, the tolerance allows float32 noise.
  for k in LEAVES:
    np.testing.assert_allclose(injected[k], direct[k], rtol=1e-5, atol=1e-6,
                               err_msg=f"{what}: {k}")


def test_inject_hyperparams_lr_and_b2_change_at_runtime_without_recompiling():
  first, change = dict(weight_decay=0.0), dict(learning_rate=3e-3, b2=0.5)
  injected = _run_injected(first, change)
  _assert_close(injected, _run_direct(first, {**first, **change}), "lr/b2 switch")
  # The switch matters: without it the result is far away.
  unchanged = _run_direct(first, first)
  assert max(np.abs(unchanged[k] - injected[k]).max() for k in LEAVES) > 1e-3


def test_inject_hyperparams_weight_decay_change_at_runtime():
  """Nonzero weight decay under inject_hyperparams, changed at runtime."""
  change = dict(weight_decay=0.5, learning_rate=3e-3)
  injected = _run_injected({}, change)
  _assert_close(injected, _run_direct({}, change), "weight decay switch")


def test_inject_hyperparams_construction_values_match_direct():
  """No runtime change: injected q_adam_mini(..., weight_decay=0.1) == direct."""
  _assert_close(_run_injected({}, {}), _run_direct({}, {}), "no switch")


def test_inject_hyperparams_int_key_matches_direct():
  """An int ``key`` becomes a traced hyperparameter; rounding must not change."""
  config = dict(weight_decay=0.0, key=7)
  injected, direct = _run_injected(config, {}), _run_direct(config, config)
  for k in LEAVES:
    np.testing.assert_array_equal(injected[k], direct[k], err_msg=k)
  # The key matters (stochastic rounding of embedding and lm_head).
  other = _run_direct(dict(weight_decay=0.0), dict(weight_decay=0.0))
  assert np.abs(other["embed/embedding"] - direct["embed/embedding"]).max() > 0


@pytest.mark.parametrize("factory", ["adam_mini", "q_adam_mini", "fused_q_adam_mini"])
@pytest.mark.parametrize("name, value, problem", [
    ("b1", 1.0, r"b1 must be in \[0, 1\), got 1.0"),
    ("b1", -0.1, r"b1 must be in \[0, 1\)"),
    ("b2", 1.5, r"b2 must be in \[0, 1\), got 1.5"),
    ("b2", np.float32("nan"), r"b2 must be in \[0, 1\), got nan"),
    ("eps", -1e-8, r"eps must be finite and >= 0"),
    ("learning_rate", -1e-3, r"learning_rate must be finite and >= 0, got -0.001"),
    ("learning_rate", math.inf, r"learning_rate must be finite and >= 0, got inf"),
    ("weight_decay", math.nan, r"weight_decay must be finite and >= 0, got nan"),
])
def test_out_of_range_hyperparameters_are_refused(factory, name, value, problem):
  with pytest.raises(ValueError, match=problem):
    getattr(qadam_mini_jax, factory)(**{"learning_rate": LR, name: value})


def test_scale_by_adam_mini_checks_its_hyperparameters():
  with pytest.raises(ValueError, match=r"b2 must be in \[0, 1\), got 1"):
    qadam_mini_jax.scale_by_adam_mini(b2=1)
  qadam_mini_jax.scale_by_adam_mini(b1=0.0, b2=0.0, eps=0.0)  # the edges are allowed


def test_schedules_and_arrays_are_not_checked_at_construction():
  """Their values are unknown or runtime values (inject_hyperparams passes arrays)."""
  qadam_mini_jax.q_adam_mini(lambda count: -1.0, b1=jnp.float32(2.0))
  tx = optax.inject_hyperparams(qadam_mini_jax.q_adam_mini)(
      learning_rate=LR, b1=0.5, partition=PARTITION)
  params, grads = _tree_data()
  state = tx.init(params)
  assert state.hyperparams["b1"] == 0.5
  state.hyperparams["b1"] = jnp.asarray(0.8)  # changed at runtime, not re-checked
  updates, _ = jax.jit(tx.update)(grads[0], state, params)
  assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))


# -----------------------------------------------------------------------------
# 5. Learning-rate schedules.
# -----------------------------------------------------------------------------

INIT, PEAK, END, WARMUP, DECAY = 1e-3, 2e-2, 2e-3, 4, 10


def _warmup_cosine_by_hand(count):
  """optax.warmup_cosine_decay_schedule written out (count = updates so far)."""
  if count < WARMUP:
    return INIT + (PEAK - INIT) * count / WARMUP
  c = min(count - WARMUP, DECAY - WARMUP)
  return END + (PEAK - END) * 0.5 * (1 + math.cos(math.pi * c / (DECAY - WARMUP)))


@pytest.mark.parametrize("factory", ["adam_mini", "q_adam_mini"])
def test_schedule_matches_manual_per_step_learning_rate(factory):
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=INIT, peak_value=PEAK, warmup_steps=WARMUP, decay_steps=DECAY,
      end_value=END)
  kwargs = dict(partition=PARTITION)
  if factory == "q_adam_mini":
    kwargs["quantization"] = None
  tx = getattr(qadam_mini_jax, factory)(schedule, B1, B2, EPS, WD, **kwargs)
  params, grads = make_params(), make_grads(STEPS)  # 12 > DECAY: also the flat end
  got = run_optax(tx, params, grads)
  # Step t (1-based) uses the schedule at count t-1.
  want, _, _ = numpy_adam_mini(params, grads, lr_fn=lambda t: _warmup_cosine_by_hand(t - 1))
  for t in range(STEPS):
    for k in LEAVES:
      np.testing.assert_allclose(got[t][k], want[t][k], rtol=RTOL, atol=ATOL,
                                 err_msg=f"{k} at step {t + 1}")
  # A constant lr would not match (the schedule really is used).
  const, _, _ = numpy_adam_mini(params, grads, lr_fn=lambda t: PEAK)
  assert np.abs(const[-1]["lm_head/kernel"] - got[-1]["lm_head/kernel"]).max() > 1e-3


def test_injected_schedule_drives_the_update():
  """inject_hyperparams(q_adam_mini)(learning_rate=schedule): stored lr and params."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=INIT, peak_value=PEAK, warmup_steps=WARMUP, decay_steps=DECAY,
      end_value=END)
  # weight_decay=0: weight decay under inject_hyperparams is tested in section 4.
  tx = _make_injected(learning_rate=schedule, weight_decay=0.0, quantization=None)
  step, traces = _counting_step(tx)
  params, grads = make_params(), make_grads(STEPS)
  want, _, _ = numpy_adam_mini(params, grads, wd=0.0,
                               lr_fn=lambda t: _warmup_cosine_by_hand(t - 1))
  p = nest({k: jnp.asarray(v) for k, v in params.items()})
  state = tx.init(p)
  for t, g in enumerate(grads, start=1):
    p, state = step(p, state, nest({k: jnp.asarray(v) for k, v in g.items()}))
    # After t updates the stored value is the lr used at step t: schedule(t-1).
    np.testing.assert_allclose(state.hyperparams["learning_rate"],
                               _warmup_cosine_by_hand(t - 1), rtol=1e-6)
    for k, v in _flat(p).items():
      np.testing.assert_allclose(v, want[t - 1][k], rtol=RTOL, atol=ATOL,
                                 err_msg=f"{k} at step {t}")
  assert traces[0] == 1


def test_one_nonfinite_gradient_poisons_its_group_unless_apply_if_finite_skips_the_step():
  params = {"mlp": {"kernel": jnp.ones((512, 8), jnp.float32)}}
  good = {"mlp": {"kernel": jnp.asarray(np.random.default_rng(0).standard_normal((512, 8)),
                                        jnp.float32)}}
  bad = {"mlp": {"kernel": good["mlp"]["kernel"].at[3, 2].set(jnp.inf)}}
  make = lambda: qadam_mini_jax.q_adam_mini(1e-2, b2=0.95, quantization=qadam_mini_jax.Int8Quantization(min_size=0))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # the partition's "found no embedding"
    plain = make()
    state = plain.init(params)
    _, poisoned = plain.update(bad, state, params)
    u, _ = plain.update(good, poisoned, params)
    # Column 2's INT8 group (rows 0-255) is NaN; the rest of its block (the column)
    # has v = inf, so it never moves again; the other columns are unaffected.
    column = np.asarray(u["mlp"]["kernel"][:, 2])
    assert np.isnan(column[:256]).all() and not column[256:].any()
    assert np.isfinite(np.asarray(u["mlp"]["kernel"][:, [0, 1, 3]])).all()

    wrapped = optax.apply_if_finite(make(), max_consecutive_errors=3)
    w_state = wrapped.init(params)
    skipped_u, w_state = wrapped.update(bad, w_state, params)
    assert not np.asarray(skipped_u["mlp"]["kernel"]).any() and int(w_state.notfinite_count) == 1
    u_wrapped, _ = wrapped.update(good, w_state, params)
    u_plain, _ = plain.update(good, state, params)  # as if the bad step never happened
  # Equal up to float32 rounding (under lax.cond XLA may fuse the arithmetic differently).
  np.testing.assert_allclose(u_wrapped["mlp"]["kernel"], u_plain["mlp"]["kernel"],
                             rtol=4 * 2**-23, atol=1e-9)
