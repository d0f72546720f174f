"""Train a language model from a config.

  python -m launch.train --config configs/smoke.py --workdir runs/smoke [--resume | --step N]
  python -m launch.train --config configs/demo.py --config.train.steps=50 --workdir runs/demo

A workdir that already holds checkpoints is continued with --resume (the newest readable step) or
--step N, and never overwritten without them; one run at a time holds a workdir. On SIGTERM the
run saves at the next step boundary and exits 0; a NaN/inf loss stops it with exit status 1
(train.nonfinite). Errors print one `error: ...` line (--debug for the traceback).
"""

import dataclasses
import json

import jax
from absl import flags

from launch.run import cli, distributed
from launch.run.loop import train
from launch.run.preemption import StopRequest

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_bool("resume", False, "Continue the run whose checkpoints are in --workdir.")
flags.DEFINE_integer("step", None, "Continue from this checkpoint step of --workdir (implies --resume); "
                     "newer steps are moved to <workdir>/checkpoints.set_aside/.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process run "
                    "(not needed on TPU pods or under SLURM, where it is detected).")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_integer("cpu_devices", None, "CPU devices of this process (simulated; CPU runs only).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_logs()
  cli.require("workdir")
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         FLAGS.cpu_devices)
  cfg = cli.load_config()
  result = train(cfg, FLAGS.workdir, resume=FLAGS.resume, resume_step=FLAGS.step,
                 stop=StopRequest().install())
  if jax.process_index() == 0:
    print(json.dumps(dataclasses.asdict(result), indent=2))


if __name__ == "__main__":
  cli.run(main)
