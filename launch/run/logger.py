"""Progress and metrics for long runs: a console bar with ETA, JSON lines, TensorBoard, a loss plot.

A local workdir gets <workdir>/metrics.jsonl (appended) and tensorboard/; a workdir in a bucket gets
immutable objects per flush period instead (launch/storage/metric_chunks.py), and `read_metrics` reads both.
"""

import io
import json
import os
import sys

from tqdm import tqdm

from launch.storage import paths
from launch.storage.metric_chunks import ChunkWriter, read_chunks


class MetricLogger:
  """Writes each logged step to <workdir>/metrics.jsonl and TensorBoard; shows a progress bar.

  Only the primary process (process 0) writes or prints. In a bucket (a gs:// workdir) records and
  scalars are buffered and written per flush period (`flush()`: the loop calls it at each save).
  """

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, tensorboard: bool,
               primary: bool = True):
    self.primary = primary
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.writer = None
    self.chunks = None
    self.bar = None
    if not primary:
      return
    if paths.is_url(workdir):
      self.chunks = ChunkWriter(workdir, tensorboard=tensorboard)
    else:
      os.makedirs(workdir, exist_ok=True)
    if tensorboard and self.chunks is None:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                    dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

  def advance(self, steps: int = 1) -> None:
    if self.bar is not None:
      self.bar.update(steps)

  def log(self, step: int, metrics: dict[str, float], echo: bool = True) -> None:
    """Records `metrics` at `step`; with `echo`, also prints one line above the bar."""
    if not self.primary:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    if self.chunks is not None:
      self.chunks.add(record, metrics)
    else:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if self.writer is not None:
      for key, value in metrics.items():
        self.writer.add_scalar(key, float(value), step)
    if self.bar is not None and "loss" in metrics:
      self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
    if echo:
      text = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
      (self.bar.write if self.bar else print)(f"step {step:>6d} | {text}")

  def flush(self) -> None:
    """Writes what a bucket workdir has buffered as new objects (local files are written at once)."""
    if self.chunks is not None:
      self.chunks.flush()

  def close(self) -> None:
    """Closes the bar and writes out everything still buffered."""
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None:
      self.writer.close()
    if self.chunks is not None:
      self.chunks.close()


def _fmt(value: float) -> str:
  value = float(value)
  return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def read_metrics(workdir: str) -> list[dict]:
  """Returns the records of <workdir>/metrics.jsonl, then of its metrics/ chunks (a run in a bucket), in
  order (the last record wins for a repeated step)."""
  records = []
  path = paths.join(workdir, "metrics.jsonl")
  if paths.exists(path):
    records = [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]
  return records + read_chunks(workdir)


def plot_loss_curve(workdir: str, out_path: str | None = None) -> str:
  """Draws training loss (and validation loss where logged) against step into a PNG; returns its path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = read_metrics(workdir)
  out_path = out_path or paths.join(workdir, "loss_curve.png")
  train = {r["step"]: r["loss"] for r in records if "loss" in r}
  val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
  fig, ax = plt.subplots(figsize=(7, 4))
  if train:
    steps = sorted(train)
    ax.plot(steps, [train[s] for s in steps], label="train loss")
  if val:
    steps = sorted(val)
    ax.plot(steps, [val[s] for s in steps], "o-", label="validation loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  image = io.BytesIO()
  fig.savefig(image, format="png", dpi=120)
  plt.close(fig)
  paths.write_bytes(out_path, image.getvalue())
  return out_path
