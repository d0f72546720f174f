"""Exports a checkpoint's forward pass (float or quantized) as serialized StableHLO plus parameters.

  python -m launch.export --checkpoint_dir runs/demo/w8a8 --out_dir runs/demo/w8a8-servable
  python compress/servable.py runs/demo/w8a8-servable 12,7,99    # runs it without the model code

The artifact takes int32 tokens [any batch, --seq_len] and returns float32 logits; with
--generate_tokens N it also generates N tokens after left-padded prompts of --seq_len columns
(`Servable.generate`, the same cached decode loop as launch.generate); see compress/export.py.
"""

import json

from absl import flags

from compress.export import export_checkpoint
from launch.run import cli

cli.define_checkpoint_flags("A checkpoint directory (float or from launch.quantize).")
flags.DEFINE_string("out_dir", None, "Directory for the artifact.")
flags.DEFINE_integer("seq_len", 0, "Token positions per call (0: the run's data.seq_len).")
flags.DEFINE_integer("batch", 0, "Fixed batch size (0: symbolic, any batch).")
flags.DEFINE_integer("generate_tokens", 0, "Also export generation of this many tokens after --seq_len "
                     "(left-padded) prompt columns (0: forward only).")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature of the exported generation (0: greedy).")
flags.DEFINE_integer("top_k", 0, "Top-k of the exported generation (0: whole vocabulary).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_logs()
  cli.require("checkpoint_dir", "out_dir")
  info = export_checkpoint(FLAGS.checkpoint_dir, FLAGS.out_dir, step=FLAGS.step, seq_len=FLAGS.seq_len,
                           batch=FLAGS.batch, generate_tokens=FLAGS.generate_tokens,
                           temperature=FLAGS.temperature, top_k=FLAGS.top_k)
  print(json.dumps(info, indent=2))


if __name__ == "__main__":
  cli.run(main)
