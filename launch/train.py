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

from launch.cli import FLAGS, load_config, quiet_logs
from launch.preemption import StopRequest
from launch.trainer import train

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_bool("resume", False, "Continue the run whose checkpoints are in --workdir.")


def main(argv):
  del argv
  quiet_logs()
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required.")
  cfg = load_config()
  result = train(cfg, FLAGS.workdir, resume=FLAGS.resume, stop=StopRequest().install())
  if jax.process_index() == 0:
    print(json.dumps(dataclasses.asdict(result), indent=2))


if __name__ == "__main__":
  app.run(main)
