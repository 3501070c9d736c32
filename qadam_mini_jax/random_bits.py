"""Counter-based random bits for stochastic rounding.

The bits for element ``i`` of the parameter at path ``l`` at step ``t`` under key
``k`` are a pure function ``hash(k, t, l, i)`` built from 32-bit integer
multiply/xor-shift mixes. A parameter's stream is named by its path
(:func:`path_stream`), not by its position in the tree, so freezing a subtree
(``optax.masked``), adding a parameter or scanning other layers leaves every
other parameter's rounding noise as it was.
Nothing is drawn from a stateful generator, so the same bits can be produced
inside a GPU kernel (Triton cannot run ``jax.random``) without materialising a
random array in memory, and a run is reproducible from its key alone.
"""

from __future__ import annotations

from typing import Any

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

#: The multipliers of :func:`mix32` and the golden-ratio step of the seeds
#: (public: the Triton kernel hashes with the same constants).
M1 = np.uint32(0x21F0AAAD)
M2 = np.uint32(0xD35A2D97)
GOLDEN = np.uint32(0x9E3779B9)


def mix32(x: jax.Array) -> jax.Array:
  """A bijective 32-bit avalanche mix (C. Wellons' ``lowbias32`` family)."""
  x = x ^ (x >> 16)
  x = x * M1
  x = x ^ (x >> 15)
  x = x * M2
  return x ^ (x >> 15)


def check_seed(key: Any) -> None:
  """Raise ``ValueError`` for an int seed that two words cannot hold (a signed or
  unsigned 64-bit int): its higher bits would be dropped, so seeds ``s`` and
  ``s + 2**64`` would round alike."""
  if isinstance(key, (int, np.integer)) and not -2**63 <= int(key) < 2**64:
    raise ValueError(f"key must be an int in [-2**63, 2**64) or a JAX PRNG key, got {key}.")


def key_words(key: Any) -> jax.Array:
  """Two uint32 seed words from an int seed, a typed key or raw key data."""
  if isinstance(key, (int, np.integer)):
    check_seed(key)
    key = int(key)
    return jnp.asarray([np.uint32(key & 0xFFFFFFFF), np.uint32(key >> 32 & 0xFFFFFFFF)])
  key = jnp.asarray(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  if key.ndim == 0:  # an int seed traced by optax.inject_hyperparams
    return jnp.stack([key.astype(jnp.uint32), jnp.zeros((), jnp.uint32)])
  if not jnp.issubdtype(key.dtype, jnp.integer):
    raise TypeError(f"key must be an int or a PRNG key, got dtype {key.dtype}.")
  words = key.reshape(-1).astype(jnp.uint32)
  if words.shape[0] == 2:
    return words
  # Fold wider raw keys (e.g. 'rbg') into two words.
  acc = jnp.zeros((2,), jnp.uint32)
  for i in range(words.shape[0]):
    acc = acc.at[i % 2].set(mix32(acc[i % 2] ^ words[i]))
  return acc


#: What a stream rounds: a leaf's first moment, its INT8 weights, or its 8-bit second moment.
MOMENT, WEIGHTS, SECOND_MOMENT = 0, 1, 2
_PURPOSE_WORDS = (np.uint32(0), np.uint32(0x5BD1E995), np.uint32(0xC2B2AE35))


def path_stream(path: str) -> int:
  """The 64-bit stream number of the parameter at ``path`` (e.g. ``"layers/0/mlp/kernel"``).

  The first 8 bytes of the path's BLAKE2b digest: the same in every process
  and Python version (unlike ``hash``), and two paths of one model share a
  stream with probability about ``n^2 / 2^65``.
  """
  return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little")


def stream_seeds(words: jax.Array, step: jax.Array, stream: int,
                 purpose: int = MOMENT) -> tuple[jax.Array, jax.Array]:
  """Two uint32 scalars naming one stream at one step.

  ``stream`` is a static int below ``2**64``: a parameter's
  :func:`path_stream`. ``purpose`` (:data:`MOMENT`, :data:`WEIGHTS` or
  :data:`SECOND_MOMENT`) gives the quantized stores of a parameter
  independent streams from one key.
  """
  if not 0 <= stream < 2**64:
    raise ValueError(f"stream must be an int in [0, 2**64), got {stream}.")
  low, high = np.uint32(stream & 0xFFFFFFFF), np.uint32(stream >> 32)
  step = jnp.asarray(step).astype(jnp.uint32)
  s = mix32(jnp.asarray(low, jnp.uint32) * GOLDEN + step)
  s0 = mix32(s ^ words[0] ^ _PURPOSE_WORDS[purpose])
  s1 = mix32(s0 ^ words[1] ^ high)
  return s0, s1


def layer_seeds(s0: jax.Array, s1: jax.Array, layer: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The stream of one layer of a stacked (scanned) leaf, from the leaf's stream."""
  t0 = mix32(s0 ^ mix32(jnp.asarray(layer).astype(jnp.uint32) * GOLDEN + GOLDEN))
  return t0, mix32(t0 ^ s1)


def element_bits(index: jax.Array, s0: jax.Array, s1: jax.Array) -> jax.Array:
  """uint32 random bits for flat element indices ``index`` of one stream."""
  return mix32(mix32(index.astype(jnp.uint32) ^ s0) + s1)


def bits_to_uniform(bits: jax.Array) -> jax.Array:
  """Top 24 bits as a float32 uniform in [0, 1), exactly representable."""
  return (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)


def uniform(shape: tuple[int, ...], s0: jax.Array, s1: jax.Array) -> jax.Array:
  """float32 uniforms in [0, 1) for a leaf of ``shape`` (row-major indices)."""
  # Mixed with the seeds before taking the leaf's shape: a shaped index depends on
  # nothing else, and XLA hoisted it out of loops over layers, keeping a uint32
  # array of each layer's shape alive through the whole loop.
  index = jax.lax.iota(jnp.uint32, int(np.prod(shape, dtype=np.int64)))
  return bits_to_uniform(element_bits(index, s0, s1)).reshape(shape)
