"""Exports a checkpoint's forward pass (float or quantized) as serialized StableHLO plus parameters.

  python -m launch.export --checkpoint_dir runs/demo/w8a8 --out_dir runs/demo/w8a8-servable
  python compress/servable.py runs/demo/w8a8-servable 12,7,99    # runs it without the model code

The artifact takes int32 tokens [any batch, --seq_len] and returns float32 logits; see
compress/export.py for its files.
"""

import json

import jax
from absl import app, flags

from compress.export import save_servable
from launch.cli import define_checkpoint_flags, quiet_logs
from launch.inference import load_checkpoint

define_checkpoint_flags("A checkpoint directory (float or from launch.quantize).")
flags.DEFINE_string("out_dir", None, "Directory for the artifact.")
flags.DEFINE_integer("seq_len", 0, "Token positions per call (0: the run's data.seq_len).")
flags.DEFINE_integer("batch", 0, "Fixed batch size (0: symbolic, any batch).")
FLAGS = flags.FLAGS


def export_checkpoint(checkpoint_dir: str, out_dir: str, *, step: int | None = None, seq_len: int = 0,
                      batch: int = 0) -> dict:
  """Writes the servable artifact of `checkpoint_dir` to `out_dir`; returns its info dict."""
  if not out_dir:
    raise ValueError("out_dir is required: the directory the artifact is written to.")
  loaded = load_checkpoint(checkpoint_dir, step, devices=jax.devices()[:1])
  return save_servable(out_dir, loaded.ctx.mdef.graphdef, loaded.params, loaded.cfg.model,
                       batch=batch or None, seq_len=seq_len or loaded.cfg.data.seq_len, step=loaded.step)


def main(argv):
  del argv
  quiet_logs()
  if not FLAGS.checkpoint_dir:
    raise app.UsageError("--checkpoint_dir is required.")
  info = export_checkpoint(FLAGS.checkpoint_dir, FLAGS.out_dir, step=FLAGS.step, seq_len=FLAGS.seq_len,
                           batch=FLAGS.batch)
  print(json.dumps(info, indent=2))


if __name__ == "__main__":
  app.run(main)
