"""One point of a sweep: compile the train step, read its memory, time a few steps; never raise.

The command is `python -m launch.sweep_point` (launch.sweep starts one per point). A result is a
dict with `status` and `reason`:
  ok       compiled (and timed unless compile-only)
  invalid  the config or the plan was rejected before compiling (the ValueError's message)
  oom      compiling or running ran out of memory (RESOURCE_EXHAUSTED, MemoryError)
  error    anything else (the exception), so the sweep that started the point can go on
Memory columns are per device, from the compiled step's `memory_analysis()`; tokens/s and MFU come
from launch.run.throughput, as in launch.bench. On CPU the memory compile uses the memory schedule
(launch/run/devices.py) and the steps are timed in a child process with XLA's default schedule,
because the former deadlocks some multi-device programs in a collective (`speed_in_subprocess`).
"""

import json
import os
import subprocess
import sys
import tempfile
import traceback

from launch.measure.aot import compile_programs, state_bytes
from launch.measure.step_estimate import train_estimate
from launch.measure.memory import compile_train_step, memory_report
from launch.measure.timing import mesh_label, time_train_step
from launch.run.config import validate
from launch.run.plan import RunPlan, make_plan
from launch.run.throughput import throughput
from launch.run.topology import chip_of

_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM", "does not fit")


def _first_lines(text: str, limit: int = 600) -> str:
  """The message on one line (newlines as ' | '), cut to `limit` characters."""
  flat = " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
  return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def measure_memory(plan: RunPlan) -> dict:
  """Compiles the run's train step and returns its per-device memory columns (bytes) and compile_s."""
  cfg = plan.cfg
  report = memory_report(cfg, plan=plan)
  return {"devices": plan.num_devices, "mesh_shape": mesh_label(plan), "rules": cfg.mesh.custom_rules or cfg.mesh.rules,
          "platform": plan.mesh.devices.flat[0].platform, "dtype": cfg.model.dtype, "compile_s": report.compile_s,
          "params_bytes": report.params_bytes, "optimizer_bytes": report.optimizer_bytes,
          "argument_bytes": report.argument_bytes, "temp_bytes": report.temp_bytes,
          "peak_bytes": report.total_bytes}


def measure_on_topology(plan: RunPlan) -> dict:
  """Compiles the train step for the plan's TPU devices (a topology, launch/run/topology.py) and returns
  the memory columns from the TPU compiler, `fits` (peak within the chip's HBM), collectives per
  step, and XLA's estimate (`est_step_s`, of which `est_attention_s` prices the splash kernels XLA
  cannot, `est_tokens_per_s`, `est_mfu`: a cost model, not a
  measurement; absent when the compiler gives none)."""
  cfg, devices = plan.cfg, list(plan.mesh.devices.flat)
  train = compile_programs(plan, ("train",), check_fit=False)[0]
  params_b, opt_b = state_bytes(plan)
  chip = chip_of(devices)
  row = {"devices": plan.num_devices, "mesh_shape": mesh_label(plan), "rules": cfg.mesh.custom_rules or cfg.mesh.rules,
         "platform": "tpu", "chip": chip.name, "hbm_bytes": int(chip.hbm_gib * 2**30), "dtype": cfg.model.dtype,
         "compile_s": train.compile_s, "params_bytes": params_b, "optimizer_bytes": opt_b,
         "argument_bytes": train.argument_bytes, "temp_bytes": train.temp_bytes, "peak_bytes": train.total_bytes,
         "fits": train.total_bytes <= chip.hbm_gib * 2**30, "collective_count": train.collective_count,
         "collective_bytes": train.collective_bytes, "mosaic_kernels": train.mosaic_kernels,
         "tokens_per_step": cfg.train.global_batch_size * cfg.data.seq_len}
  estimate = train_estimate(train, plan) if row["fits"] else None  # (a second compile)
  if estimate and estimate["step_s"] is not None:
    row.update(est_step_s=estimate["step_s"], est_attention_s=estimate["attention_s"],
               est_tokens_per_s=estimate["tokens_per_s"], est_mfu=estimate["mfu"])
  return row


def measure_speed(plan: RunPlan, steps: int, warmup: int) -> dict:
  """Times the train step as launch.bench does; returns step_s (median), tokens/s over the mesh, MFU."""
  compiled, _ = compile_train_step(plan)
  timing = time_train_step(plan, steps=steps, warmup=warmup, step_fn=compiled)
  speed = throughput(plan, timing.median_s)
  return dict(step_s=timing.median_s, spread=timing.spread, **speed)


def speed_in_subprocess(argv: list[str]) -> dict:
  """Reruns `python -m launch.sweep_point` with `argv` (this point's arguments) and --timing_only;
  returns its JSON (passed through a local temporary file, also when the sweep writes to a bucket).

  Timing runs without the memory schedule flag: on CPU, XLA's non-concurrency-optimized schedule
  deadlocks some multi-device programs in a collective ("Termination timeout for ... RendezvousKey",
  seen for fsdp8 and data2.fsdp2.tensor2 meshes of the demo model), while its memory numbers are
  the ones that show remat.
  """
  with tempfile.TemporaryDirectory(prefix="shardlm-timing-") as scratch:
    timing_out = os.path.join(scratch, "timing.json")
    argv = [a for a in argv if not a.startswith("--out")] + [f"--out={timing_out}", "--timing_only"]
    proc = subprocess.run([sys.executable, "-m", "launch.sweep_point", *argv], capture_output=True, text=True)
    try:
      with open(timing_out) as f:
        return json.load(f)
    except (OSError, ValueError):
      sys.stderr.write(proc.stdout + proc.stderr)
      tail = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()][-1:] or ["(no output)"]
      return {"status": "error", "reason": f"timing process exited with {proc.returncode}: {tail[0][:300]}"}


def run_point(raw_config, compile_only: bool, steps: int, warmup: int, timing_only: bool = False,
              argv: list[str] = (), devices: list | None = None) -> dict:
  """Returns {"status", "reason", ...columns} for one config; never raises for a bad point.

  `devices`: a TPU topology's devices (launch/run/topology.py) to compile for instead of the host's;
  then nothing runs (`measure_on_topology`), and a step the chip cannot hold is `oom`.
  A ValueError while validating the config or building the run's context (mesh, batch split,
  rule divisibility, remat support) makes the point `invalid`; a failure after that is `oom` or `error`.
  """
  try:
    plan = make_plan(validate(raw_config), devices, platform="tpu" if devices else None)
  except ValueError as e:
    return {"status": "invalid", "reason": _first_lines(str(e))}
  try:
    if devices:
      return {"status": "ok", "reason": "", **measure_on_topology(plan)}
    if timing_only:
      return {"status": "ok", "reason": "", **measure_speed(plan, steps, warmup)}
    row = {"status": "ok", "reason": "", **measure_memory(plan)}
    if not compile_only and plan.mesh.devices.flat[0].platform != "cpu":
      row.update(measure_speed(plan, steps, warmup))
    elif not compile_only:
      speed = speed_in_subprocess(list(argv))
      row.update({k: v for k, v in speed.items() if k not in ("mode", "steps", "wall_s", "jax_version")})
    return row
  except Exception as e:  # noqa: BLE001 - every failure becomes a recorded row
    text = f"{type(e).__name__}: {e}"
    oom = isinstance(e, MemoryError) or any(m in text for m in _OOM_MARKERS)
    traceback.print_exception(e)
    return {"status": "oom" if oom else "error", "reason": _first_lines(text)}
