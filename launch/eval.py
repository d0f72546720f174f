"""Validation perplexity of any checkpoint, beside the unigram baseline of the same tokenization.

  python -m launch.eval --checkpoint_dir runs/demo/checkpoints [--step N] [--eval_batches 0]
"""

import json
import math

from absl import app, flags

from launch.cli import quiet_logs
from launch.evaluate import evaluate
from launch.restore import load_checkpoint
from launch.step import batch_sharding, jit_eval_step
from lm.data import baseline

flags.DEFINE_string("checkpoint_dir", None, "A run's checkpoint directory (<workdir>/checkpoints).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_integer("eval_batches", 0, "Validation batches (0: the whole split).")
FLAGS = flags.FLAGS


def eval_checkpoint(checkpoint_dir: str, step: int | None = None, eval_batches: int = 0) -> dict:
  """Returns {"step", "val_loss", "val_perplexity", "unigram_perplexity"} for a checkpoint."""
  loaded = load_checkpoint(checkpoint_dir, step, overrides={"train.eval_batches": eval_batches})
  ctx = loaded.ctx
  eval_fn = jit_eval_step(ctx.mdef, ctx.mesh, ctx.rules, ctx.shardings.params)
  loss = evaluate(eval_fn, loaded.params, loaded.cfg, loaded.tokenizer, batch_sharding(ctx.mesh, ctx.rules))
  unigram = baseline.unigram_perplexity(loaded.cfg.data.data_dir, loaded.tokenizer, loaded.cfg.data.seq_len)
  return {"step": loaded.step, "val_loss": loss, "val_perplexity": math.exp(loss),
          "unigram_perplexity": unigram}


def main(argv):
  del argv
  quiet_logs()
  if not FLAGS.checkpoint_dir:
    raise app.UsageError("--checkpoint_dir is required.")
  print(json.dumps(eval_checkpoint(FLAGS.checkpoint_dir, FLAGS.step, FLAGS.eval_batches), indent=2))


if __name__ == "__main__":
  app.run(main)
