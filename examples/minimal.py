"""Q-Adam-mini in 60 lines: a byte-level Flax NNX transformer on Python's docs, offline."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pydoc_data.topics  # the text of help(), shipped with every CPython
from flax import nnx

import qadam_mini_jax as qam

TEXT = np.frombuffer("".join(pydoc_data.topics.topics.values()).encode(), np.uint8)
STEPS, BATCH, SEQ, DIM, HEADS = 300, 16, 64, 64, 4


class Model(nnx.Module):
  """Embedding, one pre-norm attention + MLP block, output layer (names as Adam-mini expects)."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed, self.position = nnx.Embed(256, DIM, rngs=rngs), nnx.Embed(SEQ, DIM, rngs=rngs)
    self.attn_norm, self.mlp_norm = nnx.RMSNorm(DIM, rngs=rngs), nnx.RMSNorm(DIM, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, DIM, decode=False, rngs=rngs)
    self.mlp = nnx.Sequential(nnx.Linear(DIM, 4 * DIM, rngs=rngs), nnx.gelu,
                              nnx.Linear(4 * DIM, DIM, rngs=rngs))
    self.lm_head = nnx.Linear(DIM, 256, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens) + self.position(jnp.arange(tokens.shape[1]))
    h = h + self.attn(self.attn_norm(h), mask=nnx.make_causal_mask(tokens))
    return self.lm_head(h + self.mlp(self.mlp_norm(h)))


model = Model(nnx.Rngs(0))
schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, STEPS // 10, STEPS)
tx = optax.chain(optax.clip_by_global_norm(1.0),
                 qam.q_adam_mini(schedule, b2=0.95, weight_decay=0.1, key=0))
optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, batch):
  def loss_fn(model):
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


rng = np.random.default_rng(0)
for step in range(1, STEPS + 1):
  starts = rng.integers(0, len(TEXT) - SEQ - 1, BATCH)
  loss = train_step(model, optimizer, jnp.asarray(np.stack([TEXT[s:s + SEQ + 1] for s in starts])))
  if step == 1 or step % 50 == 0:
    print(f"step {step}: loss {loss:.3f} nats/byte")

params = nnx.state(model, nnx.Param)
n = sum(x.size for x in jax.tree.leaves(params))
for name, t in (("q_adam_mini", tx), ("optax.adamw", optax.adamw(schedule))):
  nbytes = qam.tree_nbytes(jax.eval_shape(t.init, params))
  print(f"{name}: optimizer state {nbytes:,} bytes ({nbytes / n:.2f} B/param, {n:,} params)")
