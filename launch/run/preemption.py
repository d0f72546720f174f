"""SIGTERM handling: a preempted run saves at the next step boundary and exits cleanly."""

import signal
import threading


class StopRequest:
  """Set by SIGTERM; the train loop checks `requested` after each step."""

  def __init__(self):
    self._event = threading.Event()
    self.signal_name = None

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def request(self, signal_name: str = "request") -> None:
    self.signal_name = signal_name
    self._event.set()

  def install(self) -> "StopRequest":
    """Routes SIGTERM to `request` (only possible from the main thread; elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, lambda signum, frame: self.request("SIGTERM"))
    return self
