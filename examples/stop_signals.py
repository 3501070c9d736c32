"""SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) as requests to stop cleanly.

Inside ``with StopRequests() as stop:`` either signal only records itself in
``stop.signum``; the training loop looks at it after every step, saves a
checkpoint and stops. Outside, the previous handlers are back.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
  """Context manager: ``signum`` is the first stop signal received, else None."""

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> "StopRequests":
    if threading.current_thread() is threading.main_thread():  # where Python runs handlers
      self._previous = {s: signal.signal(s, self._request) for s in SIGNALS}
    return self

  def _request(self, signum: int, frame) -> None:
    del frame
    self.signum = self.signum or signum

  def __exit__(self, *exc_info) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
