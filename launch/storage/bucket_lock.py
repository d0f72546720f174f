"""The workdir lock in a bucket: an object created only if absent, kept fresh by a heartbeat.

Object storage has no O_EXCL, but GCS honours the precondition `if_generation_match=0` ("create only
if no such object exists"), so of two runs creating <workdir>/run.lock exactly one succeeds; the other
reads the holder (host, pid, start time) and stops naming it. The holder rewrites the object every
HEARTBEAT_S seconds (conditional on its own generation, so it never overwrites a newer holder).

Stale-lock rule: a lock whose last write (the object's `updated` time, the server's clock) is older
than STALE_S seconds, or that names a pid on this very host that no longer runs, belongs to a run
that is gone, and is taken over with a note. The takeover deletes only the generation it read, so
of two runs taking over one stale lock, one wins.
"""

import json
import os
import socket
import threading
import time
from datetime import datetime, timezone

from launch.run.errors import RunError, WorkdirLocked
from launch.storage import bucket as bucket_lib
from launch.storage import paths

HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats


def _alive_here(pid) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class BucketLock:
  """The lock object at `url` (<workdir>/run.lock); `acquire()` raises WorkdirLocked naming the holder."""

  def __init__(self, url: str):
    self.url = url
    self.blob = bucket_lib.client().bucket(paths.bucket_of(url)).blob(paths.object_name(url))
    self.generation = None
    self.since = None
    self._stop = threading.Event()
    self._thread = None

  def _body(self) -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": self.since,
                       "heartbeat": time.time()})

  def _create(self) -> bool:
    """Creates the lock object if absent; True when this call created it."""
    from google.api_core import exceptions as api
    self.since = time.time()
    try:
      self.blob.upload_from_string(self._body(), content_type="application/json", if_generation_match=0,
                                   timeout=bucket_lib.TIMEOUT_S)
    except api.PreconditionFailed:
      return False
    self.generation = self.blob.generation
    return True

  def _holder(self):
    """(holder dict, generation, seconds since its last write), or None when the lock vanished."""
    from google.api_core import exceptions as api
    try:
      blob = self.blob.bucket.get_blob(self.blob.name, timeout=bucket_lib.TIMEOUT_S)
      if blob is None:
        return None
      try:
        holder = json.loads(blob.download_as_bytes(if_generation_match=blob.generation))
      except ValueError:
        holder = {}
    except api.NotFound:
      return None
    except api.PreconditionFailed:  # rewritten between the two reads: the holder is alive
      return {}, None, 0.0
    age = (datetime.now(timezone.utc) - blob.updated).total_seconds() if blob.updated else 0.0
    return holder, blob.generation, age

  def acquire_here(self) -> str | None:
    """Takes the lock from this process; returns a note when a stale one was taken over."""
    from google.api_core import exceptions as api
    for _ in range(3):  # a lock that vanishes between our create and our read: try again
      if self._create():
        self._start_heartbeat()
        return None
      found = self._holder()
      if found is None:
        continue
      holder, generation, age = found
      host, pid = holder.get("host"), holder.get("pid")
      dead_here = host == socket.gethostname() and isinstance(pid, int) and not _alive_here(pid)
      if generation is None or not (dead_here or age > STALE_S):
        raise WorkdirLocked(
            f"the workdir {paths.dirname(self.url)} is in use by pid {pid} on host {host} (lock object "
            f"{self.url}, last heartbeat {age:.0f}s ago); wait for that run to end, or choose another "
            f"--workdir. A lock with no heartbeat for {STALE_S:.0f}s is taken over automatically; if that "
            "run is gone sooner, delete the lock object.")
      try:
        self.blob.delete(if_generation_match=generation, timeout=bucket_lib.TIMEOUT_S)
      except (api.PreconditionFailed, api.NotFound):
        continue  # another run took it over first; look again
      if self._create():
        self._start_heartbeat()
        why = "no longer running" if dead_here else f"silent for {age:.0f}s"
        return f"note: took over the lock {self.url} left by pid {pid} on {host}, {why}."
    raise RunError(f"could not take the lock {self.url}: it changed hands repeatedly; try again.")

  def _start_heartbeat(self) -> None:
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name="shardlm-lock-heartbeat", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        self.blob.upload_from_string(self._body(), content_type="application/json",
                                     if_generation_match=self.generation, timeout=bucket_lib.TIMEOUT_S)
        self.generation = self.blob.generation
      except Exception as e:  # noqa: BLE001 (a missed beat is retried at the next one)
        print(f"warning: could not refresh the lock {self.url}: {type(e).__name__}: {e}", flush=True)

  def release(self) -> None:
    """Stops the heartbeat and deletes the lock object if it is still the one this process wrote."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=bucket_lib.TIMEOUT_S)
    if self.generation is None:
      return
    from google.api_core import exceptions as api
    try:
      self.blob.delete(if_generation_match=self.generation, timeout=bucket_lib.TIMEOUT_S)
    except (api.PreconditionFailed, api.NotFound):
      pass  # taken over (we were silent too long): it is not ours to delete
    self.generation = None
