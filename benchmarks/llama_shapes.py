"""Unallocated parameter trees of the example LLaMA configs, for memory figures.

``param_shapes(name)`` builds ``examples/llama_model.Llama`` under
``nnx.eval_shape``: a pytree of ``jax.ShapeDtypeStruct`` with the real Flax NNX
names and layouts, and no device memory used.
"""

from __future__ import annotations

import pathlib
import sys

from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from llama_model import CONFIGS, Llama, LlamaConfig  # noqa: E402

__all__ = ["CONFIGS", "LlamaConfig", "galore_rank", "param_shapes"]

#: Q-GaLore's ranks by model width (its pretraining scripts: 60M, 130M, 1B, 7B).
GALORE_RANKS = {512: 128, 768: 256, 2048: 1024, 4096: 1024}


def galore_rank(config: LlamaConfig) -> int:
  """Q-GaLore's rank for this width, else a quarter of the width (13B: 1280)."""
  return GALORE_RANKS.get(config.dim, config.dim // 4)


def param_shapes(name: str) -> nnx.State:
  """Parameter shapes (float32) of config ``name``."""
  model = nnx.eval_shape(lambda: Llama(CONFIGS[name], nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)
