"""Shared pieces of the benchmark scripts: timing a compiled train step, and writing result tables."""

import csv
import dataclasses
import os
import statistics
import time

import jax
import numpy as np

from launch import hardware
from launch import train_state as ts
from launch.config import Config
from launch.context import RunContext, build_context
from launch.memory_report import compile_train_step
from launch.step import batch_sharding, jit_train_step
from lm import flops


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


def variant(cfg: Config, dtype: str, rules: str | None = None, mesh: dict | None = None,
            num_devices: int = 1) -> Config:
  model = dataclasses.replace(cfg.model, dtype=dtype)
  mesh_cfg = dataclasses.replace(cfg.mesh, num_devices=num_devices, rules=rules or cfg.mesh.rules,
                                 **(mesh or dict(data=1, fsdp=1, tensor=1)))
  return dataclasses.replace(cfg, model=model, mesh=mesh_cfg)


_PEAKS: dict = {}


def peak_for(cfg: Config, devices) -> tuple[float, str]:
  """Peak FLOP/s of `devices` in the config's dtype, measured once per dtype and device count."""
  key = cfg.model.dtype  # one peak per dtype, so every row of a run is divided by the same number
  if key not in _PEAKS:
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    shape = (tokens, cfg.model.d_model, max(cfg.model.mlp_dim, cfg.model.vocab_size))
    _PEAKS[key] = hardware.peak_flops(cfg.model.dtype, shape, devices)
  return _PEAKS[key]


def bench_row(label: str, cfg: Config, steps: int, warmup: int, profile_dir: str | None = None):
  """Times one configuration; returns (row dict, compiled step)."""
  ctx = build_context(cfg)
  compiled, _ = compile_train_step(ctx)
  timing = time_train_step(ctx, steps=steps, warmup=warmup, step_fn=compiled)
  tokens = cfg.train.global_batch_size * cfg.data.seq_len
  model_flops = flops.train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens
  peak, source = peak_for(cfg, list(ctx.mesh.devices.flat))
  row = {"config": label, "devices": ctx.num_devices,
         "mesh": "x".join(f"{k}{v}" for k, v in ctx.mesh.shape.items() if v > 1) or "1",
         "dtype": cfg.model.dtype, "step_s": timing.median_s, "spread": timing.spread,
         "tokens_per_s": tokens / timing.median_s, "model_tflops": model_flops / timing.median_s / 1e12,
         "peak_tflops": peak / 1e12, "mfu": model_flops / timing.median_s / peak, "peak_source": source}
  print(f"{label:28s} {row['devices']} dev {row['dtype']:9s} step {timing.median_s * 1e3:8.1f} ms "
        f"(spread {timing.spread:.0%})  {row['tokens_per_s']:9.0f} tok/s  {row['model_tflops']:.3f} TFLOP/s  "
        f"MFU {row['mfu']:.1%} of {source}")
  if profile_dir:
    state = ts.init_train_state(ctx.mdef, ctx.tx, ctx.shardings, seed=0)
    batch = random_batch(ctx)
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for _ in range(3):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
  return row, compiled


def profile_markdown(summary: dict, label: str) -> str:
  lines = [f"## Where the step's time goes: {label}", "",
           "| kind | share of op time |", "|---|---|"]
  lines += [f"| {kind} | {share:.1%} |" for kind, share in summary["share"].items()]
  lines += ["", "| top ops | kind | ms (3 steps, summed over threads) | share |", "|---|---|---|---|"]
  lines += [f"| {op} | {kind} | {us / 1e3:.1f} | {share:.1%} |" for op, kind, us, share in summary["top_ops"]]
  return "\n".join(lines) + "\n"
