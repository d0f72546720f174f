"""Post-training int8 quantization of a trained checkpoint into a new, self-describing checkpoint.

  python -m launch.quantize --checkpoint_dir runs/demo/checkpoints --out_dir runs/demo/w8a16 \
      --mode w8a16 --quantize_embedding
  python -m launch.quantize --checkpoint_dir runs/demo/checkpoints --out_dir runs/demo/w8a8 \
      --mode w8a8 --alpha 0.5 --calibration_batches 8 --quantize_embedding

The output directory is an ordinary checkpoint (params + meta, the config saying model.quant=...),
so `launch.eval`, `launch.generate` and `launch.export` take it like a float one. Prints a JSON
report with the parameter bytes of both checkpoints. See docs/quantization.md.
"""

import json

from absl import flags

from compress.quantize import MODES
from compress.quantize_run import quantize_checkpoint
from launch.run import cli

cli.define_checkpoint_flags("The float run's checkpoint directory (<workdir>/checkpoints).")
flags.DEFINE_string("out_dir", None, "Where the quantized checkpoint goes (must hold no checkpoint yet).")
flags.DEFINE_enum("mode", "w8a16", MODES, "w8a16: int8 weights; w8a8: int8 weights and activations.")
flags.DEFINE_bool("quantize_embedding", False, "Also int8 the embedding (and so a tied output projection).")
flags.DEFINE_list("skip", [], "Dense layers to leave in float, e.g. mlp.down,unembed.")
flags.DEFINE_bool("smooth", True, "w8a8 only: SmoothQuant smoothing from calibration batches.")
flags.DEFINE_float("alpha", 0.5, "SmoothQuant migration strength in [0, 1].")
flags.DEFINE_integer("calibration_batches", 8, "Training-corpus batches for calibration (w8a8 + smooth).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_logs()
  cli.require("checkpoint_dir", "out_dir")
  report = quantize_checkpoint(
      FLAGS.checkpoint_dir, FLAGS.out_dir, mode=FLAGS.mode, step=FLAGS.step,
      quantize_embedding=FLAGS.quantize_embedding, skip=tuple(FLAGS.skip), smooth=FLAGS.smooth,
      alpha=FLAGS.alpha, calibration_batches=FLAGS.calibration_batches)
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  cli.run(main)
