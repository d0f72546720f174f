"""Compile a config's programs for a TPU slice from this (CPU) host: will it fit, what will it send?

  python -m launch.compile --config configs/llama_8b.py --topology v5p:4x4x8
  python -m launch.compile --config configs/llama_8b.py --topology v5p:4x4x8 --num_slices 2 \
      --config.mesh.dcn_data=2 --programs train
  python -m launch.compile --config configs/smoke.py --topology v5p:2x2x1 --config.mesh.data=1 \
      --config.mesh.fsdp=4 --config.mesh.rules=fsdp

Needs the `tpu` extra (libtpu; Linux x86_64). Builds the run plan for the topology's devices (splash
attention where the plan says so, compiled by Mosaic) and compiles the train step, eval step,
prefill and one decode step with the TPU compiler. Prints per device: parameters and optimizer state
(from the shardings), each program's arguments, temporaries and peak from the compiler; whether the
train step fits the chip's HBM (launch/run/chips.py); collectives per step from the compiled HLO;
and the estimated step time, tokens/s and MFU (XLA's cost model plus the splash kernels it cannot
price: a roofline ceiling, not a measurement; docs/tpu.md).
With several slices (--num_slices), the config's mesh.dcn_* factors split the mesh across them.
A program that does not fit stops with one `error: ... does not fit on <chip> ...` line.
"""

import json

from absl import flags

from launch.measure.aot import PROGRAMS, compile_programs, fits_line, program_attention, prompt_length, state_bytes
from launch.measure.step_estimate import train_estimate
from launch.measure.memory import format_bytes
from launch.run import cli
from launch.run.plan import make_plan
from launch.run.throughput import plan_peak
from launch.run.topology import chip_of, topology_devices

flags.DEFINE_string("topology", None, "TPU topology to compile for, e.g. v5p:4x4x8 (128 chips).")
flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined over DCN (mesh.dcn_* split them).")
flags.DEFINE_list("programs", list(PROGRAMS), f"Programs to compile, from {','.join(PROGRAMS)}.")
flags.DEFINE_bool("json", False, "Print the report as one JSON object.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_logs()
  cli.require("topology")
  cfg = cli.load_config()
  devices = topology_devices(FLAGS.topology, FLAGS.num_slices)
  plan = make_plan(cfg, devices, platform="tpu")
  chip = chip_of(devices)
  params_b, opt_b = state_bytes(plan)
  reports = compile_programs(plan, FLAGS.programs)
  train = next((r for r in reports if r.name == "train"), None)
  estimate = train_estimate(train, plan) if train else None
  if FLAGS.json:
    print(json.dumps({"topology": FLAGS.topology, "num_slices": FLAGS.num_slices, "chips": len(devices),
                      "chip": chip.name, "hbm_gib": chip.hbm_gib, "mesh": dict(plan.mesh.shape),
                      "params_bytes": params_b, "optimizer_bytes": opt_b,
                      "programs": [{**r.__dict__, "total_bytes": r.total_bytes} for r in reports],
                      "xla_estimate": estimate}))
    return
  slices = f" x {FLAGS.num_slices} slices" if FLAGS.num_slices > 1 else ""
  print(f"{cfg.model.num_params() / 1e9:.2f}B parameters | {FLAGS.topology}{slices}: {len(devices)} x "
        f"{chip.name} ({chip.hbm_gib:.0f} GiB HBM each) | batch {cfg.train.global_batch_size} x "
        f"{cfg.data.seq_len}, remat={cfg.model.remat}")
  for line in plan.describe():
    print(line)
  print(f"\nper chip: parameters {format_bytes(params_b)}, optimizer state {format_bytes(opt_b)}\n")
  print("| program | attention | arguments | outputs (not aliased) | temporaries | peak | collectives "
        "(count, bytes) | Mosaic kernels | compiled in |\n|---|---|---|---|---|---|---|---|---|")
  for r in reports:
    shape = {"prefill": f" ({prompt_length(plan)} tokens)", "decode": f" (loop to {plan.cfg.data.seq_len} columns)"}.get(r.name, "")
    print(f"| {r.name}{shape} | {program_attention(plan, r.name)} | {format_bytes(r.argument_bytes)} | {format_bytes(r.output_bytes - r.alias_bytes)} "
          f"| {format_bytes(r.temp_bytes)} | {format_bytes(r.total_bytes)} | {r.collective_count}, "
          f"{format_bytes(r.collective_bytes)} | {r.mosaic_kernels} | {r.compile_s:.1f}s |")
  if train:
    print("\n" + fits_line(train, plan))
    kinds = ", ".join(f"{k} {v['count']} ({format_bytes(v['bytes'])})" for k, v in train.collectives.items()
                      if v["count"])
    print(f"train step collectives per chip: {kinds or 'none'}")
  if estimate and estimate["step_s"] is None:
    print(f"no step-time estimate: {estimate['why']}")
  elif estimate:
    peak, source = plan_peak(plan)
    print(f"estimated (XLA's cost model, {estimate['method']}, plus {estimate['attention_s'] * 1e3:.3g} ms of "
          f"splash kernels at peak; a roofline ceiling, not a measurement): step "
          f"{estimate['step_s'] * 1e3:.3g} ms, {estimate['tokens_per_s']:,.0f} tokens/s, MFU "
          f"{estimate['mfu']:.1%} of the peak, {peak / 1e12:,.0f} TFLOP/s ({source})")


if __name__ == "__main__":
  cli.run(main)
