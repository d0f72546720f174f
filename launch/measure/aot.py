"""A config's programs compiled ahead of time for a TPU slice this host does not have.

    plan = make_plan(cfg, topology_devices("v5p:4x4x8"), platform="tpu")
    reports = compile_programs(plan, ("train", "eval", "prefill", "decode"))

Each program (train step, eval step, prefill of a prompt, one cached decode step) is lowered for the
plan's mesh over the topology's devices and compiled by the TPU compiler (XLA:TPU; Mosaic for the
splash kernel). What the compiler reports is read back per device:

- memory (`memory_analysis()`): arguments, outputs (those aliased with donated arguments counted
  once) and temporaries, as the TPU compiler laid them out: a compiler's number, not a guess;
- collectives in the compiled HLO, count and bytes per device for one execution, loops unrolled
  (`launch/measure/collectives.py`);
- `cost_analysis()["optimal_seconds"]`: XLA's cost-model estimate of one execution on that chip
  (each op at the chip's peak FLOP/s or HBM bandwidth), with a loop's body priced once; the train
  step's whole estimate (every layer, and the splash kernels XLA prices at nothing) is
  launch/measure/step_estimate.py's.

A program the chip's HBM cannot hold stops the compiler (CompileTimeHbmOom); it is raised here as
one ValueError that names the chip, its HBM and the compiler's numbers.
"""

import dataclasses
import re
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from launch.measure.collectives import collective_bytes_per_step, visit_per_step
from launch.measure.memory import MemoryReport, compile_train_step, format_bytes, per_device_bytes
from launch.run import state as ts
from launch.run.plan import RunPlan
from launch.run import programs as programs_lib
from launch.run.step import batch_sharding
from launch.run.topology import chip_of

PROGRAMS = ("train", "eval", "prefill", "decode")
GIB = 2 ** 30
# What Mosaic-compiled Pallas kernels (splash attention) are called in TPU HLO.
MOSAIC_TARGET = 'custom_call_target="tpu_custom_call"'
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
_OOM = ("CompileTimeHbmOom", "RESOURCE_EXHAUSTED", "Ran out of memory")


@dataclasses.dataclass
class ProgramReport:
  """One compiled program, per device: bytes from `memory_analysis()`, collectives from its HLO,
  and XLA's cost-model estimate (`estimated_s`, None when the backend gives none)."""
  name: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  compile_s: float
  collectives: dict          # {kind: {"count", "bytes"}} for one execution, per device
  estimated_s: float | None  # XLA's estimate (cost_analysis optimal_seconds), not a measurement
  flops: float | None        # XLA's count of the program's FLOPs per device
  mosaic_kernels: int        # Mosaic custom calls in the compiled HLO (splash attention on TPU)
  splash_calls: dict = dataclasses.field(default_factory=dict)  # {"fwd"|"dq"|"dkv": runs per execution}

  @property
  def total_bytes(self) -> int:
    """Peak estimate per device: arguments, outputs not aliased with them, temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def collective_bytes(self) -> int:
    return sum(c["bytes"] for c in self.collectives.values())

  @property
  def collective_count(self) -> int:
    return sum(c["count"] for c in self.collectives.values())


def _read(name: str, compiled, compile_s: float) -> ProgramReport:
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
  text = compiled.as_text()
  estimated = cost.get("optimal_seconds")
  return ProgramReport(
      name=name, argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes), compile_s=compile_s,
      collectives=collective_bytes_per_step(text),
      estimated_s=float(estimated) if estimated and estimated > 0 else None,
      flops=float(cost["flops"]) if cost.get("flops") else None, mosaic_kernels=text.count(MOSAIC_TARGET),
      splash_calls=splash_calls_per_step(text))


def splash_calls_per_step(hlo_text: str) -> dict[str, int]:
  """{"fwd", "dq", "dkv": how many times one execution runs each splash kernel}, read from the
  compiled HLO (Mosaic custom calls, named after their kernels) with loops multiplied out."""
  calls = {"fwd": 0, "dq": 0, "dkv": 0}

  def count(line: str, times: int) -> bool:
    if MOSAIC_TARGET not in line or not (name := _INSTRUCTION.match(line)):
      return False
    kind = next((k for k in ("dkv", "dq", "fwd") if f"_{k}" in name.group(1)), None)
    if kind:
      calls[kind] += times
    return True

  visit_per_step(hlo_text, count)
  return calls


def _not_fit_error(plan: RunPlan, program: str, error: Exception) -> ValueError:
  """The one-line ValueError for a program the chip's HBM cannot hold, with the compiler's numbers."""
  chip = chip_of(list(plan.mesh.devices.flat))
  text = " ".join(str(error).split())
  # libtpu: "Ran out of memory on HBM, the total memory required for HLO temporaries (119.62G)
  # exceeds available HBM (95.74G)."
  need = re.search(r"required for (.+?) \(([\d.]+\s*[KMGT]i?B?)\) exceeds available HBM \(([\d.]+\s*[KMGT]i?B?)\)", text)
  numbers = (f"the TPU compiler needs {need.group(2)} for {need.group(1)}, more than the {need.group(3)} "
             "of HBM it can use" if need else f"the TPU compiler says: {text[:200]}")
  return ValueError(f"{program} step does not fit on {chip.name} ({chip.hbm_gib:.0f} GiB HBM): {numbers}, on a "
                    f"mesh {mesh_text(plan)}; {_fix_hint(plan)}")


def _fix_hint(plan: RunPlan) -> str:
  """What to change when a step does not fit: more shards, more recomputation (unless full), less batch."""
  remat = "" if plan.cfg.model.remat == "full" else ", recompute more (model.remat=full)"
  return f"shard more (mesh.fsdp / mesh.tensor){remat} or lower train.global_batch_size."


def mesh_text(plan: RunPlan) -> str:
  """'fsdp=64 x tensor=2' for the plan's mesh (axes of size 1 left out)."""
  return " x ".join(f"{k}={v}" for k, v in plan.mesh.shape.items() if v > 1) or "one device"


def _compile(plan: RunPlan, name: str, lower):
  start = time.perf_counter()
  try:
    compiled = lower().compile()
  except Exception as e:  # noqa: BLE001 - the TPU compiler's error type is private
    if any(marker in str(e) for marker in _OOM):
      raise _not_fit_error(plan, name, e) from e
    raise
  return _read(name, compiled, time.perf_counter() - start)


def _tokens(plan: RunPlan, batch: int, length: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=batch_sharding(plan.mesh, plan.rules))


def _abstract_params(plan: RunPlan):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      plan.mdef.abstract_params, plan.shardings.params)


def prompt_length(plan: RunPlan) -> int:
  """The prompt prefill is compiled for: half of data.seq_len (at least 1), so decode has room."""
  return max(plan.cfg.data.seq_len // 2, 1)


def program_attention(plan: RunPlan, program: str) -> str:
  """The attention kernel `program` (a PROGRAMS name) runs at the length compile_programs builds it for."""
  attention, length = plan.attention, plan.cfg.data.seq_len
  if program in ("train", "eval"):
    return attention.training.for_length(length)
  if program == "prefill":
    return attention.prefill.for_length(prompt_length(plan))
  return attention.decode.implementation


def compile_programs(plan: RunPlan, programs=PROGRAMS, check_fit: bool = True) -> list[ProgramReport]:
  """Compiles each of `programs` (names from PROGRAMS) for the plan's devices; returns their reports
  in that order. Inference programs are launch.generate's (`launch.run.programs.Generation`, serving
  layout, greedy) at the training batch's rows: prefill a left-padded prompt of `prompt_length(plan)`
  tokens into a cache of data.seq_len columns, then the decode loop to fill it.

  Raises ValueError for an unknown program name, or one that does not fit the chip's HBM: refused
  by the compiler, or (`check_fit`) compiled with a peak above the chip's HBM.
  """
  unknown = [p for p in programs if p not in PROGRAMS]
  if unknown:
    raise ValueError(f"unknown program(s) {unknown}; choose from {', '.join(PROGRAMS)}.")
  cfg, reports = plan.cfg, []
  batch, length = cfg.train.global_batch_size, cfg.data.seq_len
  generation = prompt = lengths = serving = None
  for name in programs:
    if name == "train":
      reports.append(_compile(plan, name, lambda: _Lowered(compile_train_step, plan)))
    elif name == "eval":
      batch_in = {k: _tokens(plan, batch, length) for k in ("inputs", "targets", "segment_ids")}
      params = _abstract_params(plan)
      reports.append(_compile(plan, name, lambda: programs_lib.eval_step(plan).lower(params, batch_in)))
    else:
      if generation is None:  # the programs launch.generate runs, at the training batch's rows
        generation = programs_lib.Generation(plan, max_new_tokens=length - prompt_length(plan))
        serving = programs_lib.abstract_serving_params(plan)
        prompt = jax.ShapeDtypeStruct((batch, prompt_length(plan)), jnp.int32,
                                      sharding=generation.tokens_sharding)
        lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=programs_lib.rows_sharding(plan))
      if name == "prefill":
        reports.append(_compile(plan, name, lambda: generation.prefill.lower(serving, prompt, lengths)))
      else:
        logits_shape, cache_shape = generation.prefill.lower(serving, prompt, lengths).out_info
        placed = lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
        cache = jax.tree.map(placed, cache_shape, generation.cache_shardings)
        logits = placed(logits_shape, generation.logits_sharding)
        rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
        reports.append(_compile(plan, name, lambda: generation.decode.lower(serving, cache, logits, lengths, rng)))
  if check_fit:
    for report in reports:
      check_fits(report, plan)
  return reports


def check_fits(report: ProgramReport, plan: RunPlan) -> None:
  """Raises the one-line ValueError when the program's peak per chip exceeds the chip's HBM."""
  chip = chip_of(list(plan.mesh.devices.flat))
  if report.total_bytes > chip.hbm_gib * GIB:
    raise ValueError(
        f"{report.name} step does not fit on {chip.name} ({chip.hbm_gib:.0f} GiB HBM): the TPU compiler's "
        f"peak is {format_bytes(report.total_bytes)} per chip (arguments {format_bytes(report.argument_bytes)}"
        f", temporaries {format_bytes(report.temp_bytes)}) on a mesh {mesh_text(plan)}; {_fix_hint(plan)}")


class _Lowered:
  """Adapts compile_train_step (which compiles) to the lower().compile() shape `_compile` calls."""

  def __init__(self, compile_fn, plan):
    self.compile_fn, self.plan = compile_fn, plan

  def compile(self):
    return self.compile_fn(self.plan)[0]


def fits_line(report: ProgramReport, plan: RunPlan) -> str:
  """'fits on TPU v5p (95 GiB HBM): peak 40.1 GiB per chip (42%)' or 'does not fit ...'."""
  chip = chip_of(list(plan.mesh.devices.flat))
  capacity = chip.hbm_gib * GIB
  verdict = "fits" if report.total_bytes <= capacity else "does not fit"
  return (f"{verdict} on {chip.name} ({chip.hbm_gib:.0f} GiB HBM): {report.name} step peak "
          f"{format_bytes(report.total_bytes)} per chip ({report.total_bytes / capacity:.0%})")


def state_bytes(plan: RunPlan) -> tuple[int, int]:
  """(parameter bytes, optimizer-state bytes) one device holds under the plan's shardings."""
  abstract = ts.abstract_state(plan.mdef, plan.tx, plan.shardings)
  return per_device_bytes(abstract.params), per_device_bytes(abstract.opt_state)


def tpu_memory_report(plan: RunPlan) -> MemoryReport:
  """launch.memory's report for a plan over TPU devices: the train step compiled by the TPU compiler
  (raises ValueError naming the chip when it does not fit)."""
  train = compile_programs(plan, ("train",))[0]
  params_b, opt_b = state_bytes(plan)
  return MemoryReport(devices=plan.num_devices, mesh=dict(plan.mesh.shape), params_bytes=params_b,
                      optimizer_bytes=opt_b, argument_bytes=train.argument_bytes,
                      output_bytes=train.output_bytes, temp_bytes=train.temp_bytes, compile_s=train.compile_s)
