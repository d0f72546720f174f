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
  step's estimate adds the other layers (`estimated_step_seconds`) and the splash attention kernels,
  which XLA prices at nothing (`attention_kernel_seconds`). An estimate, never a measurement:
  tokens/s and MFU derived from it are labelled as XLA's estimate.

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
from launch.run.plan import RunPlan, make_plan
from launch.run import programs as programs_lib
from launch.run.step import batch_sharding
from launch.run.throughput import throughput
from launch.run.topology import chip_of
from lm.attention import SPLASH_KERNEL_BLOCK

PROGRAMS = ("train", "eval", "prefill", "decode")
GIB = 2 ** 30
# What Mosaic-compiled Pallas kernels (splash attention) are called in TPU HLO.
MOSAIC_TARGET = 'custom_call_target="tpu_custom_call"'
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
# Matmuls each splash kernel does per (query block, key block) pair: the forward computes QK^T and PV;
# the dq kernel recomputes QK^T, then dO V^T and dS K; the dkv kernel recomputes QK^T, then P^T dO,
# dO V^T and dS^T Q (one more, dS K, when it also computes dq: the fused backward).
SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4, "dkv_fused": 5}
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


def attention_kernel_flops(report: ProgramReport, plan: RunPlan) -> float:
  """FLOPs one chip spends per train step in the splash attention kernels, from the kernels the
  compiled step runs (`report.splash_calls`) and the closed form of their matmuls; 0 without them.

  XLA's cost model prices a Mosaic custom call at nothing (tests/test_tpu_compile.py checks it), so
  this is what `estimated_step_seconds` adds. One matmul over every layer's causal attention is
  2 * batch * seq_len * (seq_len * c) * heads * head_dim FLOPs over the mesh, c = (n + 1) / (2n) the
  share of key blocks a causal splash computes (n blocks of SPLASH_KERNEL_BLOCK: the diagonal ones
  whole, those above it skipped). Each backward runs the dq and dkv kernels once (SPLASH_MATMULS
  matmuls each, or one fused dkv kernel); the forward runs once, or twice where remat recomputes it,
  as the ratio of forward to backward calls in the compiled step says. Ring blocks and document
  masks are priced as the causal whole sequence.
  """
  calls = report.splash_calls
  backward = calls.get("dq", 0) or calls.get("dkv", 0)
  if not backward:
    return 0.0
  m, length = plan.cfg.model, plan.cfg.data.seq_len
  blocks = -(-length // min(SPLASH_KERNEL_BLOCK, length))
  keys = length * (blocks + 1) / (2 * blocks)
  one_matmul = 2.0 * plan.cfg.train.global_batch_size * length * keys * m.num_heads * m.head_dim * m.num_layers
  fused = calls.get("dq", 0) == 0
  matmuls = (SPLASH_MATMULS["fwd"] * calls["fwd"] / backward
             + (SPLASH_MATMULS["dkv_fused"] if fused else SPLASH_MATMULS["dq"] + SPLASH_MATMULS["dkv"]))
  return one_matmul * matmuls / plan.num_devices


def attention_kernel_seconds(report: ProgramReport, plan: RunPlan) -> float:
  """`attention_kernel_flops` at the chip's spec-sheet bf16 peak: priced as XLA prices a matmul."""
  return attention_kernel_flops(report, plan) / (chip_of(list(plan.mesh.devices.flat)).bf16_tflops * 1e12)


# Up to this many layers, the estimate compiles the step with no loop over layers (XLA then prices
# every layer); deeper models extrapolate from two loop-priced-once compiles. The extrapolation was
# checked to 5-18% on an 8-layer 0.75B step (launch.reproduce.tpu_estimate) but overshoots several
# fold on tiny models, whose per-layer time is lost among fixed costs.
UNROLLED_ESTIMATE_MAX_LAYERS = 8


def estimated_step_seconds(report: ProgramReport, plan: RunPlan) -> tuple[float | None, str]:
  """XLA's estimate of one whole train step in seconds, and how it was made; (None, why) when none.

  `cost_analysis()` prices a while loop's body once, not once per iteration. Up to
  UNROLLED_ESTIMATE_MAX_LAYERS layers the step is compiled again with every layer unrolled (XLA
  prices each); deeper, the step compiled with u = model.scan_unroll layers per iteration
  (t_base + u * t_layer) and again with 2u give t_layer, and the step is t_base + num_layers *
  t_layer (5-18% above XLA's unrolled estimate on an 8-layer 0.75B step, docs/tpu.md). The splash
  kernels, which XLA prices at nothing, are added at the chip's peak (`attention_kernel_seconds`).
  A cost model, not a measurement.
  """
  m = plan.cfg.model
  unroll = m.scan_unroll
  if report.estimated_s is None:
    return None, "the compiler gave no cost estimate"
  if plan.pipeline is not None:
    return None, "a pipeline's step is not estimated (its bubble is not in XLA's cost model)"
  attention = attention_kernel_seconds(report, plan)
  if unroll == m.num_layers:  # no loop over layers: the estimate already prices every layer
    return report.estimated_s + attention, "every layer priced (no layer loop)"
  if m.num_layers <= UNROLLED_ESTIMATE_MAX_LAYERS:
    unrolled = _recompiled_estimate(plan, m.num_layers)
    if unrolled is None:
      return None, "the unrolled step gave no cost estimate"
    return unrolled + attention, f"compiled again with its {m.num_layers} layers unrolled"
  if m.num_layers % (2 * unroll):
    return None, (f"model.num_layers={m.num_layers} is not a multiple of 2 x model.scan_unroll, so "
                  "the per-layer time cannot be extrapolated")
  twice = _recompiled_estimate(plan, 2 * unroll)
  if twice is None:
    return None, "the step compiled with twice the layers per iteration gave no cost estimate"
  return (over_layers(report.estimated_s, twice, unroll, m.num_layers) + attention,
          f"extrapolated over {m.num_layers} layers from {unroll} and {2 * unroll} layers per loop iteration")


def _recompiled_estimate(plan: RunPlan, scan_unroll: int) -> float | None:
  """XLA's estimate of the plan's train step compiled with `scan_unroll` layers per scan iteration."""
  cfg = dataclasses.replace(plan.cfg, model=dataclasses.replace(plan.cfg.model, scan_unroll=scan_unroll))
  other = make_plan(cfg, list(plan.mesh.devices.flat), platform=plan.platform)
  return compile_programs(other, ("train",), check_fit=False)[0].estimated_s


def over_layers(at_unroll: float, at_twice: float, unroll: int, layers: int) -> float:
  """A loop-priced-once figure (seconds, FLOPs) for the whole layer stack, from the same program
  compiled with `unroll` and 2 * `unroll` layers per scan iteration: base + layers * per-layer."""
  per_layer = max(at_twice - at_unroll, 0.0) / unroll
  return at_unroll + (layers - unroll) * per_layer


def train_estimate(report: ProgramReport, plan: RunPlan) -> dict:
  """XLA's estimate for the train step: {"step_s", "attention_s", "tokens_per_s", "mfu",
  "model_tflops", "method"} from `estimated_step_seconds` with launch.run.throughput (the spec-sheet
  peak of the topology's chip x chips); `attention_s` is the part of step_s that prices the splash
  kernels (closed form, `attention_kernel_seconds`), `method` how the layers were priced. Every
  number is an estimate, not a measurement. Without an estimate, or when it would claim more than
  the peak (an MFU above 100%, which no program reaches), {"step_s": None, "why": ...}: never a
  figure that cannot be true."""
  step_s, method = estimated_step_seconds(report, plan)
  if step_s is None:
    return {"step_s": None, "why": method}
  speed = throughput(plan, step_s)
  if not 0 < speed["mfu"] <= 1:
    return {"step_s": None, "why": (f"the estimate ({method}) gives {speed['mfu']:.1%} of the peak "
                                    f"({speed['peak_source']}), which no program reaches")}
  return {"step_s": step_s, "attention_s": attention_kernel_seconds(report, plan), "method": method,
          "tokens_per_s": speed["tokens_per_s"], "mfu": speed["mfu"], "model_tflops": speed["model_tflops"]}


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
