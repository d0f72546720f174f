"""Multi-process start-up: one process per host (or per GPU), all running the same program.

Call `initialize` before anything touches a jax device. On TPU pods and under SLURM, jax finds the
coordinator itself; elsewhere pass the coordinator address, process count and id explicitly
(`launch.local` does so for N processes on this machine, with CPU devices and gloo collectives).
"""

import os

import jax

from launch.run.devices import simulate_cpu_devices


def _cluster_detected() -> bool:
  """True inside a multi-process SLURM job or on a multi-host TPU slice (jax auto-detects these)."""
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ
  tpu = len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
  return slurm or tpu


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices: int | None = None,
               timeout_s: int = 120, heartbeat_timeout_s: int = 30) -> None:
  """Starts jax.distributed when this is a multi-process run; a no-op for a single process.

  `cpu_devices` sets the number of CPU devices of this process (CPU runs only). A peer that stops
  answering makes the others fail after `heartbeat_timeout_s` instead of hanging.
  """
  if cpu_devices:
    simulate_cpu_devices(cpu_devices)
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id as well.")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, {num_processes}).")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
  elif _cluster_detected():
    jax.distributed.initialize(initialization_timeout=timeout_s)
