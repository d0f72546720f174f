"""One point of a sweep, in its own process (launch.sweep starts it; see launch/measure/sweep_point.py).

  python -m launch.sweep_point --config configs/demo.py --config.mesh.fsdp=8 --config.mesh.data=1 \
      --config.mesh.rules=fsdp --out runs/sweep-x/points/p.json [--compile_only] [--steps 5] [--devices 8]

Always writes --out (a local path or gs:// URL), a JSON object with `status` (ok | invalid | oom | error) and `reason`, plus the
memory columns (and timing unless --compile_only). With --topology the step is compiled for that
TPU slice and nothing runs: the columns are the TPU compiler's, plus XLA's estimated step time.
"""

import json
import os
import sys
import time

import jax
from absl import flags

from launch.measure.sweep_point import run_point
from launch.run import cli
from launch.run.devices import simulate_cpu_devices
from launch.run.topology import topology_devices
from launch.storage import paths

flags.DEFINE_string("out", None, "Write the point's JSON result here.")
flags.DEFINE_bool("compile_only", False, "Compile and read memory; run no steps.")
flags.DEFINE_integer("steps", 5, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_integer("devices", 8, "Simulated CPU devices (CPU only).")
flags.DEFINE_bool("timing_only", False, "Internal: time steps only, with XLA's default CPU schedule.")
flags.DEFINE_string("topology", None, "Compile for this TPU slice (e.g. v5p:4x4x8); nothing runs.")
flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined over DCN.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_logs()
  cli.require("out")
  devices = None
  if FLAGS.topology:
    devices = topology_devices(FLAGS.topology, FLAGS.num_slices)
  else:
    simulate_cpu_devices(FLAGS.devices, memory_schedule=not FLAGS.timing_only)
  start = time.perf_counter()
  result = run_point(FLAGS.config, FLAGS.compile_only, FLAGS.steps, FLAGS.warmup, FLAGS.timing_only,
                     sys.argv[1:], devices=devices)
  result.update(mode="compile" if FLAGS.compile_only else "time", steps=FLAGS.steps,
                wall_s=time.perf_counter() - start, jax_version=jax.__version__)
  if paths.is_url(FLAGS.out):
    paths.write_text(FLAGS.out, json.dumps(result, indent=1))  # one upload: whole or absent
  else:  # a local file appears whole too: written aside, then renamed
    paths.write_text(FLAGS.out + ".tmp", json.dumps(result, indent=1))
    os.replace(FLAGS.out + ".tmp", FLAGS.out)
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main)
