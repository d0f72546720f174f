"""Metrics and TensorBoard events on object storage, where nothing can be appended to an object.

A run in a bucket buffers its metric records and TensorBoard scalars on the host and, once per flush
period (each checkpoint save, at most FLUSH_EVERY_S apart, and at exit), writes them as new,
immutable objects, as MaxText does:

  <workdir>/metrics/<first step, 10 digits>-<unix ms>.jsonl     the records of that period, JSON lines
  <workdir>/tensorboard/events.out.tfevents.<time>.<host>.<n>   a complete event file of that period

Names sort by step, then time, so a reader that concatenates them in name order gets the records in
the order they were written, a restarted run's included. TensorBoard reads every event file of a
directory, so the period files together are the run's curves. A killed run loses at most the records
since its last flush, never an earlier one.
"""

import json
import os
import shutil
import tempfile
import time

from launch.storage import paths

METRICS_DIR = "metrics"
TENSORBOARD_DIR = "tensorboard"
FLUSH_EVERY_S = 60.0


class ChunkWriter:
  """Buffers records and scalars for `workdir` (a URL) and writes each flush period as new objects."""

  def __init__(self, workdir: str, *, tensorboard: bool):
    self.workdir = workdir
    self.tensorboard = tensorboard
    self.records: list[dict] = []
    self.scalars: list[tuple[str, float, int]] = []
    self.last_flush = time.monotonic()
    self.flushes = 0
    self._staging = tempfile.mkdtemp(prefix="shardlm-tb-")  # one event file per period, then uploaded

  def add(self, record: dict, scalars: dict[str, float] | None = None) -> None:
    """Buffers one metrics record (with "step") and, for TensorBoard, its scalars; flushes when due."""
    self.records.append(record)
    if self.tensorboard and scalars:
      self.scalars.extend((k, float(v), int(record["step"])) for k, v in scalars.items())
    if time.monotonic() - self.last_flush >= FLUSH_EVERY_S:
      self.flush()

  def flush(self) -> None:
    """Writes the buffered records (one metrics object) and scalars (one event file); no-op when empty."""
    self.last_flush = time.monotonic()
    stamp = f"{int(time.time() * 1000):013d}"
    if self.records:
      name = f"{self.records[0]['step']:010d}-{stamp}.jsonl"
      paths.write_text(paths.join(self.workdir, METRICS_DIR, name),
                       "".join(json.dumps(r) + "\n" for r in self.records))
      self.records = []
    if self.scalars:
      self._write_events()
      self.scalars = []
    self.flushes += 1

  def _write_events(self) -> None:
    from tensorboardX import SummaryWriter
    local = tempfile.mkdtemp(dir=self._staging)
    writer = SummaryWriter(local, filename_suffix=f".{os.getpid()}.{self.flushes}")
    for key, value, step in self.scalars:
      writer.add_scalar(key, value, step)
    writer.close()
    for name in os.listdir(local):
      with open(os.path.join(local, name), "rb") as f:
        paths.write_bytes(paths.join(self.workdir, TENSORBOARD_DIR, name), f.read())
    shutil.rmtree(local, ignore_errors=True)

  def close(self) -> None:
    """Flushes what is buffered and removes the local staging directory."""
    try:
      self.flush()
    finally:
      shutil.rmtree(self._staging, ignore_errors=True)


def read_chunks(workdir: str) -> list[dict]:
  """The records of every metrics object under <workdir>/metrics/, in name (step, then time) order."""
  directory = paths.join(workdir, METRICS_DIR)
  if not paths.isdir(directory):
    return []
  records = []
  for name in paths.listdir(directory):
    if name.endswith(".jsonl"):
      text = paths.read_text(paths.join(directory, name))
      records.extend(json.loads(line) for line in text.splitlines() if line.strip())
  return records
