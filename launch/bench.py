"""Train-step speed: tokens/s, step time, model TFLOP/s and MFU, per configuration.

  python -m launch.bench --config configs/bench.py --dtypes float32,bfloat16 --presets \
      --out docs/results/bench [--profile /tmp/trace]

Times the jitted train step on random tokens: compile and warm-up excluded, then --steps timed steps
(median and spread). Model FLOPs come from lm/flops.py; the peak from launch/run/throughput.py (the chip's
spec sheet, or on CPU a matmul of the model's largest shape measured in this run). --presets adds the
same model on 8 (simulated) devices under each parallelism preset. Writes bench.md and bench.csv.
"""

import sys

from absl import flags

from launch.measure.profile import profile_markdown, summarize_trace
from launch.measure.tables import write_table
from launch.measure.timing import bench_row, variant
from launch.run import cli
from launch.run.devices import simulate_cpu_devices
from sharding.rules import EXAMPLE_MESHES_8

flags.DEFINE_string("out", None, "Write bench.md and bench.csv here.")
flags.DEFINE_string("dtypes", "float32", "Comma-separated compute dtypes for the single-device rows.")
flags.DEFINE_bool("presets", False, "Also run every parallelism preset on 8 devices.")
flags.DEFINE_integer("steps", 5, "Timed steps per configuration.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_string("profile", None, "Write a jax.profiler trace of 3 steps of the first row here.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_logs()
  simulate_cpu_devices(8)  # for --presets on CPU; accelerators are unaffected
  cfg = cli.load_config()
  rows, first_compiled = [], None
  for i, dtype in enumerate(FLAGS.dtypes.split(",")):
    row, compiled = bench_row(f"{cfg.mesh.rules} single device", variant(cfg, dtype), FLAGS.steps,
                              FLAGS.warmup, FLAGS.profile if i == 0 else None)
    rows.append(row)
    first_compiled = first_compiled or compiled
  if FLAGS.presets:
    base_dtype = FLAGS.dtypes.split(",")[0]
    for rules, mesh in EXAMPLE_MESHES_8.items():
      rows.append(bench_row(rules, variant(cfg, base_dtype, rules, mesh, 8), FLAGS.steps, FLAGS.warmup)[0])
  profile = ""
  if FLAGS.profile:
    summary = summarize_trace(FLAGS.profile, first_compiled.as_text())
    profile = profile_markdown(summary, rows[0]["config"] + " " + rows[0]["dtype"])
    print(profile)
  if FLAGS.out:
    command = "python -m launch.bench " + " ".join(sys.argv[1:])
    write_table(rows, FLAGS.out, "bench", "Train-step benchmark", command, profile)


if __name__ == "__main__":
  cli.run(main)
