"""``examples/minimal.py``, run as a user runs it: it trains and reports the state's bytes."""

from __future__ import annotations

import math
import os
import pathlib
import re
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "minimal.py"


def test_minimal_example_trains_and_reports_the_state_beside_adamw():
  assert len(SCRIPT.read_text().splitlines()) <= 60
  out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True).stdout
  losses = {int(s): float(l) for s, l in re.findall(r"step (\d+): loss ([\d.]+) nats/byte", out)}
  assert sorted(losses) == [1, 50, 100, 150, 200, 250, 300]
  assert abs(losses[1] - math.log(256)) < 1.0  # starts near a uniform guess over 256 bytes
  assert max(losses[s] for s in (200, 250, 300)) < 2.8  # and learns (unigram entropy: 3.26)
  state = {name: (int(b.replace(",", "")), float(per), int(n.replace(",", "")))
           for name, b, per, n in re.findall(
               r"(\S+): optimizer state ([\d,]+) bytes \(([\d.]+) B/param, ([\d,]+) params\)", out)}
  assert sorted(state) == ["optax.adamw", "q_adam_mini"]
  n = state["optax.adamw"][2]
  assert state["optax.adamw"][0] == 8 * n + 8  # two fp32 moments, two int32 step counts
  assert 1.0 < state["q_adam_mini"][1] < 1.25  # INT8 m, fp32 scales and per-block v
