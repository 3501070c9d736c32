"""Tiny LLaMA-like Flax models (NNX and linen) and tree and jaxpr helpers shared by the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from llama_model import Llama, LlamaConfig, next_token_loss  # noqa: F401 (re-exported)

VOCAB, DIM, HEADS, KV_HEADS, HEAD_DIM, FFN = 32, 16, 4, 2, 4, 24


TINY = LlamaConfig(vocab=VOCAB, dim=DIM, ffn_dim=FFN, num_layers=1, num_heads=HEADS,
                   num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)


def NnxLlama(rngs: nnx.Rngs) -> Llama:  # noqa: N802 (reads like a class)
  """The example LLaMA (GQA, untied head) at a tiny size."""
  return Llama(TINY, rngs)


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


def nest(flat: dict) -> dict:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}}: parameter trees from path tables."""
  out = {}
  for path, value in flat.items():
    node = out
    *parents, last = path.split("/")
    for parent in parents:
      node = node.setdefault(parent, {})
    node[last] = value
  return out


def tokens(key, batch=2, seq=8):
  return jax.random.randint(key, (batch, seq), 0, VOCAB)




def computed_from(jaxpr, eqn) -> set:
  """Every variable of ``jaxpr`` that ``eqn``'s inputs are computed from."""
  producers = {v: e for e in jaxpr.eqns for v in e.outvars}
  needed, pending = set(), [v for v in eqn.invars if isinstance(v, jax.extend.core.Var)]
  while pending:
    v = pending.pop()
    if v not in needed:
      needed.add(v)
      pending += [u for u in getattr(producers.get(v), "invars", ())
                  if isinstance(u, jax.extend.core.Var)]
  return needed
