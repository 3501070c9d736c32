"""Short demo: train a tiny byte-level LLaMA with q_adam_mini and adamw.

Data is the source code of Python's own standard library (already on every
machine with Python, no download). Prints the loss as it falls and the bytes of
each optimizer's state.

    python examples/demo.py --steps 200
"""

from __future__ import annotations

import argparse
import pathlib
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import qadam_mini_jax
from llama_model import CONFIGS, Llama, next_token_loss

STDLIB_FILES = ("textwrap.py", "argparse.py", "difflib.py", "inspect.py", "typing.py")


def stdlib_bytes() -> np.ndarray:
  """A few hundred kB of stdlib source code as a uint8 array."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  text = b"\n".join((root / name).read_bytes() for name in STDLIB_FILES)
  return np.frombuffer(text, np.uint8)


def batches(data: np.ndarray, batch: int, seq: int, seed: int):
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(data) - seq, batch)
    yield jnp.asarray(np.stack([data[s:s + seq] for s in starts]).astype(np.int32))


def train(name: str, tx: optax.GradientTransformation, data: np.ndarray, steps: int, seed: int):
  model = Llama(CONFIGS["tiny"], nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  state_bytes = qadam_mini_jax.tree_nbytes(nnx.state(optimizer.opt_state))

  @nnx.jit
  def step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(lambda m: next_token_loss(m(tokens), tokens))(model)
    optimizer.update(model, grads)
    return loss

  print(f"\n{name}: {n_params:,} params, optimizer state {state_bytes:,} bytes "
        f"({state_bytes / n_params:.2f} B/param)")
  start, data_iter = time.perf_counter(), batches(data, 16, 128, seed)
  for i in range(1, steps + 1):
    loss = step(model, optimizer, next(data_iter))
    if i == 1 or i % max(steps // 8, 1) == 0:
      print(f"  step {i:4d}  loss {float(loss):.3f}")
  print(f"  {steps} steps in {time.perf_counter() - start:.1f}s")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  data = stdlib_bytes()
  print(f"corpus: {len(data):,} bytes of Python standard-library source")
  c = CONFIGS["tiny"]
  partition = qadam_mini_jax.BlockPartition(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads)
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.steps // 10, args.steps)
  for name, tx in [
      ("q_adam_mini", qadam_mini_jax.q_adam_mini(schedule, b2=0.95, weight_decay=0.1,
                                                 partition=partition)),
      ("optax.adamw", optax.adamw(schedule, b2=0.95, weight_decay=0.1)),
  ]:
    train(name, optax.chain(optax.clip_by_global_norm(1.0), tx), data, args.steps, args.seed)


if __name__ == "__main__":
  main()
