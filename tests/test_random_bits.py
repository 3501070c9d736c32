"""Counter-based random bits: hash reference, uniformity, stream independence."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qadam_mini_jax import random_bits as R

MASK = 0xFFFFFFFF


def mix32_python(x: int) -> int:
  """Reference lowbias32-style mix on Python ints."""
  x ^= x >> 16
  x = (x * 0x21F0AAAD) & MASK
  x ^= x >> 15
  x = (x * 0xD35A2D97) & MASK
  return x ^ (x >> 15)


def test_mix32_matches_python_reference():
  xs = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, MASK]
  got = np.asarray(R.mix32(jnp.asarray(xs, jnp.uint32)))
  assert [int(v) for v in got] == [mix32_python(x) for x in xs]


def test_element_bits_match_python_reference():
  words = R.key_words(7)
  s0, s1 = R.stream_seeds(words, jnp.int32(3), 5)
  s = mix32_python((5 * 0x9E3779B9 + 3) & MASK)
  r0 = mix32_python(s ^ 7)
  r1 = mix32_python(r0 ^ 0)
  assert (int(s0), int(s1)) == (r0, r1)
  idx = np.arange(10)
  want = [mix32_python((mix32_python(int(i) ^ r0) + r1) & MASK) for i in idx]
  assert [int(v) for v in R.element_bits(jnp.asarray(idx), s0, s1)] == want
  # A stream number's high 32 bits enter the second word.
  high = (0xCAFE << 32) | 5
  assert [int(v) for v in R.stream_seeds(words, jnp.int32(3), high)] == [r0, mix32_python(r0 ^ 0xCAFE)]


def test_path_streams_are_blake2b_of_the_path():
  digest = hashlib.blake2b(b"layers/0/mlp/kernel", digest_size=8).digest()
  assert R.path_stream("layers/0/mlp/kernel") == int.from_bytes(digest, "little")
  streams = {R.path_stream(f"layers/{i}/{name}") for i in range(100)
             for name in ("attn/q_proj/kernel", "attn/k_proj/kernel", "mlp/kernel")}
  assert len(streams) == 300 and max(streams) >= 2**32  # distinct, and 64-bit
  with pytest.raises(ValueError, match="stream must be an int in"):
    R.stream_seeds(R.key_words(0), 1, 2**64)


def test_uniform_is_uniform():
  u = np.asarray(R.uniform((200_000,), *R.stream_seeds(R.key_words(0), 1, 0)))
  assert u.min() >= 0.0 and u.max() < 1.0
  counts, _ = np.histogram(u, bins=50, range=(0, 1))
  expected = u.size / 50
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 100  # 49 dof: p < 1e-4 above ~95
  assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01


def test_streams_differ_by_key_step_and_leaf():
  base = R.key_words(0)
  draw = lambda words, step, leaf: np.asarray(R.uniform((1000,), *R.stream_seeds(words, step, leaf)))
  a = draw(base, 1, 0)
  np.testing.assert_array_equal(a, draw(base, 1, 0))
  for other in (draw(R.key_words(1), 1, 0), draw(base, 2, 0), draw(base, 1, 1)):
    assert np.mean(a == other) < 0.01


def test_key_words_accepts_ints_and_keys():
  typed = jax.random.key(42)
  raw = jax.random.PRNGKey(42)
  np.testing.assert_array_equal(R.key_words(typed), R.key_words(raw))
  assert R.key_words(typed).dtype == jnp.uint32 and R.key_words(typed).shape == (2,)
  np.testing.assert_array_equal(R.key_words(5), R.key_words(jnp.asarray(5)))
  assert not np.array_equal(R.key_words(5), R.key_words(6))


def test_key_words_keep_every_bit_of_the_seed():
  """Seeds >= 2^32 keep their high word; every word of a wide raw key counts."""
  np.testing.assert_array_equal(R.key_words(2**32 + 3), [3, 1])
  np.testing.assert_array_equal(R.key_words(2**63 + 2**32 * 5 + 7), [7, 2**31 + 5])
  wide = jnp.asarray([1, 2, 3, 4], jnp.uint32)
  for i in range(4):
    assert not np.array_equal(R.key_words(wide), R.key_words(wide.at[i].add(1))), i
  rbg = jax.random.key(9, impl="rbg")
  assert jax.random.key_data(rbg).shape == (4,)
  np.testing.assert_array_equal(R.key_words(rbg), R.key_words(jax.random.key_data(rbg)))
  assert not np.array_equal(R.key_words(rbg), R.key_words(jax.random.key(10, impl="rbg")))


def test_the_three_purposes_draw_apart():
  """m, INT8 weights and an 8-bit v of one parameter round on uncorrelated streams."""
  words = R.key_words(0)
  streams = [R.stream_seeds(words, jnp.int32(3), 5, purpose) for purpose in (
      R.MOMENT, R.WEIGHTS, R.SECOND_MOMENT)]
  draws = np.stack([np.asarray(R.uniform((4096,), *s)) for s in streams])
  correlations = np.corrcoef(draws)[np.triu_indices(3, 1)]
  assert np.all(np.abs(correlations) < 0.05), correlations


def test_seeds_wider_than_64_bits_are_refused():
  """Two words hold a 64-bit seed; a wider one would lose its high bits silently."""
  np.testing.assert_array_equal(R.key_words(2**64 - 1), R.key_words(-1))
  with pytest.raises(ValueError, match=r"key must be an int in \[-2\*\*63, 2\*\*64\).*"
                                       r"got 18446744073709551619"):
    R.key_words(2**64 + 3)
