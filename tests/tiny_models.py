"""Tiny LLaMA-like Flax models (NNX and linen) for partition and integration tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

VOCAB, DIM, HEADS, KV_HEADS, HEAD_DIM, FFN = 32, 16, 4, 2, 4, 24


class NnxBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    lin = lambda i, o, **kw: nnx.Linear(i, o, use_bias=False, rngs=rngs, **kw)
    self.attn_norm = nnx.RMSNorm(DIM, rngs=rngs)
    self.q_proj = lin(DIM, HEADS * HEAD_DIM)
    self.k_proj = lin(DIM, KV_HEADS * HEAD_DIM)
    self.v_proj = lin(DIM, KV_HEADS * HEAD_DIM)
    self.o_proj = lin(HEADS * HEAD_DIM, DIM)
    self.mlp_norm = nnx.RMSNorm(DIM, rngs=rngs)
    self.gate_proj = lin(DIM, FFN)
    self.up_proj = nnx.Linear(DIM, FFN, rngs=rngs)  # with a bias
    self.down_proj = lin(FFN, DIM)

  def __call__(self, x):
    b, s, _ = x.shape
    h = self.attn_norm(x)
    q = self.q_proj(h).reshape(b, s, HEADS, HEAD_DIM)
    k = jnp.repeat(self.k_proj(h).reshape(b, s, KV_HEADS, HEAD_DIM), HEADS // KV_HEADS, axis=2)
    v = jnp.repeat(self.v_proj(h).reshape(b, s, KV_HEADS, HEAD_DIM), HEADS // KV_HEADS, axis=2)
    a = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, s, -1)
    x = x + self.o_proj(a)
    h = self.mlp_norm(x)
    return x + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))


class NnxLlama(nnx.Module):
  """Embedding, one GQA block, final norm, untied lm_head: Flax NNX layout."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.layers = nnx.List([NnxBlock(rngs)])
    self.norm = nnx.RMSNorm(DIM, rngs=rngs)
    self.lm_head = nnx.Linear(DIM, VOCAB, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x)
    return self.lm_head(self.norm(x))


class LinenLm(nn.Module):
  """linen layout: Embed, MultiHeadDotProductAttention (3-D DenseGeneral), Dense."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, DIM, name="embed")(tokens)
    h = nn.RMSNorm(name="attn_norm")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=DIM, name="attn")(
        h, h, mask=nn.make_causal_mask(tokens))
    h = nn.RMSNorm(name="mlp_norm")(x)
    x = x + nn.Dense(DIM, name="down_proj")(nn.silu(nn.Dense(FFN, name="up_proj")(h)))
    return nn.Dense(VOCAB, use_bias=False, name="lm_head")(nn.RMSNorm(name="norm")(x))


def tokens(key, batch=2, seq=8):
  return jax.random.randint(key, (batch, seq), 0, VOCAB)


def next_token_loss(logits, toks):
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1))
