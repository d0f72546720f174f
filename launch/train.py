"""Train a language model from a config.

  python -m launch.train --config configs/smoke.py --workdir runs/smoke [--resume]
  python -m launch.train --config configs/demo.py --config.train.steps=50 --workdir runs/demo

A workdir that already holds checkpoints is continued with --resume and never overwritten without it.
On SIGTERM the run saves at the next step boundary and exits 0.
"""

import dataclasses
import json

import jax
from absl import app, flags

from launch import distributed
from launch.cli import FLAGS, load_config, quiet_logs
from launch.preemption import StopRequest
from launch.trainer import train

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_bool("resume", False, "Continue the run whose checkpoints are in --workdir.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process run "
                    "(not needed on TPU pods or under SLURM, where it is detected).")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_integer("cpu_devices", None, "CPU devices of this process (simulated; CPU runs only).")


def main(argv):
  del argv
  quiet_logs()
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required.")
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         FLAGS.cpu_devices)
  cfg = load_config()
  result = train(cfg, FLAGS.workdir, resume=FLAGS.resume, stop=StopRequest().install())
  if jax.process_index() == 0:
    print(json.dumps(dataclasses.asdict(result), indent=2))


if __name__ == "__main__":
  app.run(main)
