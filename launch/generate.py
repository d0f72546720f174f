"""Prompt in, text out, from any checkpoint, with a KV cache.

  python -m launch.generate --checkpoint_dir runs/demo/checkpoints --prompt "ROMEO." \
      --max_new_tokens 64 --temperature 0.8 --top_k 50 --top_p 0.95
  python -m launch.generate --checkpoint_dir runs/demo/checkpoints --prompts_file prompts.txt \
      --batch_size 16 --temperature 0                 # one JSON line per prompt, as batches finish

  python -m launch.generate --checkpoint_dir runs/llama-3.2-1b-instruct/converted --chat \
      --prompt "What is the capital of France?" [--system "Answer in one word."]

  python -m launch.generate --checkpoint_dir runs/demo/checkpoints --mesh tensor=8 --rules tp \
      --prompt "ROMEO."                               # served tensor parallel over 8 devices

The model runs under the checkpoint's mesh and rules (or --mesh/--rules), each device holding its
share of the parameters, through the programs `launch.compile` compiles for a topology
(launch/run/programs.py: prefill, then the decode loop). --chat treats each prompt as a user message: the checkpoint's chat template (its Hugging Face
tokenizer's, lm/data/chat.py) wraps it, and generation stops at the model's end-of-turn tokens;
only the reply is printed. Weights are laid out for serving once at load (lm/serving.py: per layer, in
the compute dtype, placed by the rule table;
--dtype bfloat16 serves a float32-computing checkpoint in bf16; --kv_cache_dtype int8 keeps the KV cache
in int8 with a scale per token and kv head, lm/kv_cache.py). Prompts of different lengths share
a batch (left-padded), and each row stops at its own end-of-sequence token.
"""

import json
import sys

import jax

from absl import flags

from launch.measure.memory import format_bytes, per_device_bytes
from launch.run import cli
from launch.run import programs
from launch.run.restore import load_checkpoint
from launch.storage import paths
from lm.config import DTYPES, KV_CACHE_DTYPES
from lm.data.chat import chat_format
from lm.generate import stream_text
from lm.sampling import check_sampling_args

cli.define_checkpoint_flags("A run's checkpoint directory (<workdir>/checkpoints).")
cli.define_mesh_flags()
flags.DEFINE_multi_string("prompt", ["ROMEO."], "Prompt text; repeat the flag for several prompts.")
flags.DEFINE_string("prompts_file", None, "A text file with one prompt per line (blank lines skipped); "
                    "results stream out as JSON lines {\"index\", \"text\"}. Replaces --prompt.")
flags.DEFINE_integer("batch_size", 8, "Prompts decoded together.")
flags.DEFINE_string("dtype", "", "Compute dtype to serve in (float32, bfloat16, float16; '': the "
                    "checkpoint's model.dtype).")
flags.DEFINE_string("kv_cache_dtype", "", "KV cache: compute (the compute dtype) or int8 (a scale per "
                    "token and kv head); '': the checkpoint's model.kv_cache_dtype.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate after each prompt.")
flags.DEFINE_float("temperature", 0.8, "0 for greedy decoding.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: all).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("chat", False, "Each prompt is a user message in the checkpoint's chat template; "
                  "generation stops at the end-of-turn tokens and only the reply is printed.")
flags.DEFINE_string("system", None, "--chat: a system message before each prompt.")
FLAGS = flags.FLAGS


def read_prompts(path: str) -> list[str]:
  """The non-blank lines of `path`; ValueError if it has none or cannot be read."""
  try:
    prompts = [line for line in paths.read_text(path).splitlines() if line.strip()]
  except OSError as e:
    raise ValueError(f"--prompts_file={path}: {e.strerror or e}.") from e
  if not prompts:
    raise ValueError(f"--prompts_file={path} holds no prompts (one per line).")
  return prompts


def serving_line(plan) -> str:
  """'serving on 8 cpu devices, mesh tensor=8, rules tp: parameters 1.2 MiB per device of 9.4 MiB'."""
  abstract = programs.abstract_serving_params(plan)
  whole = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract))
  shape = " x ".join(f"{k}={v}" for k, v in plan.mesh.shape.items() if v > 1) or "one device"
  return (f"serving on {plan.num_devices} {plan.platform} device(s), mesh {shape}, rules "
          f"{plan.cfg.mesh.custom_rules or plan.cfg.mesh.rules}: parameters {format_bytes(per_device_bytes(abstract))} "
          f"per device of {format_bytes(whole)} ({plan.cfg.model.dtype})")


def main(argv):
  del argv
  cli.quiet_logs()
  cli.require("checkpoint_dir")
  check_sampling_args(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  if FLAGS.dtype and FLAGS.dtype not in DTYPES:
    raise ValueError(f"--dtype={FLAGS.dtype!r}: choose one of {sorted(DTYPES)} (or '' for the checkpoint's).")
  if FLAGS.kv_cache_dtype and FLAGS.kv_cache_dtype not in KV_CACHE_DTYPES:
    raise ValueError(f"--kv_cache_dtype={FLAGS.kv_cache_dtype!r}: choose one of {list(KV_CACHE_DTYPES)} "
                     "(or '' for the checkpoint's).")
  prompts = read_prompts(FLAGS.prompts_file) if FLAGS.prompts_file else FLAGS.prompt
  # --dtype and --kv_cache_dtype are overrides of the checkpoint's config, so the run plan (the
  # attention kernels depend on the compute dtype) is made for what actually runs.
  overrides = {key: value for key, value in (("model.dtype", FLAGS.dtype),
                                             ("model.kv_cache_dtype", FLAGS.kv_cache_dtype)) if value}
  overrides.update(cli.mesh_overrides())
  loaded = load_checkpoint(FLAGS.checkpoint_dir, FLAGS.step, overrides=overrides)
  texts, extra = prompts, {}
  if FLAGS.chat:
    chat = chat_format(loaded.cfg.data.tokenizer, loaded.cfg.data.tokenizer_path, loaded.tokenizer)
    system = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
    texts = [chat.render(system + [{"role": "user", "content": p}]) for p in prompts]
    extra = dict(stop_ids=chat.stop_ids, echo=False)
  plan, tokenizer, stacked = loaded.plan, loaded.tokenizer, loaded.params
  del loaded  # the serving copy below replaces the stacked parameters
  params = programs.serving_params(plan, stacked)
  del stacked
  print(serving_line(plan), file=sys.stderr, flush=True)  # stdout holds only the texts
  generator = programs.text_generator(plan, params, max_new_tokens=FLAGS.max_new_tokens,
                                      temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p)
  results = stream_text(generator, tokenizer, texts, max_seq_len=plan.cfg.model.max_seq_len,
                        max_new_tokens=FLAGS.max_new_tokens, seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                        **extra)
  for index, text in results:
    if FLAGS.prompts_file:
      print(json.dumps({"index": index, "text": text}), flush=True)
    else:
      print(f"> {prompts[index]}\n{text}" if FLAGS.chat else text)
      print("-" * 60, flush=True)


if __name__ == "__main__":
  cli.run(main)
