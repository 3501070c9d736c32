"""MicroAdam against a loop-based NumPy implementation of its algorithm, against Adam
(density 1), on stacked layers, masked subtrees and bfloat16 parameters."""

import math

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import qadam_mini_jax as q
from qadam_mini_jax import int4, sparse_window

B1, B2, EPS = 0.9, 0.999, 1e-8


def outward(lo, hi):
  """float32 ``lo``, ``hi`` rounded outward to bfloat16, as float32."""
  bf16 = ml_dtypes.bfloat16
  lo_b, hi_b = bf16(lo), bf16(hi)
  if np.float32(lo_b) > lo:
    lo_b = np.nextafter(lo_b, bf16(-np.inf))
  if np.float32(hi_b) < hi:
    hi_b = np.nextafter(hi_b, bf16(np.inf))
  return np.float32(lo_b), np.float32(hi_b)


class NumpyMicroAdam:
  """One array's MicroAdam (Modoranu et al. 2024, Algorithm 1), element by element.

  Blocks of ``block`` keep ``ceil(len * density)`` entries each (the tail too);
  the error feedback is 4-bit per bucket of ``bucket`` with its min and max in
  bfloat16 (rounded outward); the ring has ``m`` rows.
  """

  def __init__(self, size, m, density, block, bucket):
    self.size, self.m, self.density = size, m, density
    self.block = min(block, size)
    self.bucket = min(bucket, size + size % 2)
    self.starts = list(range(0, size, self.block))
    self.keep = [math.ceil(round(min(self.block, size - s) * density, 9)) for s in self.starts]
    kept = sum(self.keep)
    self.indices = np.zeros((m, kept), np.int16)
    self.values = np.zeros((m, kept), ml_dtypes.bfloat16)
    self.error = np.zeros(size, np.float32)  # Q^-1(e), as the codes decode
    self.codes = np.zeros(size, np.uint8)
    self.t = 0

  def quantize_error(self, a):
    for s in range(0, self.size, self.bucket):
      x = a[s:s + self.bucket]
      lo, hi = outward(x.min(), x.max())
      u = (hi - lo) * np.float32(1 / 15)
      inv = np.float32(1) / u if u > 0 else np.float32(0)
      c = np.clip(np.floor((x - lo) * inv + np.float32(0.5)), 0, 15)
      self.codes[s:s + len(x)] = c
      self.error[s:s + len(x)] = lo + c.astype(np.float32) * u

  def step(self, g):
    self.t += 1
    a = np.asarray(g, np.float32).reshape(-1) + self.error
    row, picked, column = (self.t - 1) % self.m, [], 0
    for start, k in zip(self.starts, self.keep):
      block = a[start:start + self.block]
      for i in np.argsort(-np.abs(block), kind="stable")[:k]:
        self.indices[row, column] = i
        self.values[row, column] = ml_dtypes.bfloat16(block[i])
        picked.append(start + i)
        column += 1
    a[picked] = 0.0
    self.quantize_error(a)
    m_hat, v_hat = np.zeros(self.size), np.zeros(self.size)
    for r in range(min(self.t, self.m)):
      age = (self.t - 1 - r) % self.m
      column = 0
      for start, k in zip(self.starts, self.keep):
        for _ in range(k):
          v = float(self.values[r, column])
          m_hat[start + self.indices[r, column]] += B1**age * v
          v_hat[start + self.indices[r, column]] += B2**age * v * v
          column += 1
    m_hat *= (1 - B1) / (1 - B1**self.t)
    v_hat *= (1 - B2) / (1 - B2**self.t)
    return m_hat / (np.sqrt(v_hat) + EPS)


def grads_at(step, params, scale=1.0):
  return jax.tree.map(lambda p: scale * jax.random.normal(
      jax.random.fold_in(jax.random.key(7), step), p.shape, jnp.float32).astype(p.dtype), params)


def unpacked_codes(error):
  packed = np.asarray(error.packed)
  return np.stack([packed & 15, packed >> 4], -1).reshape(-1)


def test_matches_numpy_reference_across_the_ring_wrap_around():
  # 143 elements: 4 blocks of 32 keeping 4 and a 15-tail keeping 2; error
  # buckets of 10 with a ragged 3; a 7-element leaf is one block keeping 1.
  params = {"w": jnp.zeros((13, 11)), "b": jnp.zeros((7,))}
  m, density, block, bucket = 3, 0.1, 32, 10
  opt = q.scale_by_micro_adam(m, density, B1, B2, EPS, block_size=block, error_bucket=bucket)
  refs = {k: NumpyMicroAdam(x.size, m, density, block, bucket) for k, x in params.items()}
  state = opt.init(params)
  update = jax.jit(opt.update)
  for t in range(8):  # the ring wraps around twice
    g = grads_at(t, params, scale=10.0**(t % 3 - 1))
    u, state = update(g, state)
    for k, ref in refs.items():
      expected = ref.step(g[k])
      np.testing.assert_allclose(np.asarray(u[k]).reshape(-1), expected, rtol=2e-5, atol=1e-7)
      np.testing.assert_array_equal(state.indices[k], ref.indices)
      np.testing.assert_array_equal(np.asarray(state.values[k], np.float32),
                                    ref.values.astype(np.float32))
      np.testing.assert_array_equal(unpacked_codes(state.error[k])[:ref.size], ref.codes)
  assert int(state.count) == 8
  assert state.indices["w"].shape == (3, 4 * 4 + 2)


def test_density_one_with_a_long_window_is_adam():
  params = {"w": jnp.zeros((37, 5)), "b": jnp.zeros((3,))}
  opt = q.scale_by_micro_adam(8, 1.0, B1, B2, EPS, block_size=16, error_bucket=8)
  adam = optax.scale_by_adam(B1, B2, EPS)
  state, adam_state = opt.init(params), adam.init(params)
  update = jax.jit(opt.update)
  for t in range(6):
    # Values in bfloat16 (the ring's dtype) so that the window holds them exactly.
    g = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), grads_at(t, params))
    u, state = update(g, state)
    expected, adam_state = adam.update(g, adam_state)
    chex.assert_trees_all_close(u, expected, rtol=1e-5, atol=1e-6)
    # Everything is kept: the error feedback stays exactly 0.
    np.testing.assert_array_equal(unpacked_codes(state.error["w"]), 0)


def test_stacked_layers_equal_their_unstacked_twins():
  """Layers stacked on axis 0 and on axis 1 (MaxText), in one program."""
  layers = [jax.random.normal(jax.random.key(i), (9, 12)) for i in range(3)]
  stacked = {f"axis{axis}": {"layers": {"mlp": jnp.stack(layers, axis)}} for axis in (0, 1)}
  twins = {f"layer{i}": {"mlp": x} for i, x in enumerate(layers)}
  kwargs = dict(window=2, density=0.1, block_size=32, error_bucket=16)
  opt = q.micro_adam(1e-2, weight_decay=0.1, partition=q.BlockPartition(
      layers={"axis0/layers": 0, "axis1/layers": 1}), **kwargs)
  twin_opt = q.micro_adam(1e-2, weight_decay=0.1, **kwargs)
  state, twin_state = opt.init(stacked), twin_opt.init(twins)

  @jax.jit
  def steps(stacked, state, twins, twin_state):
    for t in range(3):
      twin_g = grads_at(t, twins)
      g = {f"axis{axis}": {"layers": {"mlp": jnp.stack([twin_g[f"layer{i}"]["mlp"]
                                                        for i in range(3)], axis)}}
           for axis in (0, 1)}
      u, state = opt.update(g, state, stacked)
      stacked = optax.apply_updates(stacked, u)
      u, twin_state = twin_opt.update(twin_g, twin_state, twins)
      twins = optax.apply_updates(twins, u)
    return stacked, state, twins, twin_state

  stacked, state, twins, twin_state = steps(stacked, state, twins, twin_state)
  inner, twin_inner = state[0], twin_state[0]
  for axis in (0, 1):
    name = f"axis{axis}"
    for i in range(3):
      twin = f"layer{i}"
      np.testing.assert_array_equal(jnp.take(stacked[name]["layers"]["mlp"], i, axis),
                                    twins[twin]["mlp"])
      for field in ("indices", "values"):
        np.testing.assert_array_equal(getattr(inner, field)[name]["layers"]["mlp"][i],
                                      getattr(twin_inner, field)[twin]["mlp"])
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[i], b),
                   inner.error[name]["layers"]["mlp"], twin_inner.error[twin]["mlp"])
  assert not np.array_equal(twins["layer0"]["mlp"], layers[0])  # it moved


def test_masked_subtree_and_bfloat16_parameters():
  params = {"w": jnp.ones((20, 30), jnp.bfloat16), "frozen": jnp.ones((20, 30)),
            "step": jnp.zeros((), jnp.int32)}
  opt = optax.masked(q.micro_adam(1e-2), {"w": True, "frozen": False, "step": False})
  alone = q.micro_adam(1e-2)
  state = opt.init(params)
  alone_state = alone.init({"w": params["w"]})
  assert jax.tree.structure(state.inner_state[0].indices) == jax.tree.structure(
      {"w": 0, "frozen": optax.MaskedNode(), "step": optax.MaskedNode()})
  g = {"w": jnp.full((20, 30), 0.5, jnp.bfloat16), "frozen": jnp.ones((20, 30)),
       "step": jnp.zeros((), jnp.int32)}
  u, state = opt.update(g, state, params)
  expected, _ = alone.update({"w": g["w"]}, alone_state, {"w": params["w"]})
  assert u["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(u["w"], expected["w"])
  np.testing.assert_array_equal(u["frozen"], g["frozen"])  # passed through, untouched
  # Each block of 1024 keeps 11 (the last, 600 - 0 = 600 elements alone: 6).
  assert int(jnp.sum(u["w"] != 0)) == 6


@pytest.mark.parametrize("kwargs, problem", [
    (dict(density=0.0), "density"), (dict(density=1.5), "density"),
    (dict(block_size=2**15 + 1), "int16"), (dict(error_bucket=7), "even"),
    (dict(window=0), "window"),
])
def test_arguments_are_checked(kwargs, problem):
  with pytest.raises(ValueError, match=problem):
    q.micro_adam(1e-3, **kwargs)


def test_state_bytes_per_parameter_at_the_defaults():
  params = {"w": jnp.zeros((4096, 1024))}
  state = jax.eval_shape(q.micro_adam(1e-3).init, params)
  per_param = q.tree_nbytes(state) / params["w"].size
  # 0.5 (4-bit error) + 4 * 10 * 11/1024 (ring) + 4/1024 (bucket ends), and the count.
  assert per_param == pytest.approx(0.5 + 40 * 11 / 1024 + 4 / 1024, abs=1e-6)


def test_orbax_resume_is_bit_exact(tmp_path):
  """Saved at step 3 with Orbax and restored (the count too: the reference does not
  save it), two more steps give the state and parameters of the run that went on."""
  ocp = pytest.importorskip("orbax.checkpoint")
  params = {"layers": {"mlp": jnp.ones((2, 9, 12))}, "norm": jnp.ones((12,))}
  opt = q.micro_adam(1e-2, weight_decay=0.1, window=2, block_size=32, error_bucket=16,
                     partition=q.BlockPartition(layers={"layers": 0}))

  @jax.jit
  def step(t, params, state):
    u, state = opt.update(grads_at(t, params), state, params)
    return optax.apply_updates(params, u), state

  def steps(first, last, params, state):
    for t in range(first, last):
      params, state = step(t, params, state)
    return params, state

  params, state = steps(0, 3, params, opt.init(params))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "3", {"params": params, "state": state})
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "3", jax.eval_shape(
        lambda: {"params": params, "state": state}))
  want = steps(3, 5, params, state)
  got = steps(3, 5, restored["params"], restored["state"])
  assert int(got[1][0].count) == 5
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_updating_a_layer_in_parts_changes_nothing(monkeypatch):
  """Layers cut into parts along their first axis (8 parts of 2 rows here, as a 7B
  embedding is cut into 8) give the bits of the whole-layer update."""
  from qadam_mini_jax import sparse_adam  # pylint: disable=g-import-not-at-top
  params = {"w": jnp.zeros((16, 24)), "axis0": {"layers": jnp.zeros((3, 16, 24))},
            "axis1": {"layers": jnp.zeros((16, 3, 24))}}

  def run():  # a new optimizer: jax.jit would reuse the other's trace
    opt = q.scale_by_micro_adam(2, 0.1, block_size=16, error_bucket=16,
                                partition=q.BlockPartition(layers={"axis0/layers": 0,
                                                                   "axis1/layers": 1}))
    state, outs = opt.init(params), []
    update = jax.jit(opt.update)
    for t in range(3):
      u, state = update(grads_at(t, params), state)
      outs.append(u)
    return outs, state

  whole = run()
  monkeypatch.setattr(sparse_adam, "PART_ELEMENTS", 48)
  plan = sparse_adam._LeafPlan((), (16, 24), sparse_window.window_layout(384, 16, 0.1))
  assert sparse_adam._parts(plan, int4.MinMaxInt4Storage(16)) == 8
  parts = run()
  for a, b in zip(jax.tree.leaves(parts), jax.tree.leaves(whole)):
    np.testing.assert_array_equal(a, b)
