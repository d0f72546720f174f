"""Plan a run's memory from a laptop: per-device bytes of parameters, optimizer state and activations.

  python -m launch.memory --config configs/llama_1b.py --devices 64
  python -m launch.memory --config configs/demo.py --config.model.remat=full

Compiles the train step for the config's mesh on `--devices` simulated CPU devices (default: the
devices present) and prints what `memory_analysis()` reports per device. Nothing is allocated or
run. The scheduler flag it sets can deadlock CPU collectives when the step also *runs* on several
simulated devices, so it is only used here, where nothing runs. On CPU the numbers are XLA's CPU schedule; an accelerator's compiler schedules differently, so
treat temporaries as an estimate (within tens of percent), parameters and optimizer state as exact.
"""

import dataclasses
import json
import os
import re
import sys

if __name__ == "__main__":
  # Devices must be simulated before jax starts; the scheduler flag makes CPU memory honour remat.
  match = next((re.match(r"--devices[= ](\d+)", a) for a in sys.argv if a.startswith("--devices")), None)
  if match is None and "--devices" in sys.argv:
    match = re.match(r"(\d+)", sys.argv[sys.argv.index("--devices") + 1])
  flags_text = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
  if match:
    flags_text += f" --xla_force_host_platform_device_count={match.group(1)}"
  os.environ["XLA_FLAGS"] = flags_text.strip()

from absl import app, flags  # noqa: E402

from launch.cli import load_config, quiet_logs  # noqa: E402
from launch.memory_report import format_bytes, memory_report  # noqa: E402

flags.DEFINE_integer("devices", None, "Simulated CPU devices to plan for (default: those present).")
flags.DEFINE_bool("json", False, "Print the report as one JSON object instead of a table.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  quiet_logs()
  cfg = load_config()
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


if __name__ == "__main__":
  app.run(main)
