"""Prompt in, text out, from any checkpoint, with a KV cache.

  python -m launch.generate --checkpoint_dir runs/demo/checkpoints --prompt "ROMEO." \
      --max_new_tokens 64 --temperature 0.8 --top_k 50 --top_p 0.95
  python -m launch.generate --checkpoint_dir runs/llama-3.2-1b-instruct/converted --chat \
      --prompt "What is the capital of France?" [--system "Answer in one word."]

--chat treats each prompt as a user message: the checkpoint's chat template (its Hugging Face
tokenizer's, lm/data/chat.py) wraps it, and generation stops at the model's end-of-turn tokens;
only the reply is printed.
"""

from absl import flags

from launch.run import cli
from launch.run.restore import load_checkpoint
from lm.data.chat import chat_format
from lm.generate import check_sampling_args

cli.define_checkpoint_flags("A run's checkpoint directory (<workdir>/checkpoints).")
flags.DEFINE_multi_string("prompt", ["ROMEO."], "Prompt text; repeat the flag for several prompts.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate after each prompt.")
flags.DEFINE_float("temperature", 0.8, "0 for greedy decoding.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: all).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("chat", False, "Each --prompt is a user message in the checkpoint's chat template; "
                  "stop at the end-of-turn tokens and print the reply only.")
flags.DEFINE_string("system", None, "--chat: a system message before each prompt.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_logs()
  cli.require("checkpoint_dir")
  check_sampling_args(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  loaded = load_checkpoint(FLAGS.checkpoint_dir, FLAGS.step)
  prompts, extra = FLAGS.prompt, {}
  if FLAGS.chat:
    chat = chat_format(loaded.cfg.data.tokenizer, loaded.cfg.data.tokenizer_path, loaded.tokenizer)
    system = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
    prompts = [chat.render(system + [{"role": "user", "content": p}]) for p in FLAGS.prompt]
    extra = dict(stop_ids=chat.stop_ids, echo=False)
  for prompt, text in zip(FLAGS.prompt, loaded.generate(
      prompts, max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
      top_p=FLAGS.top_p, seed=FLAGS.seed, **extra)):
    print(f"> {prompt}\n{text}" if FLAGS.chat else text)
    print("-" * 60)


if __name__ == "__main__":
  cli.run(main)
