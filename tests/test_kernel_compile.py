"""The fused kernels compile with the Triton compiler for sm_90 and sm_80, without a GPU.

The Pallas kernel and the ``@triton.jit`` kernel of ``implementation="triton"``
(``kernel_compile.triton_variants()``, compiled as jax-triton compiles it). Every
kernel variant the library can launch (``kernel_compile.variants()``:
columns and rows layouts, round-to-nearest and stochastic, fused step on and
off, fp32 and bf16, INT8 weights, aligned and ragged leaves) is lowered by Pallas for CUDA
and compiled by the PyPI ``triton`` to PTX and a cubin. From the compiled code:
no register spills and at least two blocks per SM; in a ragged variant every
global load and store of a leaf-sized buffer is predicated (memory safety that
interpret mode cannot show); aligned variants keep 16-byte vector accesses.
"""

import pytest

pytest.importorskip("triton", reason="no triton wheel for this platform (Linux x86-64/aarch64 only)")

import kernel_compile as kc  # noqa: E402  (benchmarks/, on sys.path from conftest)

VARIANTS = kc.variants() + kc.triton_variants()


@pytest.fixture(scope="module")
def compiled():
  return kc.compile_all(VARIANTS)


@pytest.mark.parametrize("kernel", ["pallas", "triton"])
def test_variants_cover_every_flag_and_both_kinds_of_leaf(kernel):
  variants = [v for v in VARIANTS if v.kernel == kernel]
  flags = {(v.layout.columns, v.stochastic, v.fuse_step, v.ragged) for v in variants}
  assert len(flags) == 2 * 2 * 2 * 2
  dtypes = {(v.stochastic, v.fuse_step, v.p_dtype) for v in variants}  # each with bf16 too
  assert len(dtypes) == 2 * 2 * 2
  shapes = {v.shape for v in variants if v.ragged}
  assert {(1000, 300), (32001, 4096)} <= shapes
  int8_weights = {(v.layout.columns, v.stochastic, v.ragged) for v in variants if v.int8_params}
  assert len(int8_weights) == 2 * 2 * 2


def _on_targets(variants):
  return pytest.mark.parametrize("variant, sm", [(v, sm) for v in variants for sm in kc.TARGETS],
                                 ids=[f"{v.name}-sm{sm}" for v in variants for sm in kc.TARGETS])


parametrize = _on_targets(VARIANTS)


@parametrize
def test_no_spills_and_two_blocks_per_sm(compiled, variant, sm):
  c = compiled[variant, sm]
  assert c.spill_bytes == 0, f"{variant.name} spills {c.spill_bytes} B on sm_{sm}"
  assert c.blocks_per_sm >= 2, f"{variant.name}: {c.registers} registers x {c.threads} threads"


@parametrize
def test_every_leaf_access_of_a_ragged_variant_is_predicated(compiled, variant, sm):
  accesses = compiled[variant, sm].accesses
  assert accesses and all(a.argument >= 0 for a in accesses), "an address was not traced"
  leaf = [a for a in accesses if a.argument in variant.leaf_arguments]
  assert {a.argument for a in leaf if a.op == "st"} == set(variant.outputs)
  if variant.ragged:
    unmasked = [a.line for a in leaf if not a.predicated]
    assert not unmasked, f"{variant.name} sm_{sm}: unpredicated {unmasked[:3]}"
  # Unmasked reads are only of the 12 scalar words, never past them.
  assert all(a.op == "ld" and a.width_bits == 32 for a in accesses if not a.predicated
             and a.argument < kc.SCALAR_ARGUMENTS)


@_on_targets([v for v in VARIANTS if not v.ragged])
def test_aligned_variants_keep_16_byte_vector_accesses(compiled, variant, sm):
  c = compiled[variant, sm]
  bulk = [a for a in c.accesses if a.argument in variant.element_arguments]
  assert bulk and all(a.width_bits == 128 for a in bulk), [a.line for a in bulk if a.width_bits != 128]
  # A warp reads whole 128-byte lines of each float32 tile row.
  assert all(warp_row >= min(128, 4 * variant.config.tile[1]) for _, warp_row in c.f32_rows)
