"""benchmarks/fits.py: every row lowers; Q-Adam-mini's peak is below AdamW's; remat is exact."""

from __future__ import annotations

import dataclasses
import functools
import json

import fits  # benchmarks/, on sys.path from conftest
import jax
import numpy as np
import pytest
from flax import nnx
from llama_model import Llama, LlamaConfig, next_token_loss

# Parameters, not activations, dominate at batch 1 x 16 tokens.
SMALL = LlamaConfig(vocab=256, dim=256, ffn_dim=512, num_layers=4, num_heads=4, num_kv_heads=2,
                    scan_layers=True, remat=True)
BATCH = (1, 16)


@functools.cache
def _measured(name):
  return fits.measure(fits.ROWS[name], SMALL, BATCH)


def test_every_row_lowers():
  for row in fits.ROWS.values():
    init, train_step, tokens = row(SMALL, BATCH)
    train_step.lower(jax.eval_shape(init), tokens)


def test_q_adam_mini_peaks_below_adamw():
  adamw, q = _measured("optax.adamw"), _measured("q_adam_mini")
  assert adamw["alias"] > 0 and q["alias"] > 0  # the state is donated
  assert q["peak_bytes_per_param"] < adamw["peak_bytes_per_param"]


def test_int8_m_of_stacked_layers_is_updated_one_layer_at_a_time():
  """q_adam_mini's temporaries exceed adam_mini's (whose float m is updated in
  place) by a few layers' float32 m of the largest stacked leaf (the FFN kernel,
  0.5 MB; one layer's gradient, m codes and scales are loop state, its float32 m
  and rounding temporaries beside them), not by the stack's: updating all 4
  layers at once added 6.1 MB here, one at a time 0.9 MB."""
  extra = _measured("q_adam_mini")["temp"] - _measured("adam_mini")["temp"]
  assert extra < 4 * (4 * SMALL.dim * SMALL.ffn_dim), extra


def test_remat_changes_no_loss_or_gradient():
  """Scanned blocks (``nnx.remat`` inside ``nnx.scan``), as in the benchmark."""
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, SMALL.vocab)
  models = [nnx.split(Llama(dataclasses.replace(SMALL, num_layers=2, remat=remat), nnx.Rngs(0)))
            for remat in (False, True)]

  def losses_and_grads(params):  # one compilation for both
    return [jax.value_and_grad(lambda p, g=g: next_token_loss(nnx.merge(g, p)(tokens), tokens))(q)
            for (g, _), q in zip(models, params)]

  plain, remat = jax.jit(losses_and_grads)([params for _, params in models])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), plain, remat)


def test_rows_measured_again_keep_the_notes_of_the_other_rows(tmp_path, monkeypatch):
  monkeypatch.setattr(fits.results_file, "RESULTS", tmp_path)

  def note(rows, command):
    return (f" Rows {', '.join(f'`{r}`' for r in rows)} of 60M, 7B measured later, in the same "
            f"environment, by `{command}`.")
  head = f"Produced by `python benchmarks/fits.py` on the CPU backend, cpu; {fits.environment()}"
  (tmp_path / "t.md").write_text(head + note(["q_galore", "q_galore, in backward"], "one")
                                 + note(["micro_adam"], "two") + "\n\n| table |\n")
  (tmp_path / "t.json").write_text(json.dumps([{"model": "60M", "optimizer": "micro_adam"},
                                               {"model": "60M", "optimizer": "q_galore"}]))
  records, models, first = fits.merged_records("t", ["micro_adam"], ["60M", "7B"])
  assert first == head + note(["q_galore", "q_galore, in backward"], "one")
  assert records == [{"model": "60M", "optimizer": "q_galore"}] and models == ["60M", "7B"]
  (tmp_path / "t.md").write_text("Produced by ...; jax 0.0.1.\n")
  with pytest.raises(SystemExit, match="another environment"):
    fits.merged_records("t", ["micro_adam"], ["60M"])
