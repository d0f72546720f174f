"""Held-out evaluation: mean next-token cross-entropy over the validation split."""

import math

import jax

from launch.run import inputs
from launch.run.restore import load_checkpoint
from launch.run import programs
from launch.run.step import batch_sharding, global_batch
from lm.data import baseline, loader


def evaluate(eval_fn, params, cfg, tokenizer, data_sharding) -> float:
  """Returns the validation loss (nats/token) over cfg.train.eval_batches batches (0: the whole split).

  `eval_fn(params, batch)` returns {"loss_sum", "tokens"}; sums are combined exactly across batches.
  """
  loss_sum, tokens = 0.0, 0.0
  batches = loader.eval_batches(
      inputs.local_data(cfg.data).data_dir, tokenizer, seq_len=cfg.data.seq_len, global_batch_size=cfg.train.global_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      max_batches=cfg.train.eval_batches)
  for local in batches:
    out = jax.device_get(eval_fn(params, global_batch(local, data_sharding)))
    loss_sum += float(out["loss_sum"])
    tokens += float(out["tokens"])
  if tokens == 0:
    raise ValueError("The validation split produced no full batch; lower train.global_batch_size or "
                     "data.seq_len.")
  return loss_sum / tokens


def eval_checkpoint(checkpoint_dir: str, step: int | None = None, eval_batches: int = 0,
                    overrides: dict | None = None) -> dict:
  """Returns {"step", "val_loss", "val_perplexity", "unigram_perplexity"} for a checkpoint, under its
  own mesh and rules or those `overrides` name (e.g. {"mesh.fsdp": 8, "mesh.rules": "fsdp"})."""
  loaded = load_checkpoint(checkpoint_dir, step, overrides={"train.eval_batches": eval_batches,
                                                           **(overrides or {})})
  plan = loaded.plan
  eval_fn = programs.eval_step(plan)
  loss = evaluate(eval_fn, loaded.params, loaded.cfg, loaded.tokenizer, batch_sharding(plan.mesh, plan.rules))
  unigram = baseline.unigram_perplexity(inputs.local_data(loaded.cfg.data).data_dir, loaded.tokenizer,
                                        loaded.cfg.data.seq_len)
  return {"step": loaded.step, "val_loss": loss, "val_perplexity": math.exp(loss),
          "unigram_perplexity": unigram}
