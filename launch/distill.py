"""Distill a trained teacher into a smaller student, with the ordinary training loop.

  python -m launch.distill --config configs/demo.py --workdir runs/student \
      --config.model.num_layers=2 --config.model.d_model=128 --config.model.mlp_dim=384 \
      --config.model.num_heads=4 --config.model.num_kv_heads=2 \
      --config.distill.teacher_checkpoint=runs/demo/checkpoints [--resume]

The config describes the student (model, data, schedule, mesh) and `distill.*`; the teacher's shapes
come from its checkpoint. Both are placed on the student's mesh by the student's rule table. The
result is an ordinary checkpoint: `launch.eval` and `launch.generate` read it as they read any run.
"""

import dataclasses
import json

import jax
from absl import flags

from compress.distill_run import distill
from launch.run import cli
from launch.run.preemption import StopRequest

flags.DEFINE_string("workdir", None, "Directory for the student's checkpoints, metrics and plots.")
flags.DEFINE_bool("resume", False, "Continue the distillation run whose checkpoints are in --workdir.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_logs()
  cli.require("workdir")
  cfg = cli.load_config()
  result = distill(cfg, FLAGS.workdir, resume=FLAGS.resume, stop=StopRequest().install())
  if jax.process_index() == 0:
    print(json.dumps({**dataclasses.asdict(result), "student_params": cfg.model.num_params()}, indent=2))


if __name__ == "__main__":
  cli.run(main)
