"""Adam-mini and Q-Adam-mini (INT8 momentum) as composable Optax transforms.

References:
  Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More",
  arXiv:2406.16793, 2024.
  Han, Yang, Chen, Wang, Sun, "Q-Adam-mini", ICML 2025 ES-FoMo workshop.
  Zhang et al., "Q-GaLore" (INT8 weights with stochastic rounding; lazy
  layer-adaptive projections), arXiv:2407.08296, 2024.
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection", arXiv:2403.03507, 2024.
  Modoranu et al., "MicroAdam: Accurate Adaptive Optimization with Low Space
  Overhead and Provable Convergence", NeurIPS 2024.
"""

from qadam_mini_jax.alias import (FusedOptimizer, adam_mini, default_decay_mask, fused_q_adam_mini,
                                  fused_q_galore, galore, micro_adam, q_adam_mini,
                                  q_galore)
from qadam_mini_jax.sparse_adam import ScaleByMicroAdamState, scale_by_micro_adam
from qadam_mini_jax.low_rank import ScaleByGaLoreState, scale_by_galore
from qadam_mini_jax.partition import (BlockPartition, BlockSpec, PartitionError, block_specs,
                                      recorded_layers, updates_wait_for)
from qadam_mini_jax.quantize import QuantizedArray
from qadam_mini_jax.report import describe, tree_nbytes, tree_nbytes_per_device
from qadam_mini_jax.sharding import ShardingError, state_shardings, weight_shardings
from qadam_mini_jax.transform import Int8Quantization, ScaleByAdamMiniState, scale_by_adam_mini
from qadam_mini_jax import in_backward
from qadam_mini_jax import weights
from qadam_mini_jax.weights import QuantizedParam, quantize_params

__all__ = [
    "BlockPartition", "BlockSpec", "FusedOptimizer", "fused_q_adam_mini", "Int8Quantization", "PartitionError", "QuantizedArray", "QuantizedParam", "ShardingError",
    "ScaleByAdamMiniState", "adam_mini", "block_specs", "default_decay_mask", "describe",
    "q_adam_mini", "quantize_params", "recorded_layers", "scale_by_adam_mini", "state_shardings", "tree_nbytes", "weight_shardings",
    "tree_nbytes_per_device", "in_backward", "weights", "galore", "q_galore", "fused_q_galore", "scale_by_galore",
    "ScaleByGaLoreState", "micro_adam", "scale_by_micro_adam", "ScaleByMicroAdamState",
    "updates_wait_for",
]

__version__ = "0.1.0"
