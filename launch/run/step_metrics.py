"""What the training loop does with each finished step's metrics: read them one step late, stop or skip
at a non-finite one (train.nonfinite), time the steps, log them every train.log_every steps.

launch/run/loop.py makes one StepClock, one NonFiniteGuard and one MetricsReader per run.
"""

import math
import time
from collections.abc import Callable

import jax
import numpy as np

from launch.run import throughput as throughput_lib
from launch.run.errors import NonFiniteError
from launch.run.logger import MetricLogger
from launch.run.sections import TrainConfig


class StepClock:
  """Seconds per training step, timed between resets so that compilation, evaluation and saving are not
  counted (the loop calls `reset()` after each eval and save).

  `tick()` once per finished step, when its metrics reach the host: the first tick after a reset only
  starts the clock, since that step waited on a compile, an eval or a save. `lap()` returns the mean
  seconds per step ticked since the last lap (None when no step was timed) and starts a new lap;
  `median()` is the median of all laps (NaN before the first).
  """

  def __init__(self):
    self._start = None
    self._last_tick = None
    self._steps = 0
    self._laps = []

  def reset(self) -> None:
    self._start, self._steps = None, 0

  def tick(self) -> None:
    self._last_tick = time.perf_counter()
    if self._start is None:
      self._start = self._last_tick
    else:
      self._steps += 1

  def lap(self) -> float | None:
    if not self._steps:
      return None
    step_time = (self._last_tick - self._start) / self._steps
    self._laps.append(step_time)
    self._start, self._steps = self._last_tick, 0
    return step_time

  def median(self) -> float:
    return float(np.median(self._laps)) if self._laps else float("nan")


class NonFiniteGuard:
  """train.nonfinite applied to a finished step's metrics.

  Takes the run's train section, `last_good()` (the Checkpointer's, named in the error) and `say(line)`
  (prints above the progress bar; None on processes that print nothing). `check(step, values)` pops
  values["nonfinite"] (1.0 when the step's loss or grad norm was NaN or inf) and raises NonFiniteError
  under train.nonfinite=stop, or under skip_step once train.nonfinite_skip_limit such steps came in a
  row; a skipped step is said and counted in `skipped` (every skipped step of the run).
  """

  def __init__(self, train: TrainConfig, last_good: Callable[[], str], say: Callable[[str], None] | None):
    self.train = train
    self.skips = train.nonfinite == "skip_step"
    self.skipped = 0
    self._in_a_row = 0
    self._last_good = last_good
    self._say = say

  def check(self, step: int, values: dict[str, float]) -> None:
    if not values.pop("nonfinite", 0.0):
      self._in_a_row = 0
      return
    self._in_a_row += 1
    self.skipped += 1
    seen = f"step {step}: loss={values['loss']:.4g}, grad_norm={values['grad_norm']:.4g}"
    limit = self.train.nonfinite_skip_limit
    if self.skips and self._in_a_row < limit:
      if self._say is not None:
        self._say(f"{seen} is not finite: update skipped (train.nonfinite=skip_step; "
                  f"{self._in_a_row} in a row, {self.skipped} in all).")
      return
    why = (f"made {limit} non-finite steps in a row (train.nonfinite=skip_step, "
           f"train.nonfinite_skip_limit={limit})" if self.skips else "is not finite (train.nonfinite=stop)")
    raise NonFiniteError(
        f"{seen} {why}; the run stopped without saving that state. Last good checkpoint: "
        f"{self._last_good()}. Lower --config.train.learning_rate (now {self.train.learning_rate:g}) "
        "or raise --config.train.warmup_steps, or set --config.train.nonfinite=skip_step to drop such "
        "steps; then continue with --resume.")


class MetricsReader:
  """Reads each train step's metrics one step late, so the host never waits on the device.

  `add(step, device_metrics)`, with the step just dispatched, reads the step before it (by then the
  device has moved on) and holds this one; `read_held(final)` reads the held step now (the loop does
  before an eval or a save, so that a non-finite step is never saved). Reading a step fetches its
  metrics, checks them (`guard`), ticks `clock`, and logs them (with perplexity, and step time,
  tokens/s and MFU of the plan when the clock timed steps) at every log_every-th step, the first step
  of the run and a final one. `last_loss` is the loss of the newest step read (NaN before any).
  """

  def __init__(self, plan, logger: MetricLogger, clock: StepClock, guard: NonFiniteGuard, *,
               log_every: int, start_step: int):
    self.plan = plan
    self.logger = logger
    self.clock = clock
    self.guard = guard
    self.log_every = log_every
    self.start_step = start_step
    self.last_loss = float("nan")
    self._held = None  # (step, device metrics) not yet read

  def add(self, step: int, device_metrics) -> None:
    if self._held is not None:
      self._read(*self._held)
    self._held = (step, device_metrics)

  def read_held(self, final: bool = False) -> None:
    if self._held is not None:
      self._read(*self._held, final=final)
      self._held = None

  def _read(self, step: int, device_metrics, final: bool = False) -> None:
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    self.guard.check(step, values)
    if self.guard.skips:
      values["skipped_steps"] = self.guard.skipped
    self.clock.tick()
    self.last_loss = values["loss"]
    if step % self.log_every and not final and step != self.start_step + 1:
      return
    values["perplexity"] = math.exp(min(values["loss"], 50.0))
    step_time = self.clock.lap()
    if step_time is not None:
      speed = throughput_lib.throughput(self.plan, step_time)
      values.update(step_time_s=step_time, tokens_per_s=speed["tokens_per_s"], mfu=speed["mfu"])
    self.logger.log(step, values)
