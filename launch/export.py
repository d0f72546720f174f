"""Exports a checkpoint's forward pass (float or quantized) as serialized StableHLO plus parameters.

  python -m launch.export --checkpoint_dir runs/demo/w8a8 --out_dir runs/demo/w8a8-servable
  python compress/servable.py runs/demo/w8a8-servable 12,7,99    # runs it without the model code

The artifact takes int32 tokens [any batch, --seq_len] and returns float32 logits; see
compress/export.py for its files.
"""

import json

from absl import flags

from compress.export import export_checkpoint
from launch.run import cli

cli.define_checkpoint_flags("A checkpoint directory (float or from launch.quantize).")
flags.DEFINE_string("out_dir", None, "Directory for the artifact.")
flags.DEFINE_integer("seq_len", 0, "Token positions per call (0: the run's data.seq_len).")
flags.DEFINE_integer("batch", 0, "Fixed batch size (0: symbolic, any batch).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_logs()
  cli.require("checkpoint_dir", "out_dir")
  info = export_checkpoint(FLAGS.checkpoint_dir, FLAGS.out_dir, step=FLAGS.step, seq_len=FLAGS.seq_len,
                           batch=FLAGS.batch)
  print(json.dumps(info, indent=2))


if __name__ == "__main__":
  cli.run(main)
