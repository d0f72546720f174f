"""A background thread that keeps the next batches ready, so the device never waits on the host."""

import queue
import threading
from typing import Any, Iterator


class Prefetcher:
  """Wraps a checkpointable iterator; yields (batch, iterator state after that batch).

  The state travels with its batch, so a checkpoint records the position of the last batch the
  model consumed, not of the batches waiting in the queue.
  """

  def __init__(self, iterator, depth: int = 2):
    self.iterator = iterator
    self.queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self.thread = threading.Thread(target=self._fill, daemon=True)
    self.thread.start()

  def _fill(self) -> None:
    try:
      while not self._stop.is_set():
        batch = next(self.iterator)
        item = (batch, self.iterator.get_state())
        while not self._stop.is_set():
          try:
            self.queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # surfaced to the consumer, not lost in the thread
      self.queue.put(e)

  def __iter__(self) -> Iterator[tuple[Any, Any]]:
    return self

  def __next__(self) -> tuple[Any, Any]:
    item = self.queue.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    self._stop.set()
