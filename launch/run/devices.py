"""Simulated CPU devices: the one place that sets how many a process (and the processes it starts) has.

On a machine without accelerators XLA can split the host into N CPU devices, so every sharding mode
runs on a laptop. The count must be set before jax first touches a device; it is written into
XLA_FLAGS, so child processes (sweep points, launch.local) inherit it unless they set their own.
GPUs and TPUs are unaffected.
"""

import os
import re

from sharding import jax_internals

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# Makes CPU memory_analysis() honour remat, but can deadlock multi-device CPU collectives when steps
# run, so only compile-only processes (launch.memory, a sweep point's memory pass) use it.
MEMORY_SCHEDULE_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def xla_flags(count: int | None, memory_schedule: bool = False, base: str | None = None) -> str:
  """XLA_FLAGS text: `base` (default: the environment's) with the device count set to `count` (None:
  left as it is) and the memory schedule flag added or removed."""
  text = os.environ.get("XLA_FLAGS", "") if base is None else base
  text = text.replace(MEMORY_SCHEDULE_FLAG, "")
  if count is not None:
    text = re.sub(rf"{DEVICE_COUNT_FLAG}=\S+", "", text) + f" {DEVICE_COUNT_FLAG}={count}"
  if memory_schedule:
    text += " " + MEMORY_SCHEDULE_FLAG
  return " ".join(text.split())


def simulate_cpu_devices(count: int | None, memory_schedule: bool = False) -> None:
  """Gives this process `count` CPU devices (None: keep the count) and optionally the memory schedule.

  Raises RuntimeError when jax has already started with a different CPU device count.
  """
  if jax_internals.backends_started():
    import jax
    have = len(jax.devices("cpu"))
    if count is not None and have != count:
      raise RuntimeError(f"jax already started with {have} CPU devices; set the count ({count}) before "
                         "the first jax operation.")
    return
  os.environ["XLA_FLAGS"] = xla_flags(count, memory_schedule)


def _tpu_attached() -> bool:
  """Whether this host has a TPU (the device files a TPU VM exposes)."""
  return any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0"))


def skip_absent_tpu() -> None:
  """Keeps jax off the TPU backend where libtpu is installed (the `tpu` extra, for compiling ahead
  of time) but no TPU is attached: otherwise every first use of jax prints libtpu's warnings about
  the missing chip. Selects the CPU platform (JAX_PLATFORMS=cpu, inherited by child processes), or
  CUDA and CPU where a CUDA plugin is installed. Does nothing when JAX_PLATFORMS is set, on a TPU
  host, without libtpu, or once jax has started.
  """
  import importlib.util
  if (os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None or _tpu_attached()
      or jax_internals.backends_started()):
    return
  cuda = any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))
  os.environ["JAX_PLATFORMS"] = "cuda,cpu" if cuda else "cpu"
  import jax
  jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
