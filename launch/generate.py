"""Prompt in, text out, from any checkpoint, with a KV cache.

  python -m launch.generate --checkpoint_dir runs/demo/checkpoints --prompt "ROMEO." \
      --max_new_tokens 64 --temperature 0.8 --top_k 50 --top_p 0.95
"""

from absl import flags

from launch.run import cli
from launch.run.restore import load_checkpoint
from lm.generate import check_sampling_args

cli.define_checkpoint_flags("A run's checkpoint directory (<workdir>/checkpoints).")
flags.DEFINE_multi_string("prompt", ["ROMEO."], "Prompt text; repeat the flag for several prompts.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate after each prompt.")
flags.DEFINE_float("temperature", 0.8, "0 for greedy decoding.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: all).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_logs()
  cli.require("checkpoint_dir")
  check_sampling_args(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  loaded = load_checkpoint(FLAGS.checkpoint_dir, FLAGS.step)
  for text in loaded.generate(FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens,
                              temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                              seed=FLAGS.seed):
    print(text)
    print("-" * 60)


if __name__ == "__main__":
  cli.run(main)
