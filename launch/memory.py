"""Plan a run's memory from a laptop: per-device bytes of parameters, optimizer state and activations.

  python -m launch.memory --config configs/llama_1b.py --devices 64
  python -m launch.memory --config configs/demo.py --config.model.remat=full
  python -m launch.memory --config configs/llama_1b.py --devices 1 --device_memory 139 --device_name H200 \
      --config.train.global_batch_size=8 --config.model.remat=none --config.model.dtype=bfloat16
  python -m launch.memory --config configs/llama_8b.py --topology v5p:4x4x8   # the TPU compiler's numbers

Compiles the train step for the config's mesh on `--devices` simulated CPU devices (default: the
devices present) and prints what `memory_analysis()` reports per device. Nothing is allocated or
run. The scheduler flag it sets can deadlock CPU collectives when the step also *runs* on several
simulated devices, so it is only used here, where nothing runs. On CPU the numbers are XLA's CPU schedule; an accelerator's compiler schedules differently, so
treat temporaries as an estimate (within tens of percent), parameters and optimizer state as exact.
The last line says whether the peak estimate fits one device: of `--device_memory` GiB when given,
else of the accelerator present (its allocator's limit); on CPU without the flag it is omitted.

With --topology (a TPU slice such as v5p:4x4x8; needs the `tpu` extra) the step is compiled by the
TPU compiler for that slice's chips instead (launch/run/topology.py), so temporaries are TPU's own
layout, and the verdict is against the chip's HBM (launch/run/chips.py). A step the chip cannot
hold stops with one `error: ... does not fit on <chip> ...` line. launch.compile says more (eval,
prefill, decode, collectives, XLA's time estimate).
"""

import dataclasses
import json

from absl import flags

import jax

from launch.measure.aot import tpu_memory_report
from launch.measure.memory import device_memory, fit_verdict, format_bytes, memory_report
from launch.run import cli
from launch.run.devices import simulate_cpu_devices
from launch.run.plan import make_plan
from launch.run.topology import chip_of, topology_devices

flags.DEFINE_integer("devices", None, "Simulated CPU devices to plan for (default: those present).")
flags.DEFINE_float("device_memory", None, "GiB one device can allocate, e.g. 139 for an H200.")
flags.DEFINE_string("device_name", "the device", "What --device_memory describes, e.g. H200.")
flags.DEFINE_bool("json", False, "Print the report as one JSON object instead of a table.")
flags.DEFINE_string("topology", None, "Compile for this TPU slice instead, e.g. v5p:4x4x8 (tpu extra).")
flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined over DCN (mesh.dcn_* split them).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_logs()
  # Before jax starts: the device count, and the CPU schedule whose memory_analysis() honours remat.
  if FLAGS.topology and FLAGS.devices:
    raise ValueError("--devices simulates CPU devices and --topology names a TPU slice; give one of them.")
  if not FLAGS.topology:
    simulate_cpu_devices(FLAGS.devices, memory_schedule=True)
  cfg = cli.load_config()
  capacity = None
  if FLAGS.topology:
    devices = topology_devices(FLAGS.topology, FLAGS.num_slices)
    chip = chip_of(devices)
    capacity = (f"{chip.name} ({FLAGS.topology})", int(chip.hbm_gib * 2**30))
    report = tpu_memory_report(make_plan(cfg, devices, platform="tpu"))
  else:
    report = memory_report(cfg)
  if FLAGS.json:
    print(json.dumps({**dataclasses.asdict(report), "total_bytes": report.total_bytes}))
    return
  rows = [("parameters", report.params_bytes), ("optimizer state", report.optimizer_bytes),
          ("step arguments (state + batch)", report.argument_bytes),
          ("step temporaries (activations, grads)", report.temp_bytes),
          ("peak estimate (arguments + temporaries)", report.total_bytes)]
  print(f"{cfg.model.num_params() / 1e6:.1f}M parameters | mesh {report.mesh} rules={cfg.mesh.rules} "
        f"remat={cfg.model.remat} | batch {cfg.train.global_batch_size} x {cfg.data.seq_len} "
        f"| compiled in {report.compile_s:.1f}s")
  print("| per device | bytes |\n|---|---|")
  for name, value in rows:
    print(f"| {name} | {format_bytes(value)} |")
  capacity = capacity or ((FLAGS.device_name, int(FLAGS.device_memory * 2**30)) if FLAGS.device_memory
                           else device_memory(jax.devices()[0]))
  if capacity:
    print(fit_verdict(report.total_bytes, *capacity))


if __name__ == "__main__":
  cli.run(main)
