"""Tokens/s, model FLOP/s and MFU of a train step: the one formula used by training logs, launch.bench and sweeps.

The peak (MFU's denominator) is settled for the plan's target (`plan_peak`): a known chip's spec
sheet (launch/run/chips.py), or on a CPU host a matmul of the model's largest shape measured once
per process; never a rate measured on a device other than the target.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from launch.run import chips
from lm import flops

def table_peak_flops(device_kind: str, dtype: str) -> float | None:
  """Returns the per-chip peak FLOP/s for `device_kind` in `dtype` ("bfloat16" or "float32") from
  the spec sheets in launch/run/chips.py, or None if the chip or that dtype's rate is not listed."""
  chip = chips.chip_for(device_kind)
  tflops = {"bfloat16": chip.bf16_tflops, "float32": chip.fp32_tflops}.get(dtype) if chip else None
  return tflops * 1e12 if tflops is not None else None


def measure_matmul_flops(m: int, k: int, n: int, dtype: str = "float32", repeats: int = 10,
                         device=None) -> float:
  """Measures FLOP/s of an [m, k] x [k, n] matmul in `dtype` (float32 accumulation) on one device.

  Takes the best of `repeats` timed calls after a warm-up; on CPU the one device uses every core, so
  this is the whole host's matmul rate.
  """
  device = device or jax.devices()[0]
  rng = np.random.default_rng(0)
  a = jax.device_put(jnp.asarray(rng.standard_normal((m, k)), dtype), device)
  b = jax.device_put(jnp.asarray(rng.standard_normal((k, n)), dtype), device)
  matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * m * k * n / best


def plan_peak(plan) -> tuple[float | None, str]:
  """(peak FLOP/s of the plan's devices together, where the number came from) for a launch.run.plan.RunPlan.

  Settled for the plan's target, never measured on another device: a listed chip (a real one, or
  a TPU/GPU topology compiled ahead of time) has its spec sheet's rate in the plan's compute dtype
  (a TPU, which has no separate float32 rate, its bf16 rate) times the device count; a CPU host
  planned as a CPU a matmul of the model's largest shape measured now, once per process and shape
  (simulated CPU devices share one host, so it is not multiplied). Devices described as another
  platform's (CPU devices planned as a TPU in tests) have no peak: (None, why).
  """
  devices = list(plan.mesh.devices.flat)
  dtype, kind, count = plan.cfg.model.dtype, devices[0].device_kind, len(devices)
  chip = chips.chip_for(kind)
  if chip is not None and devices[0].platform != "cpu":
    per_chip = table_peak_flops(kind, dtype)
    if per_chip is not None:
      return per_chip * count, f"{chip.name} spec sheet ({dtype}) x {count}"
    return (chip.bf16_tflops * 1e12 * count,
            f"{chip.name} spec sheet (bf16: no separate {dtype} rate) x {count}")
  own = "gpu" if plan.platform in ("cuda", "rocm") else plan.platform
  if devices[0].platform != own:
    return None, (f"no peak: {devices[0].platform} devices described as {plan.platform}, "
                  "a chip with no spec sheet here")
  cfg = plan.cfg
  micro = cfg.train.global_batch_size // cfg.train.grad_accum_steps
  shape = (micro * cfg.data.seq_len, cfg.model.d_model, max(cfg.model.mlp_dim, cfg.model.vocab_size))
  return _measured_peak(dtype, shape, devices[0].platform)


@functools.lru_cache(maxsize=None)
def _measured_peak(dtype: str, matmul_shape: tuple[int, int, int], platform: str) -> tuple[float, str]:
  """A matmul of `matmul_shape` measured on this process's first device (the host's rate on CPU);
  each process of a multi-process run is taken to have a host of its own."""
  measured = measure_matmul_flops(*matmul_shape, dtype=dtype, device=jax.local_devices()[0])
  m, k, n = matmul_shape
  hosts = f" x {jax.process_count()} hosts" if jax.process_count() > 1 else ""
  return measured * jax.process_count(), f"measured {m}x{k}x{n} {dtype} matmul on {platform}{hosts}"


def throughput(plan, step_time_s: float) -> dict[str, float | str]:
  """Returns tokens_per_s, model_tflops, mfu, peak_tflops and peak_source of one train step of the
  plan (a launch.run.plan.RunPlan) that took `step_time_s` seconds on its devices (mfu and
  peak_tflops NaN where the plan has no peak, `plan_peak`).

  Model FLOPs are lm.flops.train_flops_per_token times the global batch's tokens.
  """
  cfg = plan.cfg
  tokens = cfg.train.global_batch_size * cfg.data.seq_len
  model_flops = flops.train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens
  peak, source = plan_peak(plan)
  peak = float("nan") if peak is None else peak
  return {"tokens_per_s": tokens / step_time_s, "model_tflops": model_flops / step_time_s / 1e12,
          "mfu": model_flops / step_time_s / peak, "peak_tflops": peak / 1e12, "peak_source": source}
