"""Behaviour users rely on: optax wrappers, Flax NNX and linen training loops."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import qadam_mini_jax as q
import tiny_models as tm

PART = q.BlockPartition(num_heads=tm.HEADS, num_kv_heads=tm.KV_HEADS)
SMALL_INT8 = q.Int8Quantization(group_size=16, min_size=64)


def _nnx_losses(tx, steps=30):
  model = tm.NnxLlama(nnx.Rngs(0))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  toks = tm.tokens(jax.random.key(1), batch=4, seq=16)

  @nnx.jit
  def step(model, opt, toks):
    loss, grads = nnx.value_and_grad(lambda m: tm.next_token_loss(m(toks), toks))(model)
    opt.update(model, grads)
    return loss

  return [float(step(model, opt, toks)) for _ in range(steps)], opt


@pytest.mark.parametrize("make, n_int8", [
    (lambda: q.adam_mini(3e-3, weight_decay=0.1, partition=PART), 0),
    # leaves of >= 64 elements: embedding, q/k/v/o, gate/up/down, lm_head
    (lambda: q.q_adam_mini(3e-3, weight_decay=0.1, partition=PART, quantization=SMALL_INT8), 9),
])
def test_nnx_optimizer_trains_as_a_plain_optax_loop(make, n_int8):
  """``nnx.Optimizer`` follows the plain optax loop on the model's pure parameter
  dict (the reference: ``tx.update`` + ``optax.apply_updates`` under ``jax.jit``),
  so the optimizer sees the same paths, blocks and INT8 leaves through NNX."""
  steps = 30
  tx = optax.chain(optax.clip_by_global_norm(1.0), make())
  losses, opt = _nnx_losses(tx, steps)
  graphdef, params = nnx.split(tm.NnxLlama(nnx.Rngs(0)), nnx.Param)
  toks = tm.tokens(jax.random.key(1), batch=4, seq=16)

  @jax.jit
  def step(params, state):
    loss_fn = lambda p: tm.next_token_loss(nnx.merge(graphdef, p)(toks), toks)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return loss, optax.apply_updates(params, updates), state

  params = nnx.to_pure_dict(params)
  state, want = tx.init(params), []
  for _ in range(steps):
    loss, params, state = step(params, state)
    want.append(float(loss))
  np.testing.assert_allclose(losses, want, rtol=1e-4)
  assert want[-1] < 0.7 * want[0]  # and it trains
  leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(opt.opt_state)))
  assert sum(x.dtype == jnp.int8 for x in leaves) == n_int8


def test_q_adam_mini_tracks_adamw_on_the_tiny_model():
  adamw, _ = _nnx_losses(optax.adamw(3e-3), steps=40)
  qam, _ = _nnx_losses(q.q_adam_mini(3e-3, partition=PART, quantization=SMALL_INT8), steps=40)
  assert qam[-1] < 1.15 * adamw[-1]


def test_linen_train_state():
  model = tm.LinenLm()
  toks = tm.tokens(jax.random.key(1), batch=4, seq=16)
  params = model.init(jax.random.key(0), toks)
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=q.q_adam_mini(3e-3, quantization=SMALL_INT8))

  @jax.jit
  def step(state):
    loss, grads = jax.value_and_grad(
        lambda p: tm.next_token_loss(state.apply_fn(p, toks), toks))(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(30):
    state, loss = step(state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0]


@functools.cache  # built op by op: once for the tests below
def _params():
  return jax.tree.map(jnp.asarray, nnx.to_pure_dict(nnx.state(tm.NnxLlama(nnx.Rngs(0)), nnx.Param)))


def _grads(params, seed):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])


def test_multisteps_accumulates_like_one_big_step():
  params = _params()
  tx = q.q_adam_mini(1e-2, partition=PART, quantization=SMALL_INT8)
  multi = optax.MultiSteps(tx, every_k_schedule=2)
  g1, g2 = _grads(params, 1), _grads(params, 2)
  state = multi.init(params)
  u1, state = jax.jit(multi.update)(g1, state, params)
  chex.assert_trees_all_equal(u1, jax.tree.map(jnp.zeros_like, u1))
  u2, state = jax.jit(multi.update)(g2, state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  want, _ = jax.jit(tx.update)(mean, jax.jit(tx.init)(params), params)  # op by op: 30 s more
  chex.assert_trees_all_close(u2, want, rtol=1e-5, atol=1e-7)


def test_apply_if_finite_skips_nan_steps():
  params = _params()
  tx = optax.apply_if_finite(q.q_adam_mini(1e-2, partition=PART, quantization=SMALL_INT8), 3)
  state = tx.init(params)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), _grads(params, 1))
  u, new_state = jax.jit(tx.update)(bad, state, params)
  chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, u))
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  assert int(new_state.notfinite_count) == 1
  u, new_state = jax.jit(tx.update)(_grads(params, 2), new_state, params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  assert int(new_state.inner_state[0].count) == 1


def test_jit_state_structure_is_stable_over_steps():
  params = _params()
  tx = q.q_adam_mini(1e-2, partition=PART, quantization=SMALL_INT8)
  state = tx.init(params)
  update = jax.jit(tx.update)
  first = state
  for i in range(3):
    _, state = update(_grads(params, i), state, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(first, state)
  assert update._cache_size() == 1
