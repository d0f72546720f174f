"""Timing: a compiled train step on random tokens (compile and warm-up excluded, median of the timed
steps), and any callable (`time_calls`, `call_seconds`, `time_interleaved`), the loop every measure uses."""

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

from launch.run.throughput import throughput
from launch.run import state as ts
from launch.run.config import Config
from launch.run.plan import RunPlan, make_plan
from launch.measure.memory import compile_train_step
from launch.run import programs
from launch.run.step import batch_sharding


@dataclasses.dataclass
class StepTiming:
  compile_s: float          # first call: trace + compile + one step
  median_s: float
  min_s: float
  max_s: float
  steps: int

  @property
  def spread(self) -> float:
    """(max - min) / median of the timed steps."""
    return (self.max_s - self.min_s) / self.median_s


def random_batch(plan: RunPlan, seed: int = 0) -> dict:
  """A global batch of random tokens placed on the mesh (benchmarks need no corpus): {"inputs",
  "targets", "segment_ids"}, each int32 [global_batch, seq_len]."""
  cfg = plan.cfg
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.model.vocab_size, (cfg.train.global_batch_size, cfg.data.seq_len + 1))
  tokens = tokens.astype(np.int32)
  sharding = batch_sharding(plan.mesh, plan.rules)
  # One document per row (all-zero segment ids): the step still builds and applies the segment mask.
  segment_ids = np.zeros((cfg.train.global_batch_size, cfg.data.seq_len), np.int32)
  return {"inputs": jax.device_put(tokens[:, :-1], sharding), "targets": jax.device_put(tokens[:, 1:], sharding),
          "segment_ids": jax.device_put(segment_ids, sharding)}


def time_train_step(plan: RunPlan, steps: int = 5, warmup: int = 2, step_fn=None) -> StepTiming:
  """Times the jitted train step: compile and `warmup` steps excluded, then `steps` timed steps.

  Each timed step is waited for (block_until_ready) so a step's time is its own.
  """
  state = ts.init_train_state(plan.mdef, plan.tx, plan.shardings, seed=0)
  step_fn = step_fn or programs.train_step(plan)
  batch = random_batch(plan)
  start = time.perf_counter()
  state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return StepTiming(compile_s, statistics.median(times), min(times), max(times), steps)


def train_step_runner(plan: RunPlan) -> Callable[[], None]:
  """A zero-argument function that runs one jitted train step of plan's model on random tokens and waits
  for it (the state carries over from call to call); the first call compiles."""
  step_fn = programs.train_step(plan)
  batch = random_batch(plan)
  holder = [ts.init_train_state(plan.mdef, plan.tx, plan.shardings, seed=0)]

  def run() -> None:
    holder[0], metrics = step_fn(holder[0], batch)
    jax.block_until_ready(metrics)
  return run


def call_seconds(fn: Callable[[], Any]) -> float:
  """Wall seconds of one call of `fn` (no arguments), waiting for whatever it returns
  (`jax.block_until_ready`; None and Python values are fine) so the time includes the device's work."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
  """Times one workload: `warmup` untimed calls of `fn` (compile, caches), then `repeats` timed ones.

  Returns the seconds of each timed call (`call_seconds`: each waited for), for the caller's median
  or best.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  return [call_seconds(fn) for _ in range(repeats)]


def time_interleaved(runs: dict[str, Callable[[], None]], rounds: int = 7,
                     warmup: int = 2) -> dict[str, list[float]]:
  """Times several workloads against each other: `warmup` untimed calls of each (compiles), then
  `rounds` rounds that call every workload once, in turn. Returns {name: [seconds per round]}.

  Interleaving puts each round's calls under the same background load, so the ratio of two
  workloads within a round (and the median of those ratios) is steadier on a shared machine than
  the ratio of medians taken minutes apart.
  """
  for run in runs.values():
    time_calls(run, repeats=0, warmup=warmup)
  times = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      times[name].append(call_seconds(run))
  return times


def median_ratio(times: list[float], reference: list[float]) -> float:
  """The median over rounds of times[i] / reference[i] (both from one `time_interleaved` call)."""
  return statistics.median(t / r for t, r in zip(times, reference, strict=True))


def mesh_label(plan: RunPlan) -> str:
  """'fsdp2xtensor4' for a mesh's axes larger than 1 ('1' for a single device)."""
  return "x".join(f"{k}{v}" for k, v in plan.mesh.shape.items() if v > 1) or "1"


def variant(cfg: Config, dtype: str, rules: str | None = None, mesh: dict | None = None,
            num_devices: int = 1) -> Config:
  """`cfg` with compute `dtype`, rule preset `rules` and mesh axis sizes `mesh` on `num_devices` devices."""
  model = dataclasses.replace(cfg.model, dtype=dtype)
  mesh_cfg = dataclasses.replace(cfg.mesh, num_devices=num_devices, rules=rules or cfg.mesh.rules,
                                 **(mesh or dict(data=1, fsdp=1, sequence=1, tensor=1)))
  return dataclasses.replace(cfg, model=model, mesh=mesh_cfg)


def bench_row(label: str, cfg: Config, steps: int, warmup: int, profile_dir: str | None = None):
  """Times one configuration (and with `profile_dir` traces 3 more steps); returns (row dict, compiled step).

  The row: config, devices, mesh, dtype, attention (the implementation that ran), remat, step_s
  (median), spread, tokens_per_s, model_tflops, peak_tflops, mfu, peak_source (launch.run.throughput),
  peak_GiB (the first device's allocator peak so far in this process; "" where the backend has none).
  """
  plan = make_plan(cfg)
  compiled, _ = compile_train_step(plan)
  timing = time_train_step(plan, steps=steps, warmup=warmup, step_fn=compiled)
  speed = throughput(plan, timing.median_s)
  cfg = plan.cfg
  stats = plan.mesh.devices.flat[0].memory_stats() or {}
  peak_bytes = stats.get("peak_bytes_in_use")
  row = {"config": label, "devices": plan.num_devices, "mesh": mesh_label(plan),
         "dtype": cfg.model.dtype, "attention": plan.attention.training.implementation, "remat": cfg.model.remat,
         "step_s": timing.median_s, "spread": timing.spread,
         "tokens_per_s": speed["tokens_per_s"], "model_tflops": speed["model_tflops"],
         "peak_tflops": speed["peak_tflops"], "mfu": speed["mfu"], "peak_source": speed["peak_source"],
         "peak_GiB": peak_bytes / 2**30 if peak_bytes else ""}
  print(f"{label:28s} {row['devices']} dev {row['dtype']:9s} step {timing.median_s * 1e3:8.1f} ms "
        f"(spread {timing.spread:.0%})  {row['tokens_per_s']:9.0f} tok/s  {row['model_tflops']:.3f} TFLOP/s  "
        f"MFU {row['mfu']:.1%} of {row['peak_source']}")
  if profile_dir:
    state = ts.init_train_state(plan.mdef, plan.tx, plan.shardings, seed=0)
    batch = random_batch(plan)
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for _ in range(3):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
  return row, compiled
