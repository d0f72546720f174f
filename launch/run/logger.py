"""Progress and metrics for long runs: a console bar with ETA, JSON lines, TensorBoard, a loss plot."""

import json
import os
import sys

from tqdm import tqdm


class MetricLogger:
  """Writes each logged step to <workdir>/metrics.jsonl and TensorBoard; shows a progress bar.

  Only the primary process (process 0) writes or prints.
  """

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, tensorboard: bool,
               primary: bool = True):
    self.primary = primary
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.writer = None
    self.bar = None
    if not primary:
      return
    os.makedirs(workdir, exist_ok=True)
    if tensorboard:
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

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None:
      self.writer.close()


def _fmt(value: float) -> str:
  value = float(value)
  return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def read_metrics(workdir: str) -> list[dict]:
  """Returns the records of <workdir>/metrics.jsonl in order (the last record wins for a repeated step)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(workdir: str, out_path: str | None = None) -> str:
  """Draws training loss (and validation loss where logged) against step into a PNG; returns its path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = read_metrics(workdir)
  out_path = out_path or os.path.join(workdir, "loss_curve.png")
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
  fig.savefig(out_path, dpi=120)
  plt.close(fig)
  return out_path
