"""LLaMA parameter shapes (GaLore / Q-GaLore configs) in Flax layout, unallocated.

``param_shapes(name)`` returns a pytree of ``jax.ShapeDtypeStruct`` named like a
Flax NNX LLaMA (``(in, out)`` kernels, ``(vocab, dim)`` embedding, untied
``lm_head``), for ``jax.eval_shape`` of optimizer states.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LlamaShape:
  dim: int
  ffn_dim: int
  num_heads: int
  num_kv_heads: int
  num_layers: int
  vocab: int = 32000

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads


CONFIGS = {
    "60M": LlamaShape(dim=512, ffn_dim=1376, num_heads=8, num_kv_heads=8, num_layers=8),
    "130M": LlamaShape(dim=768, ffn_dim=2048, num_heads=12, num_kv_heads=12, num_layers=12),
    "350M": LlamaShape(dim=1024, ffn_dim=2736, num_heads=16, num_kv_heads=16, num_layers=24),
    "1B": LlamaShape(dim=2048, ffn_dim=5461, num_heads=32, num_kv_heads=32, num_layers=24),
    "7B": LlamaShape(dim=4096, ffn_dim=11008, num_heads=32, num_kv_heads=32, num_layers=32),
}


def param_shapes(name: str, dtype=jnp.float32) -> dict:
  """Unallocated parameter tree of config ``name``."""
  c = CONFIGS[name]
  s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  kv = c.num_kv_heads * c.head_dim
  layer = {
      "attn": {"q_proj": {"kernel": s(c.dim, c.dim)}, "k_proj": {"kernel": s(c.dim, kv)},
               "v_proj": {"kernel": s(c.dim, kv)}, "o_proj": {"kernel": s(c.dim, c.dim)}},
      "mlp": {"gate_proj": {"kernel": s(c.dim, c.ffn_dim)},
              "up_proj": {"kernel": s(c.dim, c.ffn_dim)},
              "down_proj": {"kernel": s(c.ffn_dim, c.dim)}},
      "attn_norm": {"scale": s(c.dim)}, "mlp_norm": {"scale": s(c.dim)},
  }
  return {"embed": {"embedding": s(c.vocab, c.dim)},
          "layers": {str(i): layer for i in range(c.num_layers)},
          "norm": {"scale": s(c.dim)}, "lm_head": {"kernel": s(c.dim, c.vocab)}}
