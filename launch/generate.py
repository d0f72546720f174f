"""Prompt in, text out, from any checkpoint, with a KV cache.

  python -m launch.generate --checkpoint_dir runs/demo/checkpoints --prompt "ROMEO." \
      --max_new_tokens 64 --temperature 0.8 --top_k 50 --top_p 0.95
"""

from absl import app, flags

from launch.cli import define_checkpoint_flags, quiet_logs
from launch.inference import generate_text, load_checkpoint
from lm.generate import check_sampling_args

define_checkpoint_flags("A run's checkpoint directory (<workdir>/checkpoints).")
flags.DEFINE_multi_string("prompt", ["ROMEO."], "Prompt text; repeat the flag for several prompts.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate after each prompt.")
flags.DEFINE_float("temperature", 0.8, "0 for greedy decoding.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: all).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  quiet_logs()
  if not FLAGS.checkpoint_dir:
    raise app.UsageError("--checkpoint_dir is required.")
  check_sampling_args(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  loaded = load_checkpoint(FLAGS.checkpoint_dir, FLAGS.step)
  for text in generate_text(loaded, FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens,
                            temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                            seed=FLAGS.seed):
    print(text)
    print("-" * 60)


if __name__ == "__main__":
  app.run(main)
