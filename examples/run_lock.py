"""One writer per run directory: a lock file that names the process holding it.

``RunLock(directory)`` takes an exclusive ``flock`` on ``<directory>/run.lock``
and writes this process's PID and host into it. A second run into the same
directory is refused with :class:`LockError` naming the holder. The kernel
drops the lock when its process ends, however it ends, so a lock file left
by a run that crashed or was killed is stale: it is detected (the file is
there, its lock is not held) and taken over.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import socket
import time

LOCK_FILE = "run.lock"


class LockError(RuntimeError):
  """Another live process is writing to the run directory."""


class RunLock:
  """Context manager holding the lock of one run directory.

  ``stale_holder`` describes the holder of a stale lock that was taken over
  (``"PID 123 on host h, since ..."``), else it is None.
  """

  def __init__(self, directory: str | pathlib.Path):
    self.path = pathlib.Path(directory) / LOCK_FILE
    self.stale_holder: str | None = None
    self._fd: int | None = None

  def __enter__(self) -> "RunLock":
    self.path.parent.mkdir(parents=True, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _describe(os.read(fd, 4096))
        os.close(fd)
        raise LockError(
            f"{self.path.parent} is in use by another run ({holder}; lock file {self.path}). "
            "Wait for it to finish, or choose another --out-dir.") from None
      try:
        same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:  # its holder released it while we waited
        same_file = False
      if same_file:
        break
      os.close(fd)  # the file was replaced: lock the new one
    previous = os.read(fd, 4096)
    self.stale_holder = _describe(previous) if previous.strip() else None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc_info) -> None:
    self.path.unlink(missing_ok=True)
    os.close(self._fd)
    self._fd = None


def _describe(content: bytes) -> str:
  """``"PID 123 on host h, since ..."`` from a lock file's content."""
  try:
    holder = json.loads(content)
    return f"PID {holder['pid']} on host {holder['host']}, since {holder['since']}"
  except (ValueError, KeyError, TypeError):
    return "an unknown process"
