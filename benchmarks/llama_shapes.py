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

__all__ = ["CONFIGS", "LlamaConfig", "param_shapes"]


def param_shapes(name: str) -> nnx.State:
  """Parameter shapes (float32) of config ``name``."""
  model = nnx.eval_shape(lambda: Llama(CONFIGS[name], nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)
