"""Validation perplexity of any checkpoint, beside the unigram baseline of the same tokenization.

  python -m launch.eval --checkpoint_dir runs/demo/checkpoints [--step N] [--eval_batches 0]
"""

import json

from absl import app, flags

from launch.cli import define_checkpoint_flags, quiet_logs
from launch.evaluate import eval_checkpoint

define_checkpoint_flags("A run's checkpoint directory (<workdir>/checkpoints).")
flags.DEFINE_integer("eval_batches", 0, "Validation batches (0: the whole split).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  quiet_logs()
  if not FLAGS.checkpoint_dir:
    raise app.UsageError("--checkpoint_dir is required.")
  print(json.dumps(eval_checkpoint(FLAGS.checkpoint_dir, FLAGS.step, FLAGS.eval_batches), indent=2))


if __name__ == "__main__":
  app.run(main)
