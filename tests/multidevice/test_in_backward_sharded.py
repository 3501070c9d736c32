"""in_backward.train_step on 8 devices (FSDP x data): the same training as on one device.

Run in a subprocess with 8 simulated CPU devices (``tests/multidevice_process.py``).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from llama_model import Llama, pieces

import qadam_mini_jax as q
from qadam_mini_jax import in_backward
from tiny_models import TINY

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")

CONFIG = dataclasses.replace(TINY, dim=32, ffn_dim=64, head_dim=None, num_layers=3,
                             scan_layers=True)
PARTITION = q.BlockPartition(num_heads=CONFIG.num_heads, num_kv_heads=CONFIG.num_kv_heads,
                             layers={"layers": 0})
QUANT = q.Int8Quantization(group_size=8, min_size=0)
STEPS = 3


def fsdp(path, shape):
  """Stacked matrices split on their input axis (axis 1), the embedding and head on
  the model dimension; vectors replicated."""
  if path.startswith("layers/") and len(shape) == 3:
    return P(None, "fsdp")
  if path.startswith("embed/"):
    return P(None, "fsdp")
  if path.startswith("lm_head/"):
    return P("fsdp")
  return P()


def run(mesh=None):
  model = Llama(CONFIG, nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tokens = jax.random.randint(jax.random.key(1), (8, 8), 0, CONFIG.vocab)
  shardings = None
  if mesh is not None:
    shardings = jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, fsdp(jax.tree_util.keystr(
            path, simple=True, separator="/"), x.shape)), params)
    params = jax.device_put(params, shardings)
    tokens = jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp"))))
  tx = q.q_adam_mini(1e-2, weight_decay=0.1, partition=PARTITION, quantization=QUANT,
                     stochastic_rounding="all", shardings=shardings)
  step = jax.jit(in_backward.train_step(*pieces(model), tx), donate_argnums=(0, 1))
  state = jax.jit(tx.init)(params)
  losses = []
  for _ in range(STEPS):
    metrics, params, state = step(params, state, tokens)
    losses.append(float(metrics.loss))
  return losses, params, state, step.lower(params, state, tokens).compile().as_text()


def test_fsdp_run_equals_single_device_and_reduces_each_layer_in_the_loop():
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  want_losses, want_params, want_state, _ = run()
  losses, params, state, hlo = run(mesh)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves((want_params, want_state))):
    if a.dtype == jnp.int8:
      assert (np.asarray(a) != np.asarray(b)).mean() < 0.01
    else:
      # Float32 sums in another order, except where an INT8 code of m came out the other
      # way (allowed above): its parameter then moved by lr times a level step of m.
      a, b = np.asarray(a), np.asarray(b)
      close = np.isclose(a, b, rtol=2e-3, atol=1e-5)
      assert close.mean() > 0.99 and np.abs(a - b).max() <= 1e-3, np.abs(a - b).max()
  # The stacked parameters stay sharded; the gradient of each layer is reduced across
  # devices inside the backward loop's body.
  kernel = params["layers"]["mlp"]["up_proj"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp")
  computations = dict(re.findall(r"\n(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S))
  bodies = [computations[name] for name in re.findall(r"body=%?([\w.\-]+)", hlo)]
  reduced = lambda text: "all-reduce" in text or "reduce-scatter" in text
  assert any(reduced(body) and "dynamic-update-slice" in body for body in bodies), len(bodies)
