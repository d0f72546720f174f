"""Convert Hugging Face Llama checkpoints to ours and back (docs/huggingface.md).

  python -m launch.convert --from-hf path/to/hf_model --out runs/llama/converted
  python -m launch.convert --from-hf path/to/hf_model --out runs/llama/converted \
      --config configs/my_finetune.py --config.mesh.rules=fsdp --config.mesh.data=1 --config.mesh.fsdp=-1
  python -m launch.convert --to-hf runs/llama-ft/checkpoints --out runs/llama-ft/hf [--dtype bfloat16]

Import writes a params-only checkpoint at step 0 (no optimizer state): `launch.generate` and
`launch.eval` read it, and a training run starts from it with
`--config.train.init_checkpoint=<out>` (fresh optimizer). The model section of its config comes from
config.json; the other sections from --config (default configs/base.py), whose mesh decides where
each tensor shard is read to. Every check runs before anything is written.
"""

from absl import app, flags

from launch.huggingface.convert import export_hf, import_hf, model_flags
from launch.run import cli
from lm.config import DTYPES, ModelConfig

flags.DEFINE_string("from-hf", None, "A Hugging Face LlamaForCausalLM directory to import.")
flags.DEFINE_string("to-hf", None, "One of our checkpoint directories to export.")
flags.DEFINE_string("out", None, "Output directory (must be empty or absent).")
flags.DEFINE_integer("step", None, "--to-hf: checkpoint step to export (default: latest).")
flags.DEFINE_enum("param_dtype", None, list(DTYPES),
                  "--from-hf: storage dtype of our parameters (default: the config's model.param_dtype).")
flags.DEFINE_enum("dtype", None, list(DTYPES),
                  "--to-hf: dtype of the exported tensors (default: the checkpoint's model.param_dtype).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_logs()
  from_hf, to_hf = FLAGS["from-hf"].value, FLAGS["to-hf"].value
  if bool(from_hf) == bool(to_hf) or not FLAGS.out:
    raise app.UsageError("pass exactly one of --from-hf DIR or --to-hf CKPT_DIR, and --out DIR.")
  if from_hf:
    config = import_hf(from_hf, FLAGS.out, FLAGS.config, FLAGS.param_dtype)
    n = ModelConfig(**config["model"]).num_params() / 1e6
    print(f"Converted {from_hf} ({n:.2f}M params) to a params-only checkpoint at {FLAGS.out} (step 0).\n"
          f"Its model config, as flags for a training config:\n  {model_flags(config)}\n"
          f"Fine-tune from it with --config.train.init_checkpoint={FLAGS.out}")
  else:
    files = export_hf(to_hf, FLAGS.out, FLAGS.step, FLAGS.dtype)
    if files:
      print(f"Exported {to_hf} to {FLAGS.out}: {', '.join(files)}")


if __name__ == "__main__":
  cli.run(main)
