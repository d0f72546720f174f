"""The loop's step metrics without a run (launch/run/step_metrics.py): the clock leaves out the step after a
reset, the guard counts skips and raises with the last good checkpoint, the reader reads one step late."""

import math

import pytest

from configs.smoke import get_config
from launch.run import step_metrics
from launch.run.config import validate, with_overrides
from launch.run.errors import NonFiniteError
from launch.run.step_metrics import MetricsReader, NonFiniteGuard, StepClock


@pytest.fixture
def now(monkeypatch):
  """A settable time.perf_counter for step_metrics."""
  clock = {"t": 0.0}
  monkeypatch.setattr(step_metrics.time, "perf_counter", lambda: clock["t"])
  return clock


def train_section(**changes):
  return validate(with_overrides(get_config(), {f"train.{k}": v for k, v in changes.items()})).train


def test_clock_times_steps_between_resets_and_not_the_first_after_one(now):
  clock = StepClock()
  assert clock.lap() is None and math.isnan(clock.median())
  for t in (10.0, 11.0, 13.0):  # the first tick (a compile) only starts the clock
    now["t"] = t
    clock.tick()
  assert clock.lap() == 1.5
  clock.reset()  # e.g. a save
  for t in (100.0, 104.0):
    now["t"] = t
    clock.tick()
  assert clock.lap() == 4.0 and clock.lap() is None
  assert clock.median() == 2.75


def test_guard_counts_skipped_steps_and_stops_at_the_limit_in_a_row():
  said = []
  guard = NonFiniteGuard(train_section(nonfinite="skip_step", nonfinite_skip_limit=2), lambda: "step 4 in D",
                         said.append)
  bad = lambda: {"loss": float("nan"), "grad_norm": 1.0, "nonfinite": 1.0}
  values = bad()
  guard.check(5, values)
  assert "nonfinite" not in values and guard.skipped == 1
  assert said == ["step 5: loss=nan, grad_norm=1 is not finite: update skipped "
                  "(train.nonfinite=skip_step; 1 in a row, 1 in all)."]
  guard.check(6, {"loss": 2.0, "grad_norm": 1.0, "nonfinite": 0.0})  # a finite step ends the run of skips
  guard.check(7, bad())
  with pytest.raises(NonFiniteError, match=r"^step 8: .* made 2 non-finite steps in a row .* "
                                           r"Last good checkpoint: step 4 in D\."):
    guard.check(8, bad())
  assert guard.skipped == 3


def test_guard_under_stop_raises_at_the_first_nonfinite_step():
  guard = NonFiniteGuard(train_section(), lambda: "none in D", None)
  guard.check(1, {"loss": 2.0, "grad_norm": 1.0, "nonfinite": 0.0})
  with pytest.raises(NonFiniteError, match=r"is not finite \(train.nonfinite=stop\)"):
    guard.check(2, {"loss": 2.0, "grad_norm": float("inf"), "nonfinite": 1.0})


class Logger:
  def __init__(self):
    self.logged = []

  def log(self, step, values):
    self.logged.append((step, values))


def test_reader_reads_each_step_one_step_late_and_logs_every_log_every(now, monkeypatch):
  monkeypatch.setattr(step_metrics.throughput_lib, "throughput",
                      lambda plan, step_time: {"tokens_per_s": 8 / step_time, "mfu": 0.5})
  logger = Logger()
  reader = MetricsReader(None, logger, StepClock(), NonFiniteGuard(train_section(), str, None), log_every=3,
                         start_step=0)
  seen = []
  for step in range(1, 5):
    now["t"] = float(step)
    reader.add(step, {"loss": 10.0 - step, "grad_norm": 1.0, "nonfinite": 0.0})
    seen.append(reader.last_loss)
  assert math.isnan(seen[0]) and seen[1:] == [9.0, 8.0, 7.0]  # step N's loss once step N + 1 is added
  assert [s for s, _ in logger.logged] == [1, 3]  # the first step, then every third; step 4 is still held
  assert "step_time_s" not in logger.logged[0][1]  # the first step's time is its compile
  assert logger.logged[1][1] == {"loss": 7.0, "grad_norm": 1.0, "perplexity": math.exp(7.0),
                                 "step_time_s": 1.0, "tokens_per_s": 8.0, "mfu": 0.5}
  now["t"] = 6.0
  reader.read_held(final=True)
  reader.read_held(final=True)  # nothing held: nothing read
  assert [s for s, _ in logger.logged] == [1, 3, 4] and reader.last_loss == 6.0
  assert logger.logged[2][1]["step_time_s"] == 2.0
