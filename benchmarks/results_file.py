"""Where benchmark tables go: ``benchmarks/results/<name>``."""

from __future__ import annotations

import pathlib

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def write(name: str, text: str) -> None:
  """Print ``text`` and write it to ``benchmarks/results/<name>``."""
  print(text, end="" if text.endswith("\n") else "\n")
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / name).write_text(text)
  print(f"\nWrote {RESULTS / name}")
