"""Validation perplexity of any checkpoint, beside the unigram baseline of the same tokenization.

  python -m launch.eval --checkpoint_dir runs/demo/checkpoints [--step N] [--eval_batches 0]
  python -m launch.eval --checkpoint_dir runs/demo/checkpoints --mesh fsdp=8 --rules fsdp

Runs under the checkpoint's mesh and rules, or under --mesh/--rules.
"""

import json

from absl import flags

from launch.run import cli
from launch.run.evaluation import eval_checkpoint

cli.define_checkpoint_flags("A run's checkpoint directory (<workdir>/checkpoints).")
flags.DEFINE_integer("eval_batches", 0, "Validation batches (0: the whole split).")
cli.define_mesh_flags()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_logs()
  cli.require("checkpoint_dir")
  print(json.dumps(eval_checkpoint(FLAGS.checkpoint_dir, FLAGS.step, FLAGS.eval_batches,
                                   cli.mesh_overrides()), indent=2))


if __name__ == "__main__":
  cli.run(main)
