"""Training text: an offline corpus, a byte-level tokenizer, a split and batches.

The default corpus is the English text of Python's own documentation that
every CPython installation carries for ``help()``: ``pydoc_data.topics``, the
Language Reference and library chapters (statements, data model, built-in
types, ...), about 466 kB of prose with code examples, under the PSF licence.
Nothing is downloaded. ``--data`` takes your own text files or directories;
``hf:NAME[:CONFIG]`` loads a Hugging Face dataset's ``text`` column where the
``datasets`` package and the network are available.

Tokens are bytes (vocabulary 256): no tokenizer to train, cache or ship, and
every text (any language, any encoding) is representable. The last
``val_fraction`` of the corpus is held out for validation (a contiguous tail,
so no validation window overlaps a training window).

Batches are a pure function of ``(seed, index)``: a resumed run draws exactly
the batches the uninterrupted run would have drawn, and the position in the
data stream is just the number of batches consumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from collections.abc import Sequence

import numpy as np

VOCAB_SIZE = 256  # byte-level tokens
BUILTIN_CORPUS = "python-docs"


class DataError(ValueError):
  """The data source is missing, empty or too small; the message says which."""


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Byte tokens of a text corpus split into training and validation parts."""

  name: str
  train: np.ndarray  # uint8 tokens
  val: np.ndarray

  @property
  def fingerprint(self) -> str:
    """Short hash of the tokens: tells whether a checkpoint saw the same data."""
    digest = hashlib.sha256(self.train.tobytes())
    digest.update(self.val.tobytes())
    return digest.hexdigest()[:16]


def python_docs_text() -> bytes:
  """The Python documentation text shipped with CPython (``pydoc_data.topics``)."""
  from pydoc_data import topics  # part of the standard library

  return "\n\n".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")


def _files_under(path: pathlib.Path) -> list[pathlib.Path]:
  if path.is_dir():
    return sorted(p for p in path.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.parts))
  return [path]


def read_files(paths: Sequence[str]) -> bytes:
  """Bytes of the given files, directories searched recursively (hidden skipped)."""
  chunks = []
  for name in paths:
    path = pathlib.Path(name).expanduser()
    if not path.exists():
      raise DataError(f"--data path {name!r} does not exist.")
    files = _files_under(path)
    if not files:
      raise DataError(f"--data directory {name!r} holds no files.")
    chunks.extend(f.read_bytes() for f in files)
  text = b"\n".join(c for c in chunks if c)
  if not text.strip():
    raise DataError(f"--data {', '.join(paths)}: no text (the files are empty).")
  return text


def hf_text(spec: str) -> bytes:
  """The ``text`` column of a Hugging Face dataset's train split (``NAME[:CONFIG]``)."""
  try:
    import datasets  # optional, and needs the network the first time
  except ImportError as err:
    raise DataError("--data hf:... needs the `datasets` package (pip install datasets) "
                    "and network access; or pass local text files.") from err
  name, _, config = spec.partition(":")
  try:
    rows = datasets.load_dataset(name, config or None, split="train")
  except Exception as err:  # network, unknown name, ...: report and stop
    raise DataError(f"could not load Hugging Face dataset {spec!r}: {err}") from err
  return "\n".join(rows["text"]).encode("utf-8")


def load_corpus(paths: Sequence[str] | None, seq_len: int, val_fraction: float = 0.1) -> Corpus:
  """Read the corpus, tokenize to bytes and split off the validation tail.

  Args:
    paths: files/directories, or one ``hf:NAME[:CONFIG]``; ``None`` or empty
      means the built-in Python documentation corpus.
    seq_len: tokens per training window; both parts must hold one window.
    val_fraction: share of the corpus (its tail) held out for validation.
  """
  if not 0 < val_fraction < 1:
    raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}.")
  if not paths:
    name, text = BUILTIN_CORPUS, python_docs_text()
  elif len(paths) == 1 and paths[0].startswith("hf:"):
    name, text = paths[0], hf_text(paths[0][3:])
  else:
    name, text = ", ".join(paths), read_files(paths)
  tokens = np.frombuffer(text, np.uint8)
  n_val = int(len(tokens) * val_fraction)
  if min(n_val, len(tokens) - n_val) <= seq_len:
    raise DataError(
        f"corpus {name!r} has {len(tokens):,} bytes: too small for windows of "
        f"{seq_len} tokens in both the training and the {val_fraction:.0%} validation "
        f"part (needs more than {int((seq_len + 1) / min(val_fraction, 1 - val_fraction)):,} "
        "bytes); add text or lower --seq-len.")
  return Corpus(name, tokens[:-n_val], tokens[-n_val:])


def train_batch(tokens: np.ndarray, index: int, batch_size: int, seq_len: int,
                seed: int, rows: slice = slice(None)) -> np.ndarray:
  """Training batch number ``index``: random windows, a pure function of (seed, index).

  ``rows`` selects some of its rows, the same as slicing the whole batch (each
  process of a multi-process run makes only the rows its devices hold).
  """
  rng = np.random.default_rng([seed, index])
  starts = rng.integers(0, len(tokens) - seq_len + 1, batch_size)[rows]
  return np.stack([tokens[s:s + seq_len] for s in starts]).astype(np.int32)


def val_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                max_batches: int) -> list[np.ndarray]:
  """Fixed validation batches: non-overlapping windows spread over the whole split."""
  n_windows = min(len(tokens) // seq_len, batch_size * max_batches)
  n_windows -= n_windows % batch_size if n_windows >= batch_size else 0
  starts = np.linspace(0, len(tokens) - seq_len, n_windows).astype(np.int64)
  windows = np.stack([tokens[s:s + seq_len] for s in starts]).astype(np.int32)
  return [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
