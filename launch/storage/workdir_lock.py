"""One run per workdir: a lock file naming its holder (host and pid), taken at start, removed at exit.

Two runs writing one workdir would overwrite each other's checkpoints and interleave their metrics,
so the second one stops at once and names the first. A lock left by a process that died (SIGKILL,
power loss) is recognised when its pid no longer runs on this host, and taken over with a note. A
lock from another host cannot be checked from here: the message says which file to delete if that
run is gone. In a multi-process run only process 0 takes the lock; the others learn its outcome.
A workdir in a bucket (gs://) gets a lock object instead (launch/storage/bucket_lock.py: create-if-absent
with a heartbeat, and its own stale rule).
"""

import json
import os
import socket
import time

import jax
import numpy as np

from launch.run.errors import WorkdirLocked
from launch.storage import paths

LOCK_NAME = "run.lock"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # it exists, under another user
    return True
  return True


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}  # being written this instant, or truncated: treat as unknown holder


class WorkdirLock:
  """The lock on `workdir`; `acquire()` then `release()` (or use it as a context manager)."""

  def __init__(self, workdir: str):
    self.path = paths.join(paths.normalize(workdir), LOCK_NAME)
    self.held = False
    self.bucket_lock = None
    if paths.is_url(self.path) and jax.process_index() == 0:
      from launch.storage.bucket_lock import BucketLock
      self.bucket_lock = BucketLock(self.path)

  def _try_create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)
    return True

  def _acquire_here(self) -> str | None:
    """Takes the lock from this process; returns a note if a stale one was taken over."""
    if self.bucket_lock is not None:
      return self.bucket_lock.acquire_here()
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    if self._try_create():
      return None
    holder = _read(self.path)
    host, pid = holder.get("host"), holder.get("pid")
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
      moved = self.path + f".stale.{os.getpid()}"
      try:
        os.replace(self.path, moved)  # atomic: of two takers, one moves the dead holder's file
        if _read(moved).get("pid") != pid:  # we moved a newer taker's lock instead: put it back
          try:
            os.link(moved, self.path)
          except FileExistsError:
            pass
        os.remove(moved)
      except FileNotFoundError:
        pass
      if self._try_create():
        return f"note: took over the lock {self.path} left by pid {pid} on {host}, which is no longer running."
      holder = _read(self.path)
      host, pid = holder.get("host"), holder.get("pid")
    raise WorkdirLocked(
        f"the workdir {os.path.dirname(self.path)} is in use by pid {pid} on host {host} (lock file "
        f"{self.path}); wait for that run to end, or choose another --workdir. If that run is gone "
        "(e.g. its host died), delete the lock file.")

  def acquire(self) -> None:
    """Takes the lock (process 0) or raises WorkdirLocked naming the holder, on every process."""
    error = None
    if jax.process_index() == 0:
      try:
        note = self._acquire_here()
        self.held = True
        if note:
          print(note, flush=True)
      except WorkdirLocked as e:
        error = e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
      if not int(ok) and error is None:
        error = WorkdirLocked(f"the workdir {paths.dirname(self.path)} is in use by another run "
                              "(process 0 could not take its lock; see its message).")
    if error is not None:
      raise error

  def release(self) -> None:
    """Removes the lock if this process holds it (and it still names this process)."""
    if self.bucket_lock is not None:
      self.bucket_lock.release()
    elif self.held and _read(self.path).get("pid") == os.getpid():
      os.remove(self.path)
    self.held = False

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
