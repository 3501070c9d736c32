"""Mutation benchmark: do the tests catch small, plausible bugs in the library?

    python benchmarks/mutants.py                                  # every mutant
    python benchmarks/mutants.py --only per_tensor_scale b1_swapped_in_m_update
    python benchmarks/mutants.py --list                           # the mutants; nothing run
    python benchmarks/mutants.py --check                          # snippets and test ids only

Each entry of :data:`MUTANTS` is one bug of a few lines that a user would
notice (a dropped bias correction, a swapped ``b1``/``1-b1``, nearest rounding
where stochastic is due, a reused rounding stream, decay on norms, ...): an
exact snippet ``old`` of one library file, which must occur there exactly once,
and its replacement ``new``. For each selected mutant the script copies
``qadam_mini_jax/``, ``tests/``, ``examples/``, ``benchmarks/`` and ``pyproject.toml`` (of the
working tree) into a fresh temporary directory, applies the edit and runs the
mutant's ``tests`` (pytest node ids or files: only those about that behaviour,
as each test file costs 10-120 s of compiles) there, with the copy first on
``PYTHONPATH`` (checked: the copy is the ``qadam_mini_jax`` imported), and
reads which tests failed from pytest's JUnit XML. A mutant is caught when at
least one test fails or errors, and caught by its intended test when one of
those has a ``catches`` entry in its node id. First the unmutated copy runs
every selected test once: any failure there aborts, so that a flaky or
already-failing test never counts as a catch. The runs share one JAX
persistent compilation cache (in the run's temporary directory, gone at the
end; ``--no-compilation-cache`` turns it off): a program that a mutant does
not change is compiled once, in the baseline; one it changes has another key.

Prints a line per mutant as it finishes and writes the table (rewritten after
each mutant, so a run cut short keeps what it finished) to ``--out``, by
default ``benchmarks/results/mutants.md``. Exits 0 only when every mutant was
caught by its intended test (1 when one survived, was caught only by other
tests, timed out or broke pytest; 2 when ``--check`` or the baseline fails).
Target: no survivor, and no mutant caught only by an assertion that tests
something else.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import pathlib
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import NamedTuple

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import results_file  # noqa: E402  (benchmarks/, beside this script)

ROOT = pathlib.Path(__file__).resolve().parents[1]
# benchmarks/: some tests import its modules (kernel_compile, fits).
COPIED = ("qadam_mini_jax", "tests", "examples", "benchmarks", "pyproject.toml")
DEFAULT_OUT = results_file.RESULTS / "mutants.md"
TIMEOUT_S = 900  # per mutant; the baseline gets this per test file it runs


class Mutant(NamedTuple):
  """One small bug: ``old`` (exactly once in ``file``) replaced by ``new``.

  Attributes:
    name: short identifier (``--only``).
    file: path of the library file, relative to the repository root.
    old: exact source snippet, occurring exactly once in ``file``.
    new: its replacement.
    tests: pytest node ids or test files to run (relative to the root).
    catches: substrings of the node ids of the tests meant to catch it.
    why: what a user would see.
  """

  name: str
  file: str
  old: str
  new: str
  tests: tuple[str, ...]
  catches: tuple[str, ...]
  why: str


ALIAS = "tests/test_alias.py"
REFERENCE = f"{ALIAS}::test_adam_mini_matches_numpy_reference_leaf_by_leaf"
EVERY_HYPERPARAMETER = (f"{ALIAS}::test_q_adam_mini_without_quantization_is_adam_mini_with_"
                        "every_hyperparameter")
INT8_BOUND = f"{ALIAS}::test_q_adam_mini_int8_stays_within_derived_bound_of_adam_mini"
MASK_ARGUMENT = f"{ALIAS}::test_mask_argument_chooses_the_decayed_leaves"
INT8_WEIGHTS_MASK = f"{ALIAS}::test_int8_weights_decay_only_where_the_mask_says"
KERNEL = "tests/test_pallas_update.py"
KERNEL_STEPS = f"{KERNEL}::test_kernel_matches_jnp_path_step_by_step"
KERNEL_INJECTED = f"{KERNEL}::test_injected_hyperparameters_reach_the_kernel_without_recompiling"
FUSED_VS_CHAIN = f"{KERNEL}::test_fused_step_matches_chain_and_apply_updates"
TRANSFORM = "tests/test_transform.py"
SR_FLOOR_OR_CEIL = f"{TRANSFORM}::test_stochastic_rounding_codes_are_floor_or_ceil"
SR_STREAMS = f"{TRANSFORM}::test_stochastic_rounding_streams_differ_by_key_step_and_leaf"
EPS_PLACEMENT = f"{TRANSFORM}::test_eps_sits_outside_the_square_root_after_bias_correction"
SEED_BITS = (f"{TRANSFORM}::test_stochastic_rounding_seeds_use_all_their_bits",
             "tests/test_random_bits.py::test_key_words_keep_every_bit_of_the_seed")
PARTITION = "tests/test_partition.py"
RANDOM_BITS = "tests/test_random_bits.py"
WEIGHTS = "tests/test_weights.py"
IN_BACKWARD = "tests/test_in_backward.py"
SAME_TRAINING = f"{IN_BACKWARD}::test_same_training_as_the_ordinary_step"
SAME_CODES = f"{IN_BACKWARD}::test_same_codes_where_the_gradients_are_the_same"
GALORE_REFERENCE = "tests/test_low_rank.py::test_galore_equals_a_numpy_galore_from_the_equations"
PROJECTION = "tests/test_projection.py"


MUTANTS: tuple[Mutant, ...] = (
    # --- The Adam-mini arithmetic (transform.py, leaf_update.py) -----------------
    Mutant(
        "v_bias_correction_dropped", "qadam_mini_jax/transform.py",
        "sqrt_bias_correction2=jnp.sqrt(1.0 - b2**t),",
        "sqrt_bias_correction2=jnp.ones([], jnp.float32),",
        (REFERENCE,), ("test_adam_mini_matches_numpy_reference",),
        "v is not bias-corrected: early steps are up to 1/sqrt(1-b2) (4.5x at b2=0.95) too small"),
    Mutant(
        "m_bias_correction_dropped", "qadam_mini_jax/transform.py",
        "bias_correction1=1.0 - b1**t,",
        "bias_correction1=jnp.ones([], jnp.float32),",
        (REFERENCE,), ("test_adam_mini_matches_numpy_reference",),
        "m is not bias-corrected: the first step is (1-b1) = 10x too small"),
    Mutant(
        "b1_swapped_in_m_update", "qadam_mini_jax/leaf_update.py",
        "m = s.b1 * plan.moment.load(mu) + (1.0 - s.b1) * g.astype(jnp.float32)",
        "m = (1.0 - s.b1) * plan.moment.load(mu) + s.b1 * g.astype(jnp.float32)",
        (REFERENCE,), ("test_adam_mini_matches_numpy_reference",),
        "m <- (1-b1)*m + b1*g: the momentum forgets in about one step"),
    Mutant(
        "eps_inside_sqrt", "qadam_mini_jax/leaf_update.py",
        "(jnp.sqrt(v) / s.sqrt_bias_correction2 + s.eps)",
        "(jnp.sqrt(v + s.eps) / s.sqrt_bias_correction2)",
        (EPS_PLACEMENT, EVERY_HYPERPARAMETER), ("test_eps_sits_outside", "every_hyperparameter"),
        "eps inside the square root (sqrt(v + eps)): blocks with sqrt(v) near eps or below are "
        "damped far less"),
    Mutant(
        "eps_before_v_bias_correction", "qadam_mini_jax/leaf_update.py",
        "(jnp.sqrt(v) / s.sqrt_bias_correction2 + s.eps)",
        "((jnp.sqrt(v) + s.eps) / s.sqrt_bias_correction2)",
        (EPS_PLACEMENT, EVERY_HYPERPARAMETER), ("test_eps_sits_outside", "every_hyperparameter"),
        "eps added before the bias correction: eps is 1/sqrt(1-b2^t) larger in early steps"),
    Mutant(
        "step_count_off_by_one", "qadam_mini_jax/transform.py",
        "t = count.astype(jnp.float32)",
        "t = count.astype(jnp.float32) + 1.0",
        (REFERENCE,), ("test_adam_mini_matches_numpy_reference",),
        "bias corrections of step t+1 at step t: the first steps are too small"),
    Mutant(
        "count_not_advanced", "qadam_mini_jax/transform.py",
        "count=count, key=state.key, mu=unflatten(out_mu)",
        "count=state.count, key=state.key, mu=unflatten(out_mu)",
        (REFERENCE,), ("test_adam_mini_matches_numpy_reference",),
        "the state's count stays 0: every step is bias-corrected as step 1 and rounds with the "
        "same bits"),
    Mutant(
        "v_from_bf16_squares", "qadam_mini_jax/leaf_update.py",
        "partition_lib.block_mean(g32 * g32, spec)",
        "partition_lib.block_mean(g * g, spec).astype(jnp.float32)",
        (f"{TRANSFORM}::test_bf16_params",
         f"{TRANSFORM}::test_float16_params_with_gradients_whose_squares_underflow_float16"),
        ("test_bf16_params", "squares_underflow"),
        "v from squares in the gradient's dtype: bf16 rounds them to 8 bits, float16 flushes "
        "|g| < 2.4e-4 to v = 0 (u = g/eps)"),
    # --- The fused Pallas kernel (pallas_update.py, and its call in leaf_update.py) ---
    Mutant(
        "kernel_constant_b1", "qadam_mini_jax/pallas_update.py",
        "b1, one_minus_b1 = hyper_ref[0], hyper_ref[1]",
        "b1, one_minus_b1 = np.float32(0.9), np.float32(0.1)",
        (KERNEL_STEPS, KERNEL_INJECTED),
        ("test_kernel_matches_jnp_path_step_by_step",
         "test_injected_hyperparameters_reach_the_kernel"),
        "implementation='pallas' ignores b1 (0.9 whatever is passed or injected)"),
    Mutant(
        "kernel_constant_lr", "qadam_mini_jax/pallas_update.py",
        "neg_lr, wd = hyper_ref[2], hyper_ref[3]",
        "neg_lr, wd = np.float32(-1e-3), hyper_ref[3]",
        (FUSED_VS_CHAIN,), ("test_fused_step_matches_chain_and_apply_updates",),
        "the fused kernel step ignores the learning rate and its schedule (1e-3 always)"),
    Mutant(
        "kernel_ignores_weight_decay", "qadam_mini_jax/pallas_update.py",
        "u = p + neg_lr * (u + wd * p)",
        "u = p + neg_lr * u",
        (FUSED_VS_CHAIN,), ("test_fused_step_matches_chain_and_apply_updates",),
        "the fused kernel step never decays INT8-m leaves"),
    Mutant(
        "kernel_decays_masked_leaves", "qadam_mini_jax/leaf_update.py",
        "wd = (s.wd if plan.decay else zero) if fused else zero",
        "wd = s.wd if fused else zero",
        (MASK_ARGUMENT, INT8_WEIGHTS_MASK, FUSED_VS_CHAIN), ("mask",),
        "the fused kernel decays INT8-m leaves that the decay mask leaves alone"),
    Mutant(
        "kernel_rounds_to_nearest", "qadam_mini_jax/leaf_update.py",
        "kernel_args = dict(stochastic=streams is not None,",
        "kernel_args = dict(stochastic=False,",
        (KERNEL_STEPS,), ("test_kernel_matches_jnp_path_step_by_step",),
        "implementation='pallas' rounds m to nearest where stochastic rounding is due"),
    Mutant(
        "kernel_shard_stride_ignored", "qadam_mini_jax/pallas_update.py",
        "stride=b if stride is None else stride,",
        "stride=b,",
        (f"{KERNEL}::test_kernel_on_one_shard_uses_whole_leaf_indices",),
        ("test_kernel_on_one_shard_uses_whole_leaf_indices",),
        "sharded kernel: element indices from the shard's row length, so shards reuse each "
        "other's rounding bits"),
    # --- Which leaves round stochastically, and with which bits -------------------
    Mutant(
        "auto_rounds_every_leaf", "qadam_mini_jax/transform.py",
        'choice == "auto" and s.rule in (partition_lib.EMBEDDING, partition_lib.OUTPUT)',
        'choice == "auto" or s.rule in (partition_lib.EMBEDDING, partition_lib.OUTPUT)',
        (INT8_BOUND,), ("int8_stays_within_derived_bound",),
        "stochastic_rounding='auto' rounds every INT8 leaf stochastically ('none' the embedding "
        "and output)"),
    Mutant(
        "auto_rounds_no_leaf", "qadam_mini_jax/transform.py",
        "s.rule in (partition_lib.EMBEDDING, partition_lib.OUTPUT)",
        's.rule in ("embed", "lm_head")',
        (INT8_BOUND,), ("int8_stays_within_derived_bound",),
        "stochastic_rounding='auto' matches no rule name: embedding and output m round to "
        "nearest and stall"),
    Mutant(
        "nearest_rounding_in_leaf_update", "qadam_mini_jax/leaf_update.py",
        "mu = plan.moment.store(m, noise(random_bits.MOMENT) if plan.stochastic else None)",
        "mu = plan.moment.store(m, None)",
        (SR_FLOOR_OR_CEIL, SR_STREAMS), ("floor_or_ceil",),
        "m rounds to nearest everywhere (jnp path): rarely updated rows stall"),
    Mutant(
        "nearest_rounding_in_int8_storage", "qadam_mini_jax/storage.py",
        "return quantize_lib.quantize(value, self.layout, noise)",
        "return quantize_lib.quantize(value, self.layout)",
        (SR_FLOOR_OR_CEIL, SR_STREAMS), ("floor_or_ceil",),
        "the INT8 m storage drops its noise: round-to-nearest everywhere"),
    Mutant(
        "one_stream_for_every_leaf", "qadam_mini_jax/leaf_update.py",
        "random_bits.path_stream(plan.path)",
        "0",
        (SR_STREAMS,), ("streams_differ_by_key_step_and_leaf",),
        "every parameter rounds with the same random bits (the path stream is ignored)"),
    Mutant(
        "one_stream_for_every_step", "qadam_mini_jax/random_bits.py",
        "s = mix32(jnp.asarray(low, jnp.uint32) * GOLDEN + step)",
        "s = mix32(jnp.asarray(low, jnp.uint32) * GOLDEN)",
        (RANDOM_BITS,), ("test_streams_differ_by_key_step_and_leaf",),
        "the step count is not mixed into the stream: the same rounding bits at every step "
        "(rounding errors add up instead of averaging out)"),
    Mutant(
        "one_stream_for_every_layer", "qadam_mini_jax/leaf_update.py",
        "  if layer is None:\n    return seeds\n",
        "  if True:\n    return seeds\n",
        (f"{TRANSFORM}::test_stacked_layers_round_stochastically_with_a_stream_per_layer",),
        ("stream_per_layer",),
        "the layers of a scanned (stacked) leaf all round with the same bits"),
    Mutant(
        "uniform_in_half_range", "qadam_mini_jax/random_bits.py",
        "return (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)",
        "return (bits >> 9).astype(jnp.float32) * np.float32(2.0**-24)",
        (RANDOM_BITS,), ("test_uniform_is_uniform",),
        "rounding noise in [0, 0.5) instead of [0, 1): stochastic rounding is biased toward zero"),
    Mutant(
        "seed_high_bits_dropped", "qadam_mini_jax/random_bits.py",
        "np.uint32(key >> 32 & 0xFFFFFFFF)",
        "np.uint32(0)",
        SEED_BITS, ("seeds_use_all_their_bits", "key_words_keep_every_bit"),
        "int seeds >= 2^32 are truncated to 32 bits: seeds s and s + 2^32 round alike"),
    Mutant(
        "wide_key_words_dropped", "qadam_mini_jax/random_bits.py",
        "for i in range(words.shape[0]):",
        "for i in range(2):",
        SEED_BITS, ("seeds_use_all_their_bits", "key_words_keep_every_bit"),
        "PRNG keys wider than 2 words (e.g. 'rbg') keep only their first 2 words"),
    Mutant(
        "weight_stream_is_moment_stream", "qadam_mini_jax/leaf_update.py",
        "_stream(plan, s, random_bits.WEIGHTS, layer))",
        "_stream(plan, s, random_bits.MOMENT, layer))",
        (f"{WEIGHTS}::test_fused_step_requantizes_the_float_step",),
        ("test_fused_step_requantizes_the_float_step",),
        "INT8 weights round with m's bits: their rounding errors are correlated with m's"),
    Mutant(
        "purpose_words_equal", "qadam_mini_jax/random_bits.py",
        "_PURPOSE_WORDS = (np.uint32(0), np.uint32(0x5BD1E995),",
        "_PURPOSE_WORDS = (np.uint32(0), np.uint32(0),",
        (f"{WEIGHTS}::test_weight_stream_is_apart_from_the_moment_stream",),
        ("test_weight_stream_is_apart_from_the_moment_stream",),
        "the weights' and m's streams of a parameter are the same"),
    # --- Quantization (quantize.py) and INT8 weights (weights.py, leaf_update.py) ---
    Mutant(
        "per_tensor_scale", "qadam_mini_jax/quantize.py",
        "  scales = jnp.max(jnp.abs(g), axis=_group_axis(layout), keepdims=True)\n",
        "  scales = jnp.max(jnp.abs(g), axis=_group_axis(layout), keepdims=True)\n"
        "  scales = jnp.broadcast_to(jnp.max(scales), scales.shape)\n",
        ("tests/test_quantize.py",),
        ("test_column_groups_keep_small_columns_apart",
         "test_round_to_nearest_picks_the_nearest_level"),
        "one scale per tensor instead of per group: small columns (rare tokens) round to zero"),
    Mutant(
        "weight_scale_rounded_down", "qadam_mini_jax/quantize.py",
        "bits = jax.lax.bitcast_convert_type(scale, jnp.uint32) + np.uint32((1 << drop) - 1)",
        "bits = jax.lax.bitcast_convert_type(scale, jnp.uint32)",
        (f"{WEIGHTS}::test_quantize_params_converts_matrices_and_keeps_vectors_and_small_leaves",),
        ("test_quantize_params_converts",),
        "INT8 weight scales rounded down to the coarse grid: each group's largest weights clip"),
    Mutant(
        "weights_rounded_to_nearest", "qadam_mini_jax/leaf_update.py",
        "  return plan.weights.store(new, noise)",
        "  return plan.weights.store(new, None)",
        (f"{WEIGHTS}::test_stochastic_rounding_keeps_updates_below_half_a_step_and_nearest_stalls",
         f"{WEIGHTS}::test_fused_step_requantizes_the_float_step"),
        ("nearest_stalls", "test_fused_step_requantizes_the_float_step"),
        "INT8 weights round to nearest although stochastic: updates below half a step are lost"),
    Mutant(
        "decay_where_mask_false", "qadam_mini_jax/leaf_update.py",
        "u = (u + s.wd * value) if plan.decay else u",
        "u = u + s.wd * value",
        (MASK_ARGUMENT, INT8_WEIGHTS_MASK), ("mask",),
        "fused step (jnp path, INT8 weights too): weight decay where the decay mask says False"),
    # --- Weight-decay masks (alias.py) ------------------------------------------------
    Mutant(
        "decay_on_norms", "qadam_mini_jax/alias.py",
        'if names[-1].lower() == "bias" or any(_NORM.fullmatch(n) for n in names):',
        'if names[-1].lower() == "bias":',
        (f"{ALIAS}::test_default_decay_mask_by_name_where_rank_would_decay",
         f"{PARTITION}::test_default_decay_mask_by_rule_stacked_or_not"),
        ("test_default_decay_mask_by_name",),
        "norm scales of rank 2 (per-head QK-norms, stacked norms) are weight-decayed"),
    Mutant(
        "embeddings_false_ignored", "qadam_mini_jax/alias.py",
        "return embeddings or partition.rule_for(path, inner) != partition_lib.EMBEDDING",
        "return True",
        (f"{PARTITION}::test_default_decay_mask_by_rule_stacked_or_not",),
        ("test_default_decay_mask_by_rule_stacked_or_not",),
        "default_decay_mask(embeddings=False) still decays the embedding"),
    Mutant(
        "mask_argument_ignored", "qadam_mini_jax/alias.py",
        "return functools.partial(default_decay_mask, partition=partition) if mask is None "
        "else mask",
        "return functools.partial(default_decay_mask, partition=partition)",
        (MASK_ARGUMENT,), ("test_mask_argument_chooses_the_decayed_leaves",),
        "adam_mini/q_adam_mini(mask=...) decay by the default mask whatever the user passed"),
    Mutant(
        "fused_ignores_mask_argument", "qadam_mini_jax/alias.py",
        "  decays = _mask(mask, partition)\n",
        "  decays = _mask(None, partition)\n",
        (MASK_ARGUMENT, INT8_WEIGHTS_MASK), ("mask",),
        "fused_q_adam_mini(mask=...) decays by the default mask"),
    # --- The alias forwarding its arguments (alias.py) -------------------------------
    Mutant(
        "q_adam_mini_drops_eps", "qadam_mini_jax/alias.py",
        "  config = transform.AdamMiniConfig(\n      b1, b2, eps, partition=partition,",
        "  config = transform.AdamMiniConfig(\n      b1, b2, partition=partition,",
        (EVERY_HYPERPARAMETER,), ("every_hyperparameter",),
        "q_adam_mini(eps=...) runs with eps = 1e-8"),
    Mutant(
        "q_adam_mini_drops_b1", "qadam_mini_jax/alias.py",
        "  config = transform.AdamMiniConfig(\n      b1, b2, eps, partition=partition,",
        "  config = transform.AdamMiniConfig(\n      b2=b2, eps=eps, partition=partition,",
        (EVERY_HYPERPARAMETER,), ("every_hyperparameter",),
        "q_adam_mini(b1=...) runs with b1 = 0.9"),
    # --- The block partition (partition.py) ----------------------------------------------
    Mutant(
        "query_heads_strided", "qadam_mini_jax/partition.py",
        "  view = x.reshape(shape[:axis] + (heads, shape[axis] // heads) + shape[axis + 1:])\n"
        "  axes = tuple(a if a < axis else a + 1 for a in spec.axes) + (axis + 1,)\n",
        "  view = x.reshape(shape[:axis] + (shape[axis] // heads, heads) + shape[axis + 1:])\n"
        "  axes = tuple(a if a < axis else a + 1 for a in spec.axes) + (axis,)\n",
        (f"{PARTITION}::test_block_mean_and_broadcast_match_numpy",),
        ("test_block_mean_and_broadcast_match_numpy",),
        "a head's block of v averages every heads-th column (strided) instead of its own "
        "head_dim columns"),
    Mutant(
        "gqa_key_heads_from_query", "qadam_mini_jax/partition.py",
        "heads = {QUERY: self.num_heads, KEY: kv_heads,",
        "heads = {QUERY: self.num_heads, KEY: self.num_heads,",
        (f"{PARTITION}::test_nnx_llama_rules_and_block_shapes",),
        ("test_nnx_llama_rules_and_block_shapes",),
        "GQA: key kernels split into num_heads blocks instead of num_kv_heads"),
    Mutant(
        "layer_loop_reads_a_stale_layer", "qadam_mini_jax/partition.py",
        "return stacks, read(stacks, new, following)",
        "return stacks, current",
        ("tests/test_partition.py::test_layer_loop_writes_each_layer_over_its_stacked_input",
         f"{TRANSFORM}::test_stacked_layers_update_like_the_unstacked_model"),
        ("test_layer_loop_writes_each_layer", "test_stacked_layers_update_like_the_unstacked"),
        "a scanned model's stacked INT8 leaves: every layer is updated from the first layer's "
        "gradient and m"),
    Mutant(
        "layer_loop_reads_the_next_layer_early", "qadam_mini_jax/partition.py",
        "following = jnp.minimum(i + 1, count - 1) + _zero_after(written)",
        "following = jnp.minimum(i + 1, count - 1)",
        (f"{PARTITION}::test_layer_loop_copies_no_layer_of_its_loop_state",),
        ("test_layer_loop_copies_no_layer_of_its_loop_state",),
        "each stack's next layer is read as soon as that stack is written: XLA copies every "
        "layer of the loop state at every iteration (AdamW in the backward pass: 20 copies "
        "a layer)"),
    Mutant(
        "layer_loop_ignores_updates_wait_for", "qadam_mini_jax/partition.py",
        "first = _zero_after(wait_for) if wait_for else 0",
        "first = 0",
        (f"{PARTITION}::test_updates_wait_for_lets_a_metric_read_the_gradient_before_the_loop_"
         "writes_over_it",),
        ("test_updates_wait_for_lets_a_metric_read_the_gradient_before_the_loop_writes_over_it",),
        "the layer loops start without waiting for a metric of the gradient: XLA copies every "
        "stacked gradient the loops write over (q_adam_mini at 13B: 6 GiB more temporaries)"),
    Mutant(
        "layer_loop_ignores_after", "qadam_mini_jax/partition.py",
        "wait_for = [*after, *_WAIT_FOR.get()]",
        "wait_for = [*_WAIT_FOR.get()]",
        (f"{PARTITION}::test_layer_loop_reads_its_first_layer_after_the_arrays_it_is_given",),
        ("test_layer_loop_reads_its_first_layer_after_the_arrays_it_is_given",),
        "the loop's first layer is read at the step's start: in the backward pass the last "
        "layer's INT8 weights and state stay alive through the forward (7B: 0.39 GiB)"),
    Mutant(
        "materialized_left_to_fusion", "qadam_mini_jax/partition.py",
        "return run_after(jax.tree.leaves(tree), lambda t: t, tree)",
        "return tree",
        (f"{PARTITION}::test_materialized_returns_its_arrays_bit_for_bit_through_a_conditional",),
        ("test_materialized_returns_its_arrays_bit_for_bit",),
        "a layer's gradient is left to XLA's fusion: every update re-reads the matmul's "
        "transposed result (AdamW in the backward pass 1.20x the ordinary step at 130M)"),
    Mutant(
        "read_after_ignores_its_flag", "qadam_mini_jax/partition.py",
        "  if flag is None:\n    zero = _zero_after(list(arrays))",
        "  if True:\n    zero = _zero_after(list(arrays))",
        (f"{PARTITION}::test_read_after_makes_integer_arrays_depend_on_the_arrays_and_keeps_"
         "every_value",
         f"{IN_BACKWARD}::test_int8_m_is_written_over_its_codes_once_the_new_weights_exist"),
        ("test_read_after_makes_integer_arrays_depend_on_the_arrays_and_keeps_every_value[True]",
         "test_int8_m_is_written_over_its_codes_once_the_new_weights_exist"),
        "the zero is read from the new weights' element recomputed from the old codes, not "
        "from their buffer: INT8 m's old codes are copied again"),
    Mutant(
        "int8_m_written_before_the_new_weights", "qadam_mini_jax/leaf_update.py",
        "mu = partition_lib.read_after(mu, jax.tree.leaves(out), s.count > 0)",
        "pass",
        (f"{IN_BACKWARD}::test_int8_m_is_written_over_its_codes_once_the_new_weights_exist",),
        ("test_int8_m_is_written_over_its_codes_once_the_new_weights_exist",),
        "XLA copies the old INT8 m codes of every leaf updated whole with INT8 weights "
        "(the embedding and output layer: 2 x 125 MiB at 7B)"),
    Mutant(
        "head_reads_at_the_step_start", "qadam_mini_jax/in_backward.py",
        "head_rest, head_batch = partition_lib.read_after((rest, batch), [hidden])",
        "head_rest, head_batch = rest, batch",
        (f"{IN_BACKWARD}::test_the_head_and_the_embedding_gradient_wait_for_their_inputs",),
        ("test_the_head_and_the_embedding_gradient_wait_for_their_inputs",),
        "the INT8 output layer is dequantized at the step's start and kept through the "
        "forward pass (500 MiB of float32 at 7B)"),
    Mutant(
        "embedding_gradient_outside_a_conditional", "qadam_mini_jax/in_backward.py",
        "embed_grads = iter(partition_lib.run_after([d_hidden], read_grads, d_hidden))",
        "embed_grads = iter(read_grads(d_hidden))",
        (f"{IN_BACKWARD}::test_the_head_and_the_embedding_gradient_wait_for_their_inputs",),
        ("test_the_head_and_the_embedding_gradient_wait_for_their_inputs",),
        "the zeros of the embedding's gradient are made at the step's start and kept through "
        "both passes (500 MiB at 7B)"),
    Mutant(
        "attention_chunks_mask_the_diagonal", "examples/llama_model.py",
        "mask = (first + jnp.arange(chunk))[:, None] >= jnp.arange(s)[None, :]",
        "mask = (first + jnp.arange(chunk))[:, None] > jnp.arange(s)[None, :]",
        ("tests/test_example.py::test_attention_in_chunks_is_the_whole_causal_attention",),
        ("test_attention_in_chunks_is_the_whole_causal_attention",),
        "with --attention-chunk a token no longer attends to itself"),
    # --- Errors a user needs (storage.py, transform.py, leaf_update.py) -----------
    Mutant(
        "group_size_zero_accepted", "qadam_mini_jax/storage.py",
        'least = 1 if name == "group_size" else 0',
        "least = 0",
        ("tests/test_quantize.py::test_int8_quantization_refuses_bad_settings",),
        ("test_int8_quantization_refuses_bad_settings",),
        "Int8Quantization(group_size=0) is accepted and fails later inside a reshape"),
    Mutant(
        "rounding_string_unchecked", "qadam_mini_jax/transform.py",
        "if isinstance(rounding, str) and rounding.lower() not in ROUNDING_CHOICES:",
        "if False:",
        (f"{TRANSFORM}::test_bad_stochastic_rounding_arguments_are_refused",),
        ("test_bad_stochastic_rounding_arguments_are_refused",),
        "stochastic_rounding='sometimes' is accepted and rounds every leaf to nearest"),
    Mutant(
        "kernel_runs_sharded_stacked_layers", "qadam_mini_jax/leaf_update.py",
        "if plan.spec.layers and not (plan.sharding is None or plan.sharding.is_fully_replicated):",
        "if False:",
        ("tests/test_sharding.py::test_kernel_refuses_shardings_it_cannot_run_per_shard",),
        ("test_kernel_refuses_shardings_it_cannot_run_per_shard",),
        "the kernel runs on stacked layers sharded per shard, which it cannot do: an obscure "
        "error instead of one naming the parameter"),
    # --- Updates inside the backward pass (in_backward.py) ---------------------------
    Mutant(
        "in_backward_layers_in_forward_order", "qadam_mini_jax/in_backward.py",
        "(stack_axes, [axes[k] for k in stacked], None, None), (inputs,), ((0,),),\n"
        "        reverse=True)",
        "(stack_axes, [axes[k] for k in stacked], None, None), (inputs,), ((0,),),\n"
        "        reverse=False)",
        (SAME_TRAINING,), ("same_training",),
        "the backward pass walks the layers first to last: each layer's gradient comes from "
        "another layer's input and cotangent"),
    Mutant(
        "in_backward_drops_the_embedding_gradient", "qadam_mini_jax/in_backward.py",
        "      (embed_grads,) = embed_vjp(d_hidden)\n"
        "      rest_grads = jax.tree.map(jnp.add, rest_grads, embed_grads)\n",
        "      (embed_grads,) = embed_vjp(d_hidden)\n",
        (SAME_TRAINING,), ("same_training",),
        "the embedding is updated with the head's gradient only (zero): it never trains"),
    Mutant(
        "in_backward_keeps_the_old_layer_state", "qadam_mini_jax/in_backward.py",
        "    for k, s in zip(stacked, state_stacks):\n      leaves[k] = s\n",
        "",
        (SAME_TRAINING,), ("same_training",),
        "each layer's m and v are computed and then dropped: every step starts from the "
        "initial moments"),
    Mutant(
        "layer_update_rounds_with_layer_0s_stream", "qadam_mini_jax/transform.py",
        "new, mu, nu = leaf_update_lib.update_layer(plan, scalars, shape, g, mu, nu, p,\n"
        "                                                   layer.index)",
        "new, mu, nu = leaf_update_lib.update_layer(plan, scalars, shape, g, mu, nu, p,\n"
        "                                                   0 * layer.index)",
        (SAME_CODES, SAME_TRAINING), ("same_codes", "same_training"),
        "every layer of a stacked leaf draws layer 0's rounding noise inside the backward "
        "pass: codes differ from the ordinary step and the layers' errors correlate"),
    # --- GaLore and Q-GaLore (projection.py, int4.py, low_rank.py) ---------------------
    Mutant(
        "galore_refreshes_every_step", "qadam_mini_jax/projection.py",
        "count % layer.gap == 0,", "count >= 0,",
        (GALORE_REFERENCE,), ("numpy_galore",),
        "the SVD runs at every step: the inner Adam's moments live in a basis that changes "
        "under them, and the step costs an SVD per matrix"),
    Mutant(
        "galore_left_singular_vectors_on_the_columns", "qadam_mini_jax/projection.py",
        "vectors = u[:, :plan.rank] if plan.rows else vh[:plan.rank].T",
        "vectors = u[:, :plan.rank] if plan.rows else u[:vh.shape[1], :plan.rank]",
        (GALORE_REFERENCE,), ("numpy_galore",),
        "a matrix projected on its columns takes rows of U instead of V: R keeps a subspace "
        "that has nothing to do with the gradient"),
    Mutant(
        "galore_cosine_signed", "qadam_mini_jax/projection.py",
        "cos = jnp.abs(jnp.dot(state.first, first))", "cos = jnp.dot(state.first, first)",
        (f"{PROJECTION}::test_the_cosine_ignores_the_sign_and_the_queue_slides",),
        ("cosine_ignores_the_sign",),
        "a flipped singular vector reads as cosine -1 (Q-GaLore's code): a stable subspace "
        "keeps its short gap"),
    Mutant(
        "int4_zero_point_clamped", "qadam_mini_jax/int4.py",
        "lo, hi = jnp.minimum(g.min(-1), 0.0), jnp.maximum(g.max(-1), 0.0)",
        "lo, hi = g.min(-1), g.max(-1)",
        ("tests/test_int4.py",), ("round_trip_within_half_a_step",),
        "Q-GaLore's defect: a projector group whose values share one sign is clipped towards "
        "zero"),
    Mutant(
        "per_leaf_layer_rounds_with_layer_0s_stream", "qadam_mini_jax/leaf_update.py",
        "layer if first is None else first + layer", "layer",
        (f"{SAME_TRAINING}[fused_q_galore+int8_weights]",), ("same_training",),
        "q_galore inside the backward pass rounds every layer's m on layer 0's stream"),
    # --- 8-bit v, Q-GaLore's INT8 weights, the range finder (this release) ---------
    Mutant(
        "v_rounded_to_nearest", "qadam_mini_jax/leaf_update.py",
        "           if plan.second.quantized else None)", "           if False else None)",
        (f"{TRANSFORM}::test_8bit_v_decays_like_b2_power_in_mean",), ("b2_power",),
        "8-bit v rounds to nearest: it stops decaying once b2 * v rounds back to its level"),
    Mutant(
        "v_stream_is_moment_stream", "qadam_mini_jax/random_bits.py",
        "np.uint32(0x5BD1E995), np.uint32(0xC2B2AE35))", "np.uint32(0x5BD1E995), np.uint32(0))",
        (f"{RANDOM_BITS}::test_the_three_purposes_draw_apart",), ("three_purposes",),
        "8-bit v rounds with m's bits: their rounding errors are correlated"),
    Mutant(
        "log_code_ignores_its_noise", "qadam_mini_jax/quantize.py",
        "k = jnp.minimum(jnp.where(x - lo >= (1.0 - r) * (hi - lo), k + 1.0, k), 0.0)",
        "k = jnp.minimum(jnp.where(x - lo >= 0.5 * (hi - lo), k + 1.0, k), 0.0)",
        ("tests/test_quantize.py::test_log_code_stays_within_a_level_and_stochastic_rounding_is_unbiased",),
        ("unbiased",),
        "the logarithmic code rounds to nearest whatever its noise: v's stochastic rounding is lost"),
    Mutant(
        "log_code_one_level_off", "qadam_mini_jax/quantize.py",
        "  return (k + np.float32(QMAX)).astype(jnp.int8)",
        "  return (k + np.float32(QMAX - 1)).astype(jnp.int8)",
        ("tests/test_quantize.py::test_log_code_hand_computed",), ("hand_computed",),
        "every v decodes one level (9%) low: Adam's steps 4.4% too large"),
    Mutant(
        "fused_q_galore_weights_on_another_key", "qadam_mini_jax/alias.py",
        "key=pre_state.inner.key, neg_lr=neg_lr, wd=wd)",
        "key=jnp.zeros(2, jnp.uint32), neg_lr=neg_lr, wd=wd)",
        ("tests/test_low_rank.py::test_fused_q_galore_requantizes_the_chains_step",),
        ("requantizes_the_chains_step",),
        "fused_q_galore's INT8 weights round on a stream that ignores the optimizer's key"),
    Mutant(
        "range_finder_ignored", "qadam_mini_jax/projection.py",
        "  if plan.finder is not None:\n", "  if False:\n",
        ("tests/test_low_rank.py::test_a_range_finder_whose_sketch_spans_each_matrix_is_the_svd",),
        ("range_finder",),
        "range_finder= is accepted and the full SVD runs anyway"),
    Mutant(
        "window_ages_reversed", "qadam_mini_jax/sparse_window.py",
        "  age = (count - 1 - row) % rows\n", "  age = (row - (count - 1)) % rows\n",
        ("tests/test_micro_adam.py::test_matches_numpy_reference_across_the_ring_wrap_around",
         "tests/test_sparse_window.py::test_moments_weigh_rows_by_age_and_skip_unwritten_rows"),
        ("numpy_reference", "weigh_rows_by_age"),
        "MicroAdam weighs its oldest sparse gradient most: m and v follow stale gradients"),
    Mutant(
        "window_bias_correction_dropped", "qadam_mini_jax/sparse_window.py",
        "  return (m_sum * ((1.0 - b1) / (1.0 - jnp.power(b1, t))),",
        "  return (m_sum * (1.0 - b1),",
        ("tests/test_micro_adam.py::test_density_one_with_a_long_window_is_adam",),
        ("is_adam",),
        "MicroAdam's m_hat without bias correction: early steps 1/(1-b1^t) too small"),
    Mutant(
        "kept_entries_fed_back", "qadam_mini_jax/sparse_adam.py",
        "  error = feedback.store(a.at[flat].set(0.0))", "  error = feedback.store(a)",
        ("tests/test_micro_adam.py::test_matches_numpy_reference_across_the_ring_wrap_around",
         "tests/test_micro_adam.py::test_density_one_with_a_long_window_is_adam"),
        ("numpy_reference", "is_adam"),
        "the kept entries also stay in the error feedback: they are applied twice"),
    Mutant(
        "error_feedback_ignored", "qadam_mini_jax/sparse_adam.py",
        "  a = g.reshape(-1).astype(jnp.float32) + feedback.load(error, layout.size)",
        "  a = g.reshape(-1).astype(jnp.float32)",
        ("tests/test_micro_adam.py::test_matches_numpy_reference_across_the_ring_wrap_around",),
        ("numpy_reference",),
        "what top-k drops is lost for good: coordinates outside the top 1% never move"),
    Mutant(
        "tail_block_keeps_a_full_blocks_k", "qadam_mini_jax/sparse_window.py",
        "                      kept_count(size % block, density))",
        "                      kept_count(block, density) if size % block else 0)",
        ("tests/test_sparse_window.py::test_layout",
         "tests/test_micro_adam.py::test_matches_numpy_reference_across_the_ring_wrap_around"),
        ("test_layout", "numpy_reference"),
        "the ragged tail keeps as many entries as a full block: it is updated denser"),
    Mutant(
        "bucket_ends_rounded_to_nearest", "qadam_mini_jax/int4.py",
        "    lo, hi = _bfloat16_outward(b.min(-1), b.max(-1))",
        "    lo, hi = b.min(-1).astype(jnp.bfloat16), b.max(-1).astype(jnp.bfloat16)",
        ("tests/test_int4.py::test_min_max_round_trip_within_half_a_step",),
        ("round_trip",),
        "a bucket far from zero loses more than a step of its error feedback to bfloat16's "
        "rounding of its ends"),
    Mutant(
        "triton_shard_row_offset_dropped", "qadam_mini_jax/triton_update.py",
        "  index = (rows.to(tl.uint32) + i0) * STRIDE", "  index = rows.to(tl.uint32) * STRIDE",
        ("tests/test_triton_update.py::test_interpreted_kernel_gives_the_equations_bit_for_bit",),
        ("shard_of_rows",),
        "a shard of a leaf rounds with the bits of the leaf's first rows: the shards of a "
        "sharded run share their rounding noise"),
    Mutant(
        "triton_layers_share_one_stream", "qadam_mini_jax/triton_update.py",
        "    if LAYERS:\n      s0, s1 = _layer_seeds(s0, s1, layer)\n", "",
        ("tests/test_triton_update.py::test_interpreted_kernel_gives_the_equations_bit_for_bit",
         "tests/test_triton_update.py::test_triton_implementation_follows_the_xla_path"),
        ("stack_of_3", "two_stacks"),
        "every layer of a stack launched at once rounds with the same bits: correlated noise "
        "across layers, and not the XLA path's"),
    Mutant(
        "triton_m_rounds_on_the_weights_stream", "qadam_mini_jax/triton_update.py",
        "  _requantize(m, index, seed_ptr, 0, layer,",
        "  _requantize(m, index, seed_ptr, 4 if INT8_PARAMS else 0, layer,",
        ("tests/test_triton_update.py::test_interpreted_kernel_gives_the_equations_bit_for_bit",),
        ("int8_weights",),
        "with INT8 weights, m and the weights round with the same bits: their errors correlate"),
    Mutant(
        "triton_row_edge_unmasked", "qadam_mini_jax/triton_update.py",
        "  ROW_EDGE: tl.constexpr = A % T0 != 0", "  ROW_EDGE: tl.constexpr = False",
        ("tests/test_kernel_compile.py::test_every_leaf_access_of_a_ragged_variant_is_predicated",),
        ("predicated",),
        "an edge tile reads and writes past the leaf's last rows (other buffers' memory)"),
)


# -----------------------------------------------------------------------------
# Checks (no tests run).
# -----------------------------------------------------------------------------


def test_file(test: str) -> str:
  """``tests/x.py`` of a node id or file."""
  return test.split("::", 1)[0]


def problems_of(mutant: Mutant, root: pathlib.Path = ROOT) -> list[str]:
  """What is wrong with ``mutant`` against the tree at ``root`` (empty if nothing)."""
  out = []
  path = root / mutant.file
  if not path.is_file():
    return [f"{mutant.file} does not exist"]
  source = path.read_text()
  count = source.count(mutant.old)
  if count != 1:
    out.append(f"its old snippet occurs {count} times in {mutant.file}, not once: {mutant.old!r}")
  elif mutant.new == mutant.old:
    out.append("new equals old")
  else:
    try:
      compile(source.replace(mutant.old, mutant.new), mutant.file, "exec")
    except SyntaxError as e:
      out.append(f"the mutated {mutant.file} does not compile: {e}")
  if not mutant.tests or not mutant.catches:
    out.append("no tests or no catches")
  for test in mutant.tests:
    file = root / test_file(test)
    if not file.is_file():
      out.append(f"test file {test_file(test)} does not exist")
      continue
    for name in test.split("::")[1:]:
      name = name.split("[", 1)[0]
      if not re.search(rf"^\s*(def|class) {re.escape(name)}\b", file.read_text(), re.MULTILINE):
        out.append(f"{test_file(test)} has no test {name}")
  return out


def check(mutants: tuple[Mutant, ...], root: pathlib.Path = ROOT) -> None:
  """Exit with status 2 naming every mutant whose snippet or tests do not fit the tree."""
  names = [m.name for m in mutants]
  errors = [f"{n}: the name is used {names.count(n)} times" for n in sorted(set(names))
            if names.count(n) > 1]
  errors += [f"{m.name}: {p}" for m in mutants for p in problems_of(m, root)]
  if errors:
    print(f"Mutants that do not fit the tree at {root}:\n  " + "\n  ".join(errors),
          file=sys.stderr)
    raise SystemExit(2)


# -----------------------------------------------------------------------------
# Running.
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
  """What the tests made of one mutant (or of the unmutated baseline)."""

  status: str  # "failed" (some test did: caught), "passed" (survived), "TIMEOUT" or "ERROR"
  failing: list[str]
  passed: int
  seconds: float
  intended: bool = False
  detail: str = ""


def make_copy(source: pathlib.Path, copy: pathlib.Path) -> pathlib.Path:
  """A fresh copy of the library, tests, examples, benchmarks and pyproject.toml under ``source``."""
  copy.mkdir()
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis",
                                  "junit-*.xml", "pytest-*.log")
  for item in COPIED:
    if (source / item).is_dir():
      shutil.copytree(source / item, copy / item, ignore=ignore)
    else:
      shutil.copy2(source / item, copy / item)
  return copy


def apply(mutant: Mutant, copy: pathlib.Path) -> None:
  path = copy / mutant.file
  source = path.read_text()
  path.write_text(source.replace(mutant.old, mutant.new, 1))


def environment(copy: pathlib.Path, cache: pathlib.Path | None) -> dict[str, str]:
  """The environment of a run in ``copy``: the copy first on ``PYTHONPATH`` (ahead
  of the editable install of the repository), and the shared compilation cache."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(copy)] + (
      [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  env["PYTHONDONTWRITEBYTECODE"] = "1"
  if cache is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return env


def check_import(copy: pathlib.Path, env: dict[str, str]) -> None:
  """RuntimeError unless ``import qadam_mini_jax`` in ``copy`` imports the copy."""
  found = subprocess.run(
      [sys.executable, "-c", "import qadam_mini_jax; print(qadam_mini_jax.__file__)"],
      cwd=copy, env=env, capture_output=True, text=True, check=True).stdout.strip()
  if not pathlib.Path(found).resolve().is_relative_to(copy.resolve()):
    raise RuntimeError(f"the copy in {copy} imports qadam_mini_jax from {found}, not the copy")


def node_id(copy: pathlib.Path, classname: str, name: str) -> str:
  """pytest's node id of a JUnit test case (``tests.test_x[.Class]`` + ``name``)."""
  if not classname:  # a collection error: name is the module
    return name.replace(".", "/") + ".py (collection)"
  parts = classname.split(".")
  for k in range(len(parts), 0, -1):
    if (copy / ("/".join(parts[:k]) + ".py")).is_file():
      return "::".join(["/".join(parts[:k]) + ".py", *parts[k:], name])
  return f"{classname}::{name}"


def read_junit(copy: pathlib.Path, path: pathlib.Path) -> tuple[list[str], int]:
  """``(failing node ids, passed count)`` of a JUnit XML report."""
  failing, passed = [], 0
  for case in ET.parse(path).getroot().iter("testcase"):
    if case.find("failure") is not None or case.find("error") is not None:
      failing.append(node_id(copy, case.get("classname", ""), case.get("name", "")))
    elif case.find("skipped") is None:
      passed += 1
  return failing, passed


def run_tests(copy: pathlib.Path, tests: list[str], env: dict[str, str], timeout: float,
              label: str) -> Outcome:
  """Run pytest on ``tests`` in ``copy``; the outcome from its JUnit report."""
  junit, log = copy / f"junit-{label}.xml", copy / f"pytest-{label}.log"
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         "--no-header", "-rN", f"--junitxml={junit}", *tests]
  start = time.monotonic()
  with open(log, "w") as out:
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
      rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)  # pytest and anything it started
      proc.wait()
      return Outcome("TIMEOUT", [], 0, time.monotonic() - start, detail=f"over {timeout:.0f} s")
  seconds = time.monotonic() - start
  failing, passed = read_junit(copy, junit) if junit.is_file() else ([], 0)
  if failing:
    return Outcome("failed", failing, passed, seconds)
  if rc == 0:
    return Outcome("passed", [], passed, seconds)
  tail = log.read_text().strip().splitlines()[-3:]
  return Outcome("ERROR", [], passed, seconds, detail=f"pytest exit {rc}: " + " / ".join(tail))


def union(tests: list[str]) -> list[str]:
  """The tests in order, once; a node id is dropped where its whole file is listed."""
  files = {t for t in tests if "::" not in t}
  out = []
  for t in tests:
    if t not in out and (t in files or test_file(t) not in files):
      out.append(t)
  return out


# -----------------------------------------------------------------------------
# Report.
# -----------------------------------------------------------------------------


def cpu_name() -> str:
  """The processor's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
  info = pathlib.Path("/proc/cpuinfo")
  lines = info.read_text().splitlines() if info.exists() else []
  names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
  return names[0] if names else platform.processor() or platform.machine()


def git(*args: str) -> str:
  try:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ""


def version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "absent"


def shorten(failing: list[str], limit: int = 4) -> str:
  """``test_x::test_y[...]`` groups: one per test function, with its failing case count."""
  groups: dict[str, list[str]] = {}
  for node in failing:
    base = node.removeprefix("tests/").replace(".py::", "::")
    groups.setdefault(base.split("[", 1)[0], []).append(base)
  items = [nodes[0] if len(nodes) == 1 else f"{name} ({len(nodes)} cases)"
           for name, nodes in groups.items()]
  more = f", +{len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(f"`{i}`" for i in items[:limit]) + more


def cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def result(o: Outcome) -> str:
  """A mutant's result: caught, SURVIVED, TIMEOUT or ERROR."""
  return {"failed": "caught", "passed": "SURVIVED"}.get(o.status, o.status)


def provenance() -> str:
  """The commit of the working tree, and whether the files copied differ from it."""
  dirty = git("status", "--porcelain", "--", *COPIED)
  commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
  return f"commit `{commit}`" + (
      " with uncommitted changes to the files copied (the copies are of the working tree)"
      if dirty else "")


def report(command: str, started: str, source: str, mutants: list[Mutant],
           outcomes: dict[str, Outcome], baseline: Outcome, compilation_cache: bool) -> str:
  done = [m for m in mutants if m.name in outcomes]
  caught = [m for m in done if result(outcomes[m.name]) == "caught"]
  intended = [m for m in caught if outcomes[m.name].intended]
  survived = [m.name for m in done if result(outcomes[m.name]) == "SURVIVED"]
  others = [m.name for m in caught if not outcomes[m.name].intended]
  broken = [m.name for m in done if outcomes[m.name].status in ("TIMEOUT", "ERROR")]
  lines = [
      "# Mutation benchmark", "",
      f"Produced by `{command}`, started {started}, on {cpu_name()} ({os.cpu_count()} cores; "
      f"Python {platform.python_version()}, jax {version('jax')}, pytest {version('pytest')}) "
      f"at {source}.", "",
      "Each mutant is one small edit to a fresh copy of `qadam_mini_jax/`, `tests/`, "
      "`examples/`, `benchmarks/` and `pyproject.toml`; its tests run on that copy (first on "
      "`PYTHONPATH`). "
      "A mutant is *caught* when at least one of them fails or errors, and *by its intended "
      "test* when one of the failing tests is one meant to catch it (see the second table). "
      "The unmutated copy passed every test selected first: "
      f"{baseline.passed} tests in {baseline.seconds:.0f} s."
      + (" The runs shared one JAX persistent compilation cache." if compilation_cache else ""),
      "",
      f"**{len(caught)} of {len(done)} mutants caught, {len(intended)} by their intended test.**"
      + (f" Survived: {', '.join(f'`{n}`' for n in survived)}." if survived else "")
      + (f" Caught only by other tests: {', '.join(f'`{n}`' for n in others)}." if others else "")
      + (f" Timed out or broke pytest: {', '.join(f'`{n}`' for n in broken)}." if broken else "")
      + (f" Not run yet: {len(mutants) - len(done)}." if len(done) < len(mutants) else ""),
      "",
      "| mutant | file | what it breaks | result | intended test caught it | failing tests | s |",
      "|---|---|---|---|---|---|---:|",
  ]
  for m in done:
    o = outcomes[m.name]
    verdict = result(o) if o.status == "failed" else f"**{result(o)}**"
    yes = ("yes" if o.intended else "**no**") if o.status == "failed" else "—"
    failing = shorten(o.failing) if o.failing else cell(o.detail) or "none"
    lines.append(f"| `{m.name}` | `{m.file.removeprefix('qadam_mini_jax/')}` | {cell(m.why)} | "
                 f"{verdict} | {yes} | {failing} | "
                 f"{o.seconds:.0f} |")
  lines += ["", "## Tests run and intended catches", "",
            "| mutant | tests run | intended (substring of the failing node id) |",
            "|---|---|---|"]
  for m in done:
    tests = ", ".join(f"`{t.removeprefix('tests/')}`" for t in m.tests)
    lines.append(f"| `{m.name}` | {tests} | {', '.join(f'`{c}`' for c in m.catches)} |")
  return "\n".join(lines) + "\n"


def write(path: pathlib.Path, text: str, echo: bool) -> None:
  if echo:
    print(text, end="")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  if echo:
    print(f"\nWrote {path}")


# -----------------------------------------------------------------------------
# Main.
# -----------------------------------------------------------------------------


def list_mutants(mutants: list[Mutant]) -> None:
  for m in mutants:
    print(f"{m.name}  ({m.file})\n  breaks:  {m.why}\n  tests:   {' '.join(m.tests)}\n"
          f"  catches: {', '.join(m.catches)}")
  print(f"\n{len(mutants)} mutants, {len(union([t for m in mutants for t in m.tests]))} "
        "test ids/files in all.")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
  parser.add_argument("--list", action="store_true", help="print the mutants and exit")
  parser.add_argument("--check", action="store_true",
                      help="check that every snippet occurs exactly once (and the tests exist); "
                      "run nothing")
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                      help=f"where the table goes (default {DEFAULT_OUT.relative_to(ROOT)})")
  parser.add_argument("--timeout", type=float, default=TIMEOUT_S,
                      help="seconds per mutant (the baseline: this per test file)")
  parser.add_argument("--no-compilation-cache", action="store_true",
                      help="compile every program in every run")
  parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
  args = parser.parse_args()

  known = {m.name: m for m in MUTANTS}
  unknown = [n for n in args.only or () if n not in known]
  if unknown:
    parser.error(f"unknown mutants {unknown}; --list shows them")
  mutants = [known[n] for n in args.only] if args.only else list(MUTANTS)
  if args.list:
    list_mutants(mutants)
    return 0
  check(tuple(mutants))
  if args.check:
    print(f"{len(mutants)} mutants: every old snippet occurs exactly once in its file, every "
          "mutated file compiles, every test file and test named exists.")
    return 0

  command = "python benchmarks/mutants.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
  started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  parent = pathlib.Path(tempfile.mkdtemp(prefix="qadam-mutants-"))
  cache = None if args.no_compilation_cache else parent / "jax-compilation-cache"
  try:
    tests = union([t for m in mutants for t in m.tests])
    # One snapshot of the working tree (which may change while this runs): the
    # baseline runs in it and every mutant's copy is made from it.
    copy = make_copy(ROOT, parent / "baseline")
    source = provenance()
    check(tuple(mutants), copy)
    env = environment(copy, cache)
    check_import(copy, env)
    print(f"baseline: {len(tests)} test ids/files in {copy} ...", flush=True)
    files = {test_file(t) for t in tests}
    baseline = run_tests(copy, tests, env, args.timeout * len(files), "baseline")
    print(f"baseline: {baseline.status}, "
          f"{baseline.passed} tests passed in {baseline.seconds:.0f} s", flush=True)
    if baseline.status != "passed":
      print("The unmutated copy does not pass the selected tests, so no catch would mean "
            f"anything: {baseline.status} {baseline.detail}", file=sys.stderr)
      for node in baseline.failing:
        print(f"  failed: {node}", file=sys.stderr)
      print(f"  log: {copy / 'pytest-baseline.log'}", file=sys.stderr)
      args.keep = True
      return 2

    outcomes: dict[str, Outcome] = {}
    for m in mutants:
      copy = make_copy(parent / "baseline", parent / m.name)
      apply(m, copy)
      o = run_tests(copy, list(m.tests), environment(copy, cache), args.timeout, m.name)
      o.intended = any(c in node for node in o.failing for c in m.catches)
      outcomes[m.name] = o
      verdict = result(o) + ((" (intended test)" if o.intended else " (ONLY BY OTHER TESTS)")
                             if o.status == "failed" else "")
      print(f"{m.name}: {verdict} in {o.seconds:.0f} s"
            + (f": {shorten(o.failing, limit=6)}" if o.failing else "")
            + (f" [{o.detail}]" if o.detail else ""), flush=True)
      table = report(command, started, source, mutants, outcomes, baseline, cache is not None)
      write(args.out, table, echo=False)
      if not args.keep:
        shutil.rmtree(copy)
    write(args.out, report(command, started, source, mutants, outcomes, baseline,
                           cache is not None), echo=True)
  finally:
    if args.keep:
      print(f"Temporary copies kept in {parent}")
    else:
      shutil.rmtree(parent, ignore_errors=True)
  bad = [n for n, o in outcomes.items() if not (o.status == "failed" and o.intended)]
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
