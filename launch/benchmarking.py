"""Shared pieces of the benchmark scripts: timing a compiled train step, and writing result tables."""

import csv
import dataclasses
import os
import statistics
import time

import jax
import numpy as np

from launch import train_state as ts
from launch.context import RunContext
from launch.step import batch_sharding, jit_train_step


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


def random_batch(ctx: RunContext, seed: int = 0) -> dict:
  """A global batch of random tokens placed on the mesh (benchmarks need no corpus)."""
  cfg = ctx.cfg
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.model.vocab_size, (cfg.train.global_batch_size, cfg.data.seq_len + 1))
  tokens = tokens.astype(np.int32)
  sharding = batch_sharding(ctx.mesh, ctx.rules)
  return {"inputs": jax.device_put(tokens[:, :-1], sharding), "targets": jax.device_put(tokens[:, 1:], sharding)}


def time_train_step(ctx: RunContext, steps: int = 5, warmup: int = 2, step_fn=None) -> StepTiming:
  """Times the jitted train step: compile and `warmup` steps excluded, then `steps` timed steps.

  Each timed step is waited for (block_until_ready) so a step's time is its own.
  """
  state = ts.init_train_state(ctx.mdef, ctx.tx, ctx.shardings, seed=0)
  step_fn = step_fn or jit_train_step(ctx.mdef, ctx.tx, ctx.schedule, ctx.cfg.train.grad_accum_steps,
                                      ctx.mesh, ctx.rules, ctx.shardings)
  batch = random_batch(ctx)
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


def write_table(rows: list[dict], out_dir: str, name: str, title: str, command: str,
                notes: str = "") -> str:
  """Writes rows as <out_dir>/<name>.csv and .md (with the command that made them); returns the Markdown."""
  os.makedirs(out_dir, exist_ok=True)
  columns = list(rows[0])
  with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = [f"# {title}", "", f"Command: `{command}`", "", "| " + " | ".join(columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
  markdown = "\n".join(lines) + "\n" + (f"\n{notes}\n" if notes else "")
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(markdown)
  return markdown
