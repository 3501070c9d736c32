"""A LLaMA decoder in Flax NNX: RMSNorm, rotary embeddings, SwiGLU, GQA, untied head.

Parameter names (``embed/embedding``, ``layers/i/attn/{q,k,v,o}_proj/kernel``,
``layers/i/mlp/{gate,up,down}_proj/kernel``, ``*_norm/scale``,
``lm_head/kernel``) are those the default Adam-mini partition recognises.
Sizes follow the GaLore / Q-GaLore LLaMA configs. Linear and embedding layers
are ``qadam_mini_jax.nnx_layers``'s, so the same model runs with INT8 weights
(``qadam_mini_jax.weights.quantize_params`` of its parameters).

With ``scan_layers`` the blocks are stacked on a leading layer axis and run by
``nnx.scan`` (``layers/attn/q_proj/kernel`` is ``(num_layers, dim, dim)``):
one block is traced and compiled instead of ``num_layers``. The stack holds
the same initial weights as the unscanned model of the same seed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from qadam_mini_jax import nnx_layers


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab: int
  dim: int
  ffn_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None  # default dim // num_heads
  max_len: int = 256
  rope_theta: float = 10000.0
  scan_layers: bool = False  # blocks stacked on axis 0 and run by nnx.scan
  remat: bool = False  # each block's call under nnx.remat (activations recomputed in backward)
  attention_chunk: int | None = None  # queries per attention chunk (causal_attention); None: all

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}.")
    if self.attention_chunk is not None and self.attention_chunk < 1:
      raise ValueError(f"attention_chunk={self.attention_chunk} must be a positive number "
                       "of queries (or None).")
    if self.head_dim is None and self.dim % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} does not divide dim={self.dim}; "
                       "set head_dim explicitly.")

  @property
  def head_size(self) -> int:
    return self.head_dim or self.dim // self.num_heads


CONFIGS = {
    "tiny": LlamaConfig(vocab=256, dim=128, ffn_dim=352, num_layers=2, num_heads=4, num_kv_heads=2),
    "20M": LlamaConfig(vocab=32000, dim=256, ffn_dim=688, num_layers=4, num_heads=4, num_kv_heads=4),
    "60M": LlamaConfig(vocab=32000, dim=512, ffn_dim=1376, num_layers=8, num_heads=8, num_kv_heads=8),
    "130M": LlamaConfig(vocab=32000, dim=768, ffn_dim=2048, num_layers=12, num_heads=12, num_kv_heads=12),
    "350M": LlamaConfig(vocab=32000, dim=1024, ffn_dim=2736, num_layers=24, num_heads=16, num_kv_heads=16),
    "1B": LlamaConfig(vocab=32000, dim=2048, ffn_dim=5461, num_layers=24, num_heads=32, num_kv_heads=32),
    "7B": LlamaConfig(vocab=32000, dim=4096, ffn_dim=11008, num_layers=32, num_heads=32, num_kv_heads=32),
    "13B": LlamaConfig(vocab=32000, dim=5120, ffn_dim=13824, num_layers=40, num_heads=40, num_kv_heads=40),
}


def rope(x: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding on (batch, seq, heads, head_dim)."""
  half = x.shape[-1] // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * freqs
  cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     chunk: int | None = None) -> jax.Array:
  """Causal ``jax.nn.dot_product_attention`` of q (batch, seq, heads, head_dim)
  over k and v (batch, seq, kv_heads, head_dim).

  With ``chunk``, ``chunk`` queries at a time (Rabe and Staats 2021,
  arXiv:2112.05682, over queries only), each chunk under ``jax.checkpoint``:
  the float32 scores and probabilities alive at once are (batch, heads,
  chunk, seq) instead of (batch, heads, seq, seq), forward and backward (the
  backward recomputes a chunk's). XLA:CPU materialises them (512 MiB each at
  7B, seq 2048); fused attention kernels (cuDNN's on GPU) do not. Same values
  up to float rounding; the same arithmetic, the masked scores included.
  """
  b, s, h, d = q.shape
  if chunk is None or chunk >= s:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)  # GQA-aware
  if s % chunk:
    raise ValueError(f"attention_chunk={chunk} must divide the sequence length {s}.")

  def one(args):
    queries, first = args
    mask = (first + jnp.arange(chunk))[:, None] >= jnp.arange(s)[None, :]
    return jax.nn.dot_product_attention(queries, k, v, mask=mask[None, None])
  chunks = jnp.moveaxis(q.reshape(b, s // chunk, chunk, h, d), 1, 0)
  out = jax.lax.map(jax.checkpoint(one), (chunks, jnp.arange(0, s, chunk)))
  return jnp.moveaxis(out, 0, 1).reshape(b, s, h, d)


def _linear(i: int, o: int, rngs: nnx.Rngs, dtype) -> nnx_layers.Linear:
  return nnx_layers.Linear(i, o, use_bias=False, dtype=dtype, rngs=rngs,
                    kernel_init=nnx.initializers.normal(0.02))


class Attention(nnx.Module):
  def __init__(self, c: LlamaConfig, rngs: nnx.Rngs, dtype=None):
    self.c = c
    hd = c.head_size
    self.q_proj = _linear(c.dim, c.num_heads * hd, rngs, dtype)
    self.k_proj = _linear(c.dim, c.num_kv_heads * hd, rngs, dtype)
    self.v_proj = _linear(c.dim, c.num_kv_heads * hd, rngs, dtype)
    self.o_proj = _linear(c.num_heads * hd, c.dim, rngs, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    c, (b, s, _) = self.c, x.shape
    q = rope(self.q_proj(x).reshape(b, s, c.num_heads, c.head_size), c.rope_theta)
    k = rope(self.k_proj(x).reshape(b, s, c.num_kv_heads, c.head_size), c.rope_theta)
    v = self.v_proj(x).reshape(b, s, c.num_kv_heads, c.head_size)
    out = causal_attention(q, k, v, c.attention_chunk)
    return self.o_proj(out.reshape(b, s, c.num_heads * c.head_size))


class Mlp(nnx.Module):
  def __init__(self, c: LlamaConfig, rngs: nnx.Rngs, dtype=None):
    self.gate_proj = _linear(c.dim, c.ffn_dim, rngs, dtype)
    self.up_proj = _linear(c.dim, c.ffn_dim, rngs, dtype)
    self.down_proj = _linear(c.ffn_dim, c.dim, rngs, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  def __init__(self, c: LlamaConfig, rngs: nnx.Rngs, dtype=None):
    self.attn_norm = nnx.RMSNorm(c.dim, dtype=dtype, rngs=rngs)
    self.attn = Attention(c, rngs, dtype)
    self.mlp_norm = nnx.RMSNorm(c.dim, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(c, rngs, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


def stack(blocks: list[Block]) -> Block:
  """One ``Block`` whose every array stacks those of ``blocks`` on a new axis 0."""
  graphdef = nnx.graphdef(blocks[0])
  return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *map(nnx.state, blocks)))


class Llama(nnx.Module):
  """Decoder-only LLaMA; ``dtype`` is the compute dtype (params stay float32)."""

  def __init__(self, c: LlamaConfig, rngs: nnx.Rngs, dtype=None):
    self.config = c
    self.embed = nnx_layers.Embed(c.vocab, c.dim, dtype=dtype, rngs=rngs,
                           embedding_init=nnx.initializers.normal(0.02))
    blocks = [Block(c, rngs, dtype) for _ in range(c.num_layers)]
    self.layers = stack(blocks) if c.scan_layers else nnx.List(blocks)
    self.norm = nnx.RMSNorm(c.dim, dtype=dtype, rngs=rngs)
    self.lm_head = _linear(c.dim, c.vocab, rngs, dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens)
    apply = lambda x, block: block(x)
    if self.config.remat:
      apply = nnx.remat(apply)
    if self.config.scan_layers:
      x = nnx.scan(apply, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.layers)
    else:
      for layer in self.layers:
        x = apply(x, layer)
    return self.lm_head(self.norm(x)).astype(jnp.float32)


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean cross-entropy of predicting ``tokens[:, 1:]``."""
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def pieces(model: Llama):
  """``(embed, block, head)``: the scanned ``model`` (or ``nnx.eval_shape`` of
  it) cut into pure functions over its parameter dict
  (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``), for
  :func:`qadam_mini_jax.in_backward.train_step`; ``head`` returns the
  next-token loss of the batch of tokens."""
  if not model.config.scan_layers:
    raise ValueError("pieces needs a model built with scan_layers=True (stacked blocks).")

  graphdefs = {name: nnx.graphdef(getattr(model, name))
               for name in ("embed", "layers", "norm", "lm_head")}
  module = lambda name, params: nnx.merge(graphdefs[name], params)

  def embed(rest, tokens):
    return module("embed", rest["embed"])(tokens)

  def block(layer, x):
    return module("layers", layer)(x)

  def head(rest, x, tokens):
    logits = module("lm_head", rest["lm_head"])(module("norm", rest["norm"])(x))
    return next_token_loss(logits.astype(jnp.float32), tokens)

  return embed, block, head
