"""INT8 weights (``weights.py``): storage, float gradients, and the fused step that re-quantizes them."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qadam_mini_jax as q
from qadam_mini_jax import random_bits
from qadam_mini_jax import weights as W

PARTITION = q.BlockPartition(num_heads=4, num_kv_heads=4)
QUANT = q.Int8Quantization(min_size=1024)


def _params(seed=0, layers=None):
  rng = np.random.default_rng(seed)
  normal = lambda *s: jnp.asarray(rng.normal(0, 0.02, s), jnp.float32)
  return {"embed": {"embedding": normal(96, 64)},
          "attn": {"q_proj": {"kernel": normal(64, 64)} if layers is None else
                   {"kernel": normal(layers, 64, 64)}},
          "norm": {"scale": jnp.ones(64)},
          "small": {"kernel": normal(8, 16)},
          "lm_head": {"kernel": normal(64, 96)}}


def _linear_numpy(x, scale, r):
  """Independent linear quantizer of one group: ``(codes, values)``, float64."""
  y = np.abs(x) / scale * 127.0 if scale > 0 else np.zeros_like(x)
  k = np.floor(y)
  code = np.minimum(k + (y - k >= 1 - r), 127) * np.sign(x)
  return code, scale * code / 127


def _coarse_scale_numpy(s):
  """The smallest float32 >= s with 3 mantissa bits, by search over the grid."""
  exponent = np.floor(np.log2(s))
  grid = [2.0**exponent * (1 + k / 8) for k in range(9)]
  return np.float32(min(v for v in grid if v >= np.float32(s)))


def _quantize_numpy(x, layout, noise=None):
  """Values of ``x`` quantized in the column groups of ``layout`` (``(in, out)`` kernels)."""
  assert layout.columns and x.ndim == 2
  out = np.zeros_like(x, np.float64)
  r = np.full(x.shape, 0.5) if noise is None else np.asarray(noise, np.float64)
  g = layout.group_size
  for i in range(0, x.shape[0], g):
    for j in range(x.shape[1]):
      col = np.asarray(x[i:i + g, j], np.float64)
      scale = _coarse_scale_numpy(np.abs(col).max())
      out[i:i + g, j] = _linear_numpy(col, scale, r[i:i + g, j])[1]
  return out


def test_quantize_params_converts_matrices_and_keeps_vectors_and_small_leaves():
  params = _params()
  qp = W.quantize_params(params, PARTITION, QUANT)
  kinds = jax.tree.map(lambda x: type(x).__name__, qp, is_leaf=W.is_quantized)
  assert kinds == {"embed": {"embedding": "QuantizedParam"},
                   "attn": {"q_proj": {"kernel": "QuantizedParam"}},
                   "norm": {"scale": "ArrayImpl"}, "small": {"kernel": "ArrayImpl"},
                   "lm_head": {"kernel": "QuantizedParam"}}
  kernel = qp["attn"]["q_proj"]["kernel"]
  # Groups are the INT8 momentum's: down the columns of an (in, out) kernel.
  specs = q.block_specs(params, PARTITION)
  assert kernel.layout == q.transform.layout_for(specs["attn"]["q_proj"]["kernel"], (64, 64), QUANT)
  assert kernel.codes.dtype == jnp.int8 and kernel.scales.dtype == jnp.float32
  w = np.asarray(params["attn"]["q_proj"]["kernel"])
  np.testing.assert_allclose(np.asarray(W.dequantize(kernel)), _quantize_numpy(w, kernel.layout),
                             rtol=1e-6)
  assert W.dequantize(params["norm"]["scale"]) is params["norm"]["scale"]


def test_value_and_grad_gives_float_gradients_of_the_dequantized_weights():
  qp = W.quantize_params(_params(), PARTITION, QUANT)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 64)), jnp.float32)

  @jax.checkpoint
  def block(w, h):
    return jnp.tanh(h @ w)

  def loss(p, x):
    h = block(W.dequantize(p["attn"]["q_proj"]["kernel"]), x * p["norm"]["scale"])
    h = h @ W.dequantize(p["lm_head"]["kernel"]) @ W.dequantize(p["embed"]["embedding"])
    return jnp.mean(h ** 2) + jnp.sum(p["small"]["kernel"] ** 2)

  value, grads = jax.jit(W.value_and_grad(loss))(qp, x)
  want_value, want = jax.value_and_grad(loss)(W.dequantize_params(qp), x)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  chex.assert_trees_all_equal_shapes_and_dtypes(grads, want)
  chex.assert_trees_all_close(grads, want, rtol=1e-5, atol=1e-9)


def test_value_and_grad_with_aux_like_jax():
  """has_aux=True: ``((value, aux), grads)`` as jax.value_and_grad gives them for the
  dequantized weights (zeros for the unused embedding); aux read from the weights sees
  their values, not the zero carriers; keyword arguments reach ``fn``."""
  qp = W.quantize_params(_params(), PARTITION, QUANT)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 64)), jnp.float32)

  def loss(p, x, *, temperature):
    h = jnp.tanh(x @ W.dequantize(p["attn"]["q_proj"]["kernel"])) * p["norm"]["scale"]
    logits = h @ W.dequantize(p["lm_head"]["kernel"]) / temperature
    aux = {"logits": logits, "head_sum": jnp.sum(W.dequantize(p["lm_head"]["kernel"]))}
    return jnp.mean(logits ** 2) + jnp.sum(p["small"]["kernel"] ** 2), aux

  (value, aux), grads = W.value_and_grad(loss, has_aux=True)(qp, x, temperature=2.0)
  floats = W.dequantize_params(qp)
  (want_value, want_aux), want = jax.value_and_grad(loss, has_aux=True)(floats, x, temperature=2.0)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  chex.assert_trees_all_equal_shapes_and_dtypes(aux, want_aux)
  chex.assert_trees_all_close(aux, want_aux, rtol=1e-6)
  assert float(aux["head_sum"]) != 0.0  # the weight's value, not its zero carrier
  chex.assert_trees_all_equal_shapes_and_dtypes(grads, want)
  chex.assert_trees_all_close(grads, want, rtol=1e-5, atol=1e-9)
  assert float(jnp.abs(grads["lm_head"]["kernel"]).max()) > 0  # a real gradient, not zeros


def _noise(key, path, shape):
  seeds = random_bits.stream_seeds(random_bits.key_words(key), jnp.int32(1),
                                   random_bits.path_stream(path), random_bits.WEIGHTS)
  return np.asarray(random_bits.uniform(shape, *seeds))


@pytest.mark.parametrize("stochastic", [False, True])
def test_fused_step_requantizes_the_float_step(stochastic):
  """INT8 weights = the float-weight step, quantized with the weights' own stream."""
  params = _params()
  qp = W.quantize_params(params, PARTITION, QUANT, stochastic=stochastic)
  grads = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(2).normal(size=x.shape), x.dtype),
                       params)
  opt = q.fused_q_adam_mini(1e-2, weight_decay=0.1, partition=PARTITION, quantization=QUANT, key=7)
  new_q, state_q = jax.jit(opt.step)(grads, opt.init(qp), qp)
  float_start = W.dequantize_params(qp)
  new_f, state_f = jax.jit(opt.step)(grads, opt.init(float_start), float_start)
  chex.assert_trees_all_equal(state_q, state_f)  # the weights' storage does not touch m or v
  kernel = new_q["attn"]["q_proj"]["kernel"]
  assert W.is_quantized(kernel) and kernel.stochastic == stochastic
  noise = _noise(7, "attn/q_proj/kernel", (64, 64)) if stochastic else None  # named by path
  want = _quantize_numpy(np.asarray(new_f["attn"]["q_proj"]["kernel"]), kernel.layout, noise)
  got = np.asarray(W.dequantize(kernel))
  # float32 against float64 arithmetic may flip a rounding exactly at a threshold.
  assert np.mean(np.isclose(got, want, rtol=1e-6, atol=0)) > 0.999
  np.testing.assert_allclose(got, want, atol=2 * 0.08 * 2 / 127)
  np.testing.assert_array_equal(new_q["norm"]["scale"], new_f["norm"]["scale"])


def test_stochastic_rounding_keeps_updates_below_half_a_step_and_nearest_stalls():
  """Q-Adam-mini's stall: with round-to-nearest, updates far below half a level are lost."""
  w = jnp.asarray(np.random.default_rng(3).normal(0, 0.02, (512, 16)), jnp.float32)
  params = {"w": {"kernel": w}}
  grads = {"w": {"kernel": jnp.ones_like(w)}}  # constant: Adam-mini's direction is exactly 1
  lr, steps = 1e-5, 40  # a level is ~5e-4 near |w| = 0.02: each update is ~1/50 of it
  partition = q.BlockPartition(rules={"w": "output"})
  moved = {}
  for stochastic in (False, True):
    qp = W.quantize_params(params, partition, QUANT, stochastic=stochastic)
    opt = q.fused_q_adam_mini(lr, partition=partition, quantization=QUANT)
    state, step = opt.init(qp), jax.jit(opt.step)
    start = np.asarray(W.dequantize(qp["w"]["kernel"]), np.float64)
    for _ in range(steps):
      qp, state = step(grads, state, qp)
    moved[stochastic] = np.asarray(W.dequantize(qp["w"]["kernel"]), np.float64) - start
  # Nearest: almost every update rounded away (only levels near 0 are finer than one update).
  assert np.mean(moved[False] == 0.0) > 0.9 and abs(moved[False].mean()) < 0.1 * steps * lr
  # Unbiased: the mean move is -steps*lr; its standard error here is ~6e-6 (8192 elements).
  np.testing.assert_allclose(moved[True].mean(), -steps * lr, atol=3e-5)


@pytest.mark.parametrize("axis", [0, 1])
def test_stacked_layers_step_like_separate_leaves(axis):
  """A scanned (L, in, out) or (in, L, out) kernel: per-layer groups, each layer's own step."""
  layers = 3
  rng = np.random.default_rng(4)
  w = jnp.asarray(rng.normal(0, 0.02, (layers, 64, 64)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(layers, 64, 64)), jnp.float32)
  move = lambda x: jnp.moveaxis(x, 0, axis)
  stacked = q.BlockPartition(num_heads=4, num_kv_heads=4, layers={"layers": axis})
  opt_args = dict(partition=stacked, quantization=QUANT, stochastic_rounding="none")
  qp = W.quantize_params({"layers": {"o_proj": {"kernel": move(w)}}}, stacked, QUANT,
                         stochastic=False)
  opt = q.fused_q_adam_mini(1e-2, **opt_args)
  new, _ = opt.step({"layers": {"o_proj": {"kernel": move(g)}}}, opt.init(qp), qp)
  got = jnp.moveaxis(W.dequantize(new["layers"]["o_proj"]["kernel"]), axis, 0)
  for layer in range(layers):
    one = W.quantize_params({"o_proj": {"kernel": w[layer]}}, PARTITION, QUANT, stochastic=False)
    single = q.fused_q_adam_mini(1e-2, partition=PARTITION, quantization=QUANT,
                                 stochastic_rounding="none")
    want, _ = single.step({"o_proj": {"kernel": g[layer]}}, single.init(one), one)
    np.testing.assert_array_equal(got[layer], W.dequantize(want["o_proj"]["kernel"]))


def test_optax_chain_refuses_int8_weights_by_name():
  qp = W.quantize_params(_params(), PARTITION, QUANT)
  tx = q.q_adam_mini(1e-3, partition=PARTITION, quantization=QUANT)
  grads = jax.tree.map(jnp.zeros_like, W.dequantize_params(qp))
  with pytest.raises(TypeError, match="attn/q_proj/kernel is an INT8 weight.*fused_q_adam_mini"):
    tx.update(grads, tx.init(qp), qp)


def test_weights_quantized_for_another_partition_are_refused_by_name():
  stacked = q.BlockPartition(num_heads=4, num_kv_heads=4, layers={"layers": 0})
  qp = W.quantize_params({"layers": {"o_proj": {"kernel": jnp.ones((2, 64, 64))}}}, stacked, QUANT)
  opt = q.fused_q_adam_mini(1e-3, partition=PARTITION, quantization=QUANT)
  with pytest.raises(ValueError, match="layers/o_proj/kernel: the INT8 weight"):
    opt.step({"layers": {"o_proj": {"kernel": jnp.ones((2, 64, 64))}}}, opt.init(qp), qp)


def test_weight_stream_is_apart_from_the_moment_stream():
  words = random_bits.key_words(0)
  m = random_bits.stream_seeds(words, jnp.int32(3), 5)
  w = random_bits.stream_seeds(words, jnp.int32(3), 5, random_bits.WEIGHTS)
  assert m == random_bits.stream_seeds(words, jnp.int32(3), 5, random_bits.MOMENT)
  assert int(m[0]) != int(w[0]) and int(m[1]) != int(w[1])
  a, b = (np.asarray(random_bits.uniform((4096,), *s)) for s in (m, w))
  assert abs(np.corrcoef(a, b)[0, 1]) < 0.05
