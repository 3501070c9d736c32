"""MicroAdam's window: block layout, exact per-block top-k, moments from the ring."""

import jax.numpy as jnp
import numpy as np
import pytest

from qadam_mini_jax import sparse_window


@pytest.mark.parametrize("size, block, density, expected", [
    (1000, 256, 0.01, (256, 3, 3)),    # ceil(2.56) per block, ceil(2.32) for the 232-tail
    (700, 100, 0.07, (100, 7, 0)),     # 7 exactly, not ceil(7.000000000000001); no tail
    (30, 256, 0.01, (30, 1, 0)),       # shorter than a block: one block of it
    (10, 4, 1.0, (4, 4, 2)),
])
def test_layout(size, block, density, expected):
  layout = sparse_window.window_layout(size, block, density)
  assert (layout.block, layout.k, layout.tail_k) == expected
  assert layout.kept == size // layout.block * layout.k + layout.tail_k


def test_select_is_each_blocks_top_k():
  rng = np.random.default_rng(0)
  a = rng.standard_normal(23).astype(np.float32)
  a[5] = a[6] = 9.0  # a tie: the lower index first
  layout = sparse_window.window_layout(23, 8, 0.25)  # blocks of 8 keep 2, the 7-tail keeps 2
  within, flat = sparse_window.select(jnp.asarray(a), layout)
  expected = []
  for start in range(0, 23, 8):
    block = np.abs(a[start:start + 8])
    expected += list(np.argsort(-block, kind="stable")[:2])
  np.testing.assert_array_equal(within, expected)
  np.testing.assert_array_equal(flat, np.asarray(expected) + [0, 0, 8, 8, 16, 16])
  assert list(within[:2]) == [5, 6]


def test_moments_weigh_rows_by_age_and_skip_unwritten_rows():
  layout = sparse_window.window_layout(6, 3, 1 / 3)  # two blocks, one entry each
  indices = jnp.asarray([[0, 2], [1, 2], [0, 0]], jnp.int16)  # row 2 never written
  values = jnp.asarray([[1.0, 2.0], [4.0, -1.0], [9.0, 9.0]], jnp.bfloat16)
  b1, b2 = 0.5, 0.25
  m_hat, v_hat = sparse_window.moments(indices, values, jnp.asarray(2), b1, b2, layout)
  # Step 2: row 1 is age 0, row 0 age 1. Element 0: 1 (age 1); 1: 4 (age 0);
  # 5 (block 1, index 2): 2 (age 1) and -1 (age 0).
  c1, c2 = (1 - b1) / (1 - b1**2), (1 - b2) / (1 - b2**2)
  np.testing.assert_allclose(m_hat, c1 * np.asarray([b1, 4, 0, 0, 0, 2 * b1 - 1]), rtol=1e-6)
  np.testing.assert_allclose(v_hat, c2 * np.asarray([b2, 16, 0, 0, 0, 4 * b2 + 1]), rtol=1e-6)
