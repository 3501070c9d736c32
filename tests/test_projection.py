"""Which leaves GaLore projects, on which side; the lazy gap's bookkeeping."""

import jax.numpy as jnp
import numpy as np
import pytest

from qadam_mini_jax import partition as partition_lib
from qadam_mini_jax import projection

FLAX = partition_lib.BlockPartition(layers={"layers": 1})
TORCH = partition_lib.BlockPartition(kernel_layout="out_in")


@pytest.mark.parametrize("partition, path, shape, expected", [
    # Flax (in, out): the smaller side; a square matrix by its input side (rows).
    (FLAX, "mlp/up_proj/kernel", (8, 32), projection.ProjectionPlan((), 1, True, 4)),
    (FLAX, "mlp/down_proj/kernel", (32, 8), projection.ProjectionPlan((), 1, False, 4)),
    (FLAX, "attn/q_proj/kernel", (8, 8), projection.ProjectionPlan((), 1, True, 4)),
    # (in, heads, head_dim) and (heads, head_dim, out): the input axes are the rows.
    (FLAX, "attn/query/kernel", (16, 2, 4), projection.ProjectionPlan((), 1, False, 4)),
    (FLAX, "attn/out/kernel", (2, 4, 16), projection.ProjectionPlan((), 2, True, 4)),
    # MaxText's layer axis at 1: each layer a matrix.
    (FLAX, "decoder/layers/mlp/wi_0/kernel", (8, 3, 32), projection.ProjectionPlan((1,), 1, True, 4)),
    # PyTorch (out, in): a square matrix by its input side (columns).
    (TORCH, "attn/q_proj/weight", (8, 8), projection.ProjectionPlan((), 1, False, 4)),
    (TORCH, "attn/o_proj/weight", (16, 2, 4), projection.ProjectionPlan((), 1, False, 4)),
    # Not projected: embedding, output layer, norms, biases; rank >= the smaller side.
    (FLAX, "embed/embedding", (64, 8), None),
    (FLAX, "lm_head/kernel", (8, 64), None),
    (FLAX, "norm/scale", (8,), None),
    (FLAX, "mlp/up_proj/bias", (32,), None),
    (FLAX, "mlp/up_proj/kernel", (4, 32), None),
])
def test_plans(partition, path, shape, expected):
  assert projection.plan_for(path, shape, partition, rank=4) == expected


def test_projected_chooses_and_a_non_matrix_fails_naming_it():
  everything = lambda path, shape: True
  assert projection.plan_for("embed/embedding", (64, 8), FLAX, 4, everything) is not None
  with pytest.raises(partition_lib.PartitionError, match="norm/scale: shape"):
    projection.plan_for("norm/scale", (8,), FLAX, 4, everything)


def test_matrices_round_trip_with_the_layer_axis_anywhere():
  plan = projection.plan_for("layers/attn/out/kernel", (2, 5, 3, 16), FLAX, rank=4)
  x = jnp.arange(2 * 5 * 3 * 16.0).reshape(2, 5, 3, 16)
  mats = projection.as_matrices(plan, x)
  np.testing.assert_array_equal(mats[1], x[:, 1].reshape(6, 16))
  np.testing.assert_array_equal(projection.from_matrices(plan, mats, x.shape), x)


def test_the_cosine_ignores_the_sign_and_the_queue_slides():
  plan = projection.ProjectionPlan((), 1, True, 1)
  state = projection.init(plan, (4, 8), gap=3, queue=3)
  e0, e1 = jnp.eye(4)[:, :1], jnp.eye(4)[:, 1:2]
  state = projection.adapted(plan, state, e0, 0.5, 2)  # the first refresh: nothing to compare
  assert int(state.filled) == 0
  for vectors, gap in ((-e0, 3), (e0, 3), (e0, 6), (e1, 12), (e0, 12)):
    state = projection.adapted(plan, state, vectors, 0.5, 2)
    assert int(state.gap) == gap
  # Cosines 1 (a flipped sign), 1, 1, 0, 0: the queue of three is full from the
  # third, with means 1, 2/3 (both grow the gap), then 1/3.
  np.testing.assert_array_equal(state.cosines, [1.0, 0.0, 0.0])


@pytest.mark.parametrize("rows", [True, False])
def test_randomized_range_finds_the_svds_vectors_of_a_low_rank_gradient(rows):
  """Layers of rank 3 (distinct singular values) at rank 3: the sketch spans
  their range, so the range finder's projectors are the SVD's, per layer of a
  stack refreshed at one step (each layer its own sketch)."""
  rng = np.random.default_rng(0)
  layers, m, n = 2, 12, 20
  u = np.linalg.qr(rng.normal(size=(layers, m, 3)))[0]
  v = np.linalg.qr(rng.normal(size=(layers, n, 3)))[0]
  g = jnp.asarray(np.einsum("lmk,k,lnk->lmn", u, [5.0, 3.0, 1.0], v), jnp.float32)
  g = g if rows else jnp.swapaxes(g, 1, 2)
  plan = projection.ProjectionPlan((0,), 1, rows, 3)
  start = projection.init(plan, g.shape, 10, 5)
  exact = projection.refresh(plan, start, g, jnp.int32(0), None, 2)
  sketched = projection.refresh(plan._replace(finder=projection.RandomizedRange(2, 1)), start,
                                g, jnp.int32(0), None, 2)
  np.testing.assert_allclose(sketched.matrix, exact.matrix, atol=2e-5)
  assert np.abs(exact.matrix).max() > 0.1
