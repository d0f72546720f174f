"""Tokens/s, model FLOP/s and MFU of a train step: the one formula used by training logs, launch.bench and sweeps.

The peak (MFU's denominator) is a known chip's spec sheet (launch/run/chips.py), or on CPU a matmul
of the model's largest shape measured once per process.
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


def peak_flops(dtype: str, matmul_shape: tuple[int, int, int], devices=None) -> tuple[float, str]:
  """Returns (peak FLOP/s of all `devices` together, where the number came from).

  Accelerators: the spec-sheet table times the device count. CPU (or an unknown chip): a matmul of
  `matmul_shape` measured now; simulated CPU devices share one host, so it is not multiplied.
  """
  devices = devices or jax.devices()
  kind = devices[0].device_kind
  per_chip = table_peak_flops(kind, dtype)
  if per_chip is not None and devices[0].platform != "cpu":
    return per_chip * len(devices), f"{kind} spec sheet x {len(devices)}"
  # Measured on this process's first device: the host's rate. Each process of a multi-process
  # CPU run is taken to have a host of its own.
  measured = measure_matmul_flops(*matmul_shape, dtype=dtype, device=jax.local_devices()[0])
  m, k, n = matmul_shape
  hosts = f" x {jax.process_count()} hosts" if jax.process_count() > 1 else ""
  return measured * jax.process_count(), f"measured {m}x{k}x{n} {dtype} matmul on {devices[0].platform}{hosts}"


@functools.lru_cache(maxsize=None)
def _cached_peak(dtype: str, matmul_shape: tuple[int, int, int], devices: tuple) -> tuple[float, str]:
  return peak_flops(dtype, matmul_shape, list(devices))


def run_peak_flops(cfg, devices) -> tuple[float, str]:
  """(peak FLOP/s, its source) for a run of `cfg` (a launch.run.config.Config) on `devices`.

  On CPU the matmul measured is the model's largest: the micro-batch's tokens times d_model times
  the wider of the MLP and the vocabulary. Measured once per process and shape, so every figure a
  process prints is divided by the same number.
  """
  micro = cfg.train.global_batch_size // cfg.train.grad_accum_steps
  shape = (micro * cfg.data.seq_len, cfg.model.d_model, max(cfg.model.mlp_dim, cfg.model.vocab_size))
  return _cached_peak(cfg.model.dtype, shape, tuple(devices))


def throughput(cfg, step_time_s: float, devices) -> dict[str, float | str]:
  """Returns tokens_per_s, model_tflops, mfu, peak_tflops and peak_source of one train step of `cfg`
  (a launch.run.config.Config) that took `step_time_s` seconds on `devices`.

  Model FLOPs are lm.flops.train_flops_per_token times the global batch's tokens.
  """
  tokens = cfg.train.global_batch_size * cfg.data.seq_len
  model_flops = flops.train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens
  peak, source = run_peak_flops(cfg, devices)
  return {"tokens_per_s": tokens / step_time_s, "model_tflops": model_flops / step_time_s / 1e12,
          "mfu": model_flops / step_time_s / peak, "peak_tflops": peak / 1e12, "peak_source": source}
