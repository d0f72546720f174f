"""Train-step speed: tokens/s, step time, model TFLOP/s and MFU, per configuration.

  python -m launch.bench --config configs/bench.py --dtypes float32,bfloat16 --presets \
      --out docs/results/bench [--profile /tmp/trace]

Times the jitted train step on random tokens: compile and warm-up excluded, then --steps timed steps
(median and spread). Model FLOPs come from lm/flops.py; the peak from launch/hardware.py (the chip's
spec sheet, or on CPU a matmul of the model's largest shape measured in this run). --presets adds the
same model on 8 (simulated) devices under each parallelism preset. Writes bench.md and bench.csv.
"""

import os

# 8 simulated devices for --presets on CPU; the flag only affects the host platform.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from absl import app, flags  # noqa: E402

from launch.benchmarking import bench_row, profile_markdown, variant, write_table  # noqa: E402
from launch.cli import load_config, quiet_logs  # noqa: E402
from launch.profile_summary import summarize_trace  # noqa: E402

flags.DEFINE_string("out", None, "Write bench.md and bench.csv here.")
flags.DEFINE_string("dtypes", "float32", "Comma-separated compute dtypes for the single-device rows.")
flags.DEFINE_bool("presets", False, "Also run every parallelism preset on 8 devices.")
flags.DEFINE_integer("steps", 5, "Timed steps per configuration.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_string("profile", None, "Write a jax.profiler trace of 3 steps of the first row here.")
FLAGS = flags.FLAGS

PRESETS = [("dp", dict(data=8, fsdp=1, tensor=1)), ("fsdp", dict(data=1, fsdp=8, tensor=1)),
           ("tp", dict(data=2, fsdp=1, tensor=4)), ("fsdp_tp", dict(data=1, fsdp=2, tensor=4)),
           ("dp_fsdp_tp", dict(data=2, fsdp=2, tensor=2))]


def main(argv):
  del argv
  quiet_logs()
  cfg = load_config()
  rows, first_compiled = [], None
  for i, dtype in enumerate(FLAGS.dtypes.split(",")):
    row, compiled = bench_row(f"{cfg.mesh.rules} single device", variant(cfg, dtype), FLAGS.steps,
                              FLAGS.warmup, FLAGS.profile if i == 0 else None)
    rows.append(row)
    first_compiled = first_compiled or compiled
  if FLAGS.presets:
    base_dtype = FLAGS.dtypes.split(",")[0]
    for rules, mesh in PRESETS:
      rows.append(bench_row(rules, variant(cfg, base_dtype, rules, mesh, 8), FLAGS.steps, FLAGS.warmup)[0])
  profile = ""
  if FLAGS.profile:
    summary = summarize_trace(FLAGS.profile, first_compiled.as_text())
    profile = profile_markdown(summary, rows[0]["config"] + " " + rows[0]["dtype"])
    print(profile)
  if FLAGS.out:
    command = "python -m launch.bench " + " ".join(a for a in os.sys.argv[1:])
    write_table(rows, FLAGS.out, "bench", "Train-step benchmark", command, profile)


if __name__ == "__main__":
  app.run(main)
