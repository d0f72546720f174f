"""Plan a run's memory from a laptop: per-device bytes of parameters, optimizer state and activations.

  python -m launch.memory --config configs/llama_1b.py --devices 64
  python -m launch.memory --config configs/demo.py --config.model.remat=full
  python -m launch.memory --config configs/llama_1b.py --devices 1 --device_memory 139 --device_name H200 \
      --config.train.global_batch_size=8 --config.model.remat=none --config.model.dtype=bfloat16

Compiles the train step for the config's mesh on `--devices` simulated CPU devices (default: the
devices present) and prints what `memory_analysis()` reports per device. Nothing is allocated or
run. The scheduler flag it sets can deadlock CPU collectives when the step also *runs* on several
simulated devices, so it is only used here, where nothing runs. On CPU the numbers are XLA's CPU schedule; an accelerator's compiler schedules differently, so
treat temporaries as an estimate (within tens of percent), parameters and optimizer state as exact.
The last line says whether the peak estimate fits one device: of `--device_memory` GiB when given,
else of the accelerator present (its allocator's limit); on CPU without the flag it is omitted.
"""

import dataclasses
import json

from absl import flags

import jax

from launch.measure.memory import device_memory, fit_verdict, format_bytes, memory_report
from launch.run import cli
from launch.run.devices import simulate_cpu_devices

flags.DEFINE_integer("devices", None, "Simulated CPU devices to plan for (default: those present).")
flags.DEFINE_float("device_memory", None, "GiB one device can allocate, e.g. 139 for an H200.")
flags.DEFINE_string("device_name", "the device", "What --device_memory describes, e.g. H200.")
flags.DEFINE_bool("json", False, "Print the report as one JSON object instead of a table.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_logs()
  # Before jax starts: the device count, and the CPU schedule whose memory_analysis() honours remat.
  simulate_cpu_devices(FLAGS.devices, memory_schedule=True)
  cfg = cli.load_config()
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
  capacity = ((FLAGS.device_name, int(FLAGS.device_memory * 2**30)) if FLAGS.device_memory
              else device_memory(jax.devices()[0]))
  if capacity:
    print(fit_verdict(report.total_bytes, *capacity))


if __name__ == "__main__":
  cli.run(main)
