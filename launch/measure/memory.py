"""Per-device memory of a config's train step, from shardings and the compiled step; no step is run."""

import dataclasses
import math
import time

import jax
import jax.numpy as jnp

from launch.run import state as ts
from launch.run.config import Config
from launch.run.plan import RunPlan, make_plan
from launch.run import programs
from launch.run.step import batch_sharding


@dataclasses.dataclass
class MemoryReport:
  devices: int
  mesh: dict
  params_bytes: int        # per device
  optimizer_bytes: int     # per device
  argument_bytes: int      # compiled: everything passed in (state + batch)
  output_bytes: int        # compiled: everything returned (aliased with the donated state)
  temp_bytes: int          # compiled: activations and other temporaries of the step
  compile_s: float

  @property
  def total_bytes(self) -> int:
    """Peak estimate: live arguments plus temporaries (outputs reuse the donated state)."""
    return self.argument_bytes + self.temp_bytes


def per_device_bytes(abstract_tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (max over devices)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
  return total


def compile_train_step(plan: RunPlan):
  """Lowers and compiles the train step for abstract inputs; returns (compiled, abstract state)."""
  cfg = plan.cfg
  step = programs.train_step(plan)
  abstract = ts.abstract_state(plan.mdef, plan.tx, plan.shardings)
  tokens = jax.ShapeDtypeStruct((cfg.train.global_batch_size, cfg.data.seq_len), jnp.int32,
                                sharding=batch_sharding(plan.mesh, plan.rules))
  batch = {"inputs": tokens, "targets": tokens, "segment_ids": tokens}
  return step.lower(abstract, batch).compile(), abstract


def memory_report(cfg: Config, devices: list | None = None, plan: RunPlan | None = None) -> MemoryReport:
  """Compiles the train step of `cfg` (or of a prebuilt `plan`) and reads its memory per device."""
  plan = plan or make_plan(cfg, devices)
  start = time.perf_counter()
  compiled, abstract = compile_train_step(plan)
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  return MemoryReport(
      devices=plan.num_devices, mesh=dict(plan.mesh.shape),
      params_bytes=per_device_bytes(abstract.params),
      optimizer_bytes=per_device_bytes(abstract.opt_state),
      argument_bytes=int(analysis.argument_size_in_bytes), output_bytes=int(analysis.output_size_in_bytes),
      temp_bytes=int(analysis.temp_size_in_bytes), compile_s=compile_s)


def device_memory(device) -> tuple[str, int] | None:
  """(device kind, bytes it can allocate) of an accelerator, from its allocator; None on CPU or when
  the backend does not say."""
  if device.platform == "cpu":
    return None
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  limit = (stats or {}).get("bytes_limit")
  return (device.device_kind, int(limit)) if limit else None


def fit_verdict(total_bytes: int, device_name: str, capacity_bytes: int) -> str:
  """'fits on H200 (139.0 GiB): ...' or 'does not fit on H200 (139.0 GiB): ...' for a per-device peak."""
  fits = total_bytes <= capacity_bytes
  return (f"{'fits' if fits else 'does not fit'} on {device_name} ({capacity_bytes / 2**30:.1f} GiB): "
          f"peak estimate {format_bytes(total_bytes)} is {total_bytes / capacity_bytes:.0%} of it")


def format_bytes(n: float) -> str:
  """'1.5 GiB' for 1.5 * 2**30; bytes below 1 KiB as an integer."""
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return str(n)
