"""XLA's estimate of a whole train step on a TPU slice compiled ahead of time, and what it leaves out.

    train = compile_programs(plan, ("train",))[0]        # launch/measure/aot.py
    estimate = train_estimate(train, plan)              # step_s, tokens/s, MFU (or why none)

`cost_analysis()["optimal_seconds"]` prices each op at the chip's peak FLOP/s or HBM bandwidth and
a while loop's body once; this module prices the rest: every layer of the scanned stack (compiled
again unrolled, or extrapolated) and the splash attention kernels, which XLA prices at nothing. A
roofline ceiling, never a measurement; an estimate above the chip's peak is refused (docs/tpu.md).
"""

import dataclasses

from launch.measure.aot import ProgramReport, compile_programs
from launch.run.plan import RunPlan, make_plan
from launch.run.throughput import throughput
from launch.run.topology import chip_of
from lm.attention import SPLASH_KERNEL_BLOCK

# Matmuls each splash kernel does per (query block, key block) pair: the forward computes QK^T and PV;
# the dq kernel recomputes QK^T, then dO V^T and dS K; the dkv kernel recomputes QK^T, then P^T dO,
# dO V^T and dS^T Q (one more, dS K, when it also computes dq: the fused backward).
SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4, "dkv_fused": 5}


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
