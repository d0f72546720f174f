"""Train-step speed: tokens/s, step time, model TFLOP/s and MFU, per configuration.

  python -m launch.bench --config configs/bench.py --dtypes float32,bfloat16 --presets \
      --out docs/results/bench [--profile /tmp/trace]

Times the jitted train step on random tokens: compile and warm-up excluded, then --steps timed steps
(median and spread). Model FLOPs come from lm/flops.py; the peak from launch/hardware.py (the chip's
spec sheet, or on CPU a matmul of the model's largest shape measured in this run). --presets adds the
same model on 8 (simulated) devices under each parallelism preset. Writes bench.md and bench.csv.
"""

import os

# 8 simulated devices for --presets on CPU; the flag only affects the host platform.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import dataclasses  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from launch import hardware  # noqa: E402
from launch.benchmarking import random_batch, time_train_step, write_table  # noqa: E402
from launch.cli import load_config, quiet_logs  # noqa: E402
from launch.config import Config  # noqa: E402
from launch.context import build_context  # noqa: E402
from launch.memory_report import compile_train_step  # noqa: E402
from launch.profile_summary import summarize_trace  # noqa: E402
from lm import flops  # noqa: E402

flags.DEFINE_string("out", None, "Write bench.md and bench.csv here.")
flags.DEFINE_string("dtypes", "float32", "Comma-separated compute dtypes for the single-device rows.")
flags.DEFINE_bool("presets", False, "Also run every parallelism preset on 8 devices.")
flags.DEFINE_integer("steps", 5, "Timed steps per configuration.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_string("profile", None, "Write a jax.profiler trace of 3 steps of the first row here.")
FLAGS = flags.FLAGS

PRESETS = [("dp", dict(data=8, fsdp=1, tensor=1)), ("fsdp", dict(data=1, fsdp=8, tensor=1)),
           ("tp", dict(data=2, fsdp=1, tensor=4)), ("fsdp_tp", dict(data=1, fsdp=2, tensor=4)),
           ("dp_fsdp_tp", dict(data=2, fsdp=2, tensor=2))]


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
    from launch import train_state as ts
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


def main(argv):
  del argv
  quiet_logs()
  cfg = load_config()
  rows, first_compiled = [], None
  for i, dtype in enumerate(FLAGS.dtypes.split(",")):
    row, compiled = bench_row(f"{cfg.mesh.rules} single device", variant(cfg, dtype), FLAGS.steps,
                              FLAGS.warmup, FLAGS.profile if i == 0 else None)
    rows.append(row)
    first_compiled = first_compiled or compiled
  if FLAGS.presets:
    base_dtype = FLAGS.dtypes.split(",")[0]
    for rules, mesh in PRESETS:
      rows.append(bench_row(rules, variant(cfg, base_dtype, rules, mesh, 8), FLAGS.steps, FLAGS.warmup)[0])
  profile = ""
  if FLAGS.profile:
    summary = summarize_trace(FLAGS.profile, first_compiled.as_text())
    profile = profile_markdown(summary, rows[0]["config"] + " " + rows[0]["dtype"])
    print(profile)
  if FLAGS.out:
    command = "python -m launch.bench " + " ".join(a for a in os.sys.argv[1:])
    write_table(rows, FLAGS.out, "bench", "Train-step benchmark", command, profile)


if __name__ == "__main__":
  app.run(main)
