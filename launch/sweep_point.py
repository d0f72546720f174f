"""One point of a sweep, in its own process: compile the train step, read its memory, time a few steps.

  python -m launch.sweep_point --config configs/demo.py --config.mesh.fsdp=8 --config.mesh.data=1 \
      --config.mesh.rules=fsdp --out runs/sweep-x/points/p.json [--compile_only] [--steps 5] [--devices 8]

Always writes --out, a JSON object with `status` and `reason`:
  ok       compiled (and timed unless --compile_only)
  invalid  the config or the plan was rejected before compiling (the ValueError's message)
  oom      compiling or running ran out of memory (RESOURCE_EXHAUSTED, MemoryError)
  error    anything else (the exception), so the sweep that started this process can go on
Memory columns are per device, from the compiled step's `memory_analysis()`; tokens/s and MFU are
measured as in launch/bench.py (random tokens, compile and warm-up excluded, median of --steps).
On CPU the memory compile uses --xla_cpu_enable_concurrency_optimized_scheduler=false (so remat shows
in the numbers) and the steps are timed in a child process with XLA's default schedule, because the
former deadlocks some multi-device programs in a collective (see `speed_in_subprocess`).
"""

import os
import re
import subprocess
import sys

_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _xla_flags(devices: int, memory_schedule: bool) -> str:
  """XLA_FLAGS with `devices` simulated host devices, and with `memory_schedule` the CPU schedule
  whose memory_analysis() honours remat (docs/sharding.md)."""
  kept = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
  kept = kept.replace(_SCHEDULER_FLAG, "")
  parts = [kept.strip(), f"--xla_force_host_platform_device_count={devices}"]
  return " ".join(parts + ([_SCHEDULER_FLAG] if memory_schedule else [])).strip()


if __name__ == "__main__":
  # Devices must be simulated before jax starts; both flags only affect the CPU (host) platform.
  _match = next((re.match(r"--devices=(\d+)", a) for a in sys.argv if a.startswith("--devices=")), None)
  if _match is None and "--devices" in sys.argv:
    _match = re.match(r"(\d+)", sys.argv[sys.argv.index("--devices") + 1])
  os.environ["XLA_FLAGS"] = _xla_flags(int(_match.group(1)) if _match else 8,
                                       memory_schedule="--timing_only" not in sys.argv)

import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from launch import hardware  # noqa: E402
from launch.benchmarking import time_train_step  # noqa: E402
from launch.cli import quiet_logs  # noqa: E402
from launch.config import validate  # noqa: E402
from launch.context import RunContext, build_context  # noqa: E402
from launch.memory_report import _per_device_bytes, compile_train_step  # noqa: E402
from lm import flops  # noqa: E402

flags.DEFINE_string("out", None, "Write the point's JSON result here.")
flags.DEFINE_bool("compile_only", False, "Compile and read memory; run no steps.")
flags.DEFINE_integer("steps", 5, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_integer("devices", 8, "Simulated CPU devices (CPU only; read before jax starts).")
flags.DEFINE_bool("timing_only", False, "Internal: time steps only, with XLA's default CPU schedule.")
FLAGS = flags.FLAGS

_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")


def _first_lines(text: str, limit: int = 600) -> str:
  """The message on one line (newlines as ' | '), cut to `limit` characters."""
  flat = " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
  return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def measure_memory(ctx: RunContext) -> dict:
  """Compiles the run's train step and returns its per-device memory columns (bytes) and compile_s."""
  cfg = ctx.cfg
  row = {"devices": ctx.num_devices,
         "mesh_shape": "x".join(f"{k}{v}" for k, v in ctx.mesh.shape.items() if v > 1) or "1",
         "rules": cfg.mesh.custom_rules or cfg.mesh.rules, "platform": ctx.mesh.devices.flat[0].platform,
         "dtype": cfg.model.dtype}
  start = time.perf_counter()
  compiled, abstract = compile_train_step(ctx)
  row["compile_s"] = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  row.update(params_bytes=_per_device_bytes(abstract.params),
             optimizer_bytes=_per_device_bytes(abstract.opt_state),
             argument_bytes=int(analysis.argument_size_in_bytes),
             temp_bytes=int(analysis.temp_size_in_bytes))
  row["peak_bytes"] = row["argument_bytes"] + row["temp_bytes"]
  return row


def measure_speed(ctx: RunContext, steps: int, warmup: int) -> dict:
  """Times the train step as launch.bench does; returns step_s (median), tokens/s over the mesh, MFU."""
  cfg = ctx.cfg
  compiled, _ = compile_train_step(ctx)
  timing = time_train_step(ctx, steps=steps, warmup=warmup, step_fn=compiled)
  tokens = cfg.train.global_batch_size * cfg.data.seq_len
  model_flops = flops.train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens
  shape = (tokens, cfg.model.d_model, max(cfg.model.mlp_dim, cfg.model.vocab_size))
  peak, source = hardware.peak_flops(cfg.model.dtype, shape, list(ctx.mesh.devices.flat))
  return dict(step_s=timing.median_s, spread=timing.spread, tokens_per_s=tokens / timing.median_s,
              model_tflops=model_flops / timing.median_s / 1e12, mfu=model_flops / timing.median_s / peak,
              peak_tflops=peak / 1e12, peak_source=source)


def speed_in_subprocess(out: str) -> dict:
  """Reruns this command with --timing_only and returns its JSON.

  Timing runs without the memory schedule flag: on CPU, XLA's non-concurrency-optimized schedule
  deadlocks some multi-device programs in a collective ("Termination timeout for ... RendezvousKey",
  seen for fsdp8 and data2.fsdp2.tensor2 meshes of the demo model), while its memory numbers are
  the ones that show remat.
  """
  timing_out = out.removesuffix(".json") + ".timing.json"
  argv = [a for a in sys.argv[1:] if not a.startswith("--out")] + [f"--out={timing_out}", "--timing_only"]
  proc = subprocess.run([sys.executable, "-m", "launch.sweep_point", *argv], capture_output=True, text=True)
  try:
    with open(timing_out) as f:
      result = json.load(f)
    os.remove(timing_out)
    return result
  except (OSError, ValueError):
    sys.stderr.write(proc.stdout + proc.stderr)
    tail = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()][-1:] or ["(no output)"]
    return {"status": "error", "reason": f"timing process exited with {proc.returncode}: {tail[0][:300]}"}


def run_point(raw_config, compile_only: bool, steps: int, warmup: int, timing_only: bool = False,
              out: str = "") -> dict:
  """Returns {"status", "reason", ...columns} for one config; never raises for a bad point.

  A ValueError while validating the config or building the run's context (mesh, batch split,
  rule divisibility, remat support) makes the point `invalid`; a failure after that is `oom` or `error`.
  """
  try:
    ctx = build_context(validate(raw_config))
  except ValueError as e:
    return {"status": "invalid", "reason": _first_lines(str(e))}
  try:
    if timing_only:
      return {"status": "ok", "reason": "", **measure_speed(ctx, steps, warmup)}
    row = {"status": "ok", "reason": "", **measure_memory(ctx)}
    if not compile_only and ctx.mesh.devices.flat[0].platform != "cpu":
      row.update(measure_speed(ctx, steps, warmup))
    elif not compile_only:
      speed = speed_in_subprocess(out)
      row.update({k: v for k, v in speed.items() if k not in ("mode", "steps", "wall_s", "jax_version")})
    return row
  except Exception as e:  # noqa: BLE001 - every failure becomes a recorded row
    text = f"{type(e).__name__}: {e}"
    oom = isinstance(e, MemoryError) or any(m in text for m in _OOM_MARKERS)
    traceback.print_exception(e)
    return {"status": "oom" if oom else "error", "reason": _first_lines(text)}


def main(argv):
  del argv
  quiet_logs()
  if not FLAGS.out:
    raise app.UsageError("--out is required.")
  start = time.perf_counter()
  result = run_point(FLAGS.config, FLAGS.compile_only, FLAGS.steps, FLAGS.warmup, FLAGS.timing_only,
                     FLAGS.out)
  result.update(mode="compile" if FLAGS.compile_only else "time", steps=FLAGS.steps,
                wall_s=time.perf_counter() - start, jax_version=jax.__version__)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(FLAGS.out + ".tmp", FLAGS.out)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
