"""The int8 table the papers print: float vs W8A16 vs W8A8 vs W8A8 + SmoothQuant, on a trained model.

  python -m launch.reproduce.quantization --checkpoint_dir runs/demo/checkpoints \
      --out docs/results/quantization

For each variant: validation perplexity (the whole split) and its relative change, parameter bytes
on disk, the forward latency of one batch, and greedy generation tokens/s with the KV cache (one
device, batch 1 and batch 8). A second table gives each variant's perplexity read through the KV
cache, in the compute dtype and in int8 (model.kv_cache_dtype): the first --kv_batches validation
batches, each sequence prefilled with --kv_prefix tokens and then fed its true tokens one cached
decode step at a time (`lm.decoding.cached_log_probs`). Writes <out>.md and <out>.csv (and
<out>_kv_cache.csv) and prints the tables. The quantized checkpoints go to --work_dir (default:
beside the float checkpoints, in quantized/).
"""

import dataclasses
import math
import statistics

import jax
import numpy as np
from absl import app, flags

from compress.quantize_run import checkpoint_bytes, quantize_checkpoint
from launch.measure.tables import write_csv
from launch.measure.timing import time_calls
from launch.run import cli, inputs
from launch.run.evaluation import eval_checkpoint
from launch.run.restore import load_checkpoint
from launch.storage import paths
from lm import kv_cache
from lm.data import loader
from launch.run import programs
from launch.run.plan import make_plan
from lm.decoding import cached_log_probs

flags.DEFINE_string("checkpoint_dir", None, "The trained float run's checkpoint directory.")
flags.DEFINE_string("out", "docs/results/quantization", "Output path prefix for .md and .csv.")
flags.DEFINE_string("work_dir", None, "Where the quantized checkpoints go (default: <run>/quantized).")
flags.DEFINE_bool("quantize_embedding", True, "Quantize the embedding (the tied output projection) too.")
flags.DEFINE_float("alpha", 0.5, "SmoothQuant migration strength.")
flags.DEFINE_integer("calibration_batches", 8, "Training batches for SmoothQuant calibration.")
flags.DEFINE_integer("eval_batches", 0, "Validation batches (0: the whole split).")
flags.DEFINE_integer("repeats", 10, "Timed repetitions (the median is reported).")
flags.DEFINE_integer("new_tokens", 64, "Generated tokens per timed generation.")
flags.DEFINE_integer("kv_batches", 4, "Validation batches scored through the KV cache (float vs int8).")
flags.DEFINE_integer("kv_prefix", 16, "Tokens prefilled before scoring through the KV cache.")
FLAGS = flags.FLAGS

VARIANTS = (  # name, mode, smooth
    ("float32", None, False),
    ("W8A16", "w8a16", False),
    ("W8A8", "w8a8", False),
    ("W8A8 + SmoothQuant", "w8a8", True),
)


def _median_seconds(fn, repeats: int) -> float:
  return statistics.median(time_calls(fn, repeats))  # the first call compiles and warms up


def _speed(checkpoint_dir: str, repeats: int, new_tokens: int) -> dict:
  """Forward latency of one [global_batch, seq_len] batch and generation tokens/s, on one device."""
  loaded = load_checkpoint(checkpoint_dir, devices=jax.devices()[:1])
  cfg, params = loaded.cfg, loaded.params
  rng = np.random.RandomState(0)
  batch, seq_len = cfg.train.global_batch_size, cfg.data.seq_len
  tokens = rng.randint(0, cfg.model.vocab_size, (batch, seq_len)).astype(np.int32)
  forward = programs.logits(loaded.plan)
  result = {"forward_ms": 1e3 * _median_seconds(lambda: forward(params, tokens), repeats),
            "forward_shape": f"{batch}x{seq_len}"}
  prompt_len = min(16, cfg.model.max_seq_len - new_tokens)
  # The training layout (stacked weights in the stored dtype), as these rows have always timed.
  generate = programs.Generation(loaded.plan, max_new_tokens=new_tokens, layout="stacked")
  for rows in (1, 8):
    prompt = rng.randint(0, cfg.model.vocab_size, (rows, prompt_len)).astype(np.int32)
    lengths = np.full((rows,), prompt_len, np.int32)
    seconds = _median_seconds(lambda: generate(params, prompt, jax.random.key(0), lengths),
                              max(repeats // 2, 3))
    result[f"gen_tok_s_b{rows}"] = rows * new_tokens / seconds
  return result


def _kv_cache_rows(checkpoint_dir: str, name: str, batches: int, prefix_len: int) -> list[dict]:
  """Perplexity of the first `batches` validation batches read through a compute-dtype and an int8
  KV cache (served as launch.generate serves: lm/serving.py), one row per cache."""
  loaded = load_checkpoint(checkpoint_dir, devices=jax.devices()[:1])
  cfg = loaded.cfg
  tokens = [b["inputs"] for b in loader.eval_batches(
      inputs.local_data(cfg.data).data_dir, loaded.tokenizer, seq_len=cfg.data.seq_len,
      global_batch_size=cfg.train.global_batch_size, max_batches=batches)]
  rows = []
  for cache_dtype in ("compute", "int8"):
    model_cfg = dataclasses.replace(cfg.model, kv_cache_dtype=cache_dtype)
    plan = make_plan(dataclasses.replace(cfg, model=model_cfg), jax.devices()[:1])
    params = programs.serving_params(plan, loaded.params)
    score = programs.forward(plan, lambda mdef, p, t: cached_log_probs(mdef.bind(p), t, prefix_len),
                             programs.serving_mdef(plan))
    log_probs = np.concatenate([np.asarray(score(params, t)).ravel() for t in tokens])
    rows.append({"variant": name, "kv_cache": cache_dtype if cache_dtype == "int8" else model_cfg.dtype,
                 "cached_perplexity": math.exp(-log_probs.mean()), "scored_tokens": log_probs.size,
                 "kv_bytes_per_token": kv_cache.bytes_per_column(model_cfg) * model_cfg.num_layers})
  rows[1]["ppl_change_pct"] = 100 * (rows[1]["cached_perplexity"] / rows[0]["cached_perplexity"] - 1)
  rows[0]["ppl_change_pct"] = 0.0
  print(f"{name}: through the KV cache, perplexity {rows[0]['cached_perplexity']:.3f} "
        f"({rows[0]['kv_cache']}) vs {rows[1]['cached_perplexity']:.3f} (int8)", flush=True)
  return rows


def run(checkpoint_dir: str, work_dir: str, *, quantize_embedding: bool, alpha: float,
        calibration_batches: int, eval_batches: int, repeats: int, new_tokens: int,
        kv_batches: int = 4, kv_prefix: int = 16) -> tuple[list[dict], list[dict]]:
  """Quantizes, evaluates and times every variant; returns (one row dict per variant, the KV-cache
  rows: two per variant)."""
  rows, kv_rows = [], []
  for name, mode, smooth in VARIANTS:
    directory, report = checkpoint_dir, None
    if mode is not None:
      directory = paths.join(work_dir, name.lower().replace(" + ", "_").replace(" ", "_"))
      paths.rmtree(directory)  # this benchmark owns work_dir
      report = quantize_checkpoint(checkpoint_dir, directory, mode=mode,
                                   quantize_embedding=quantize_embedding, smooth=smooth, alpha=alpha,
                                   calibration_batches=calibration_batches)
    metrics = eval_checkpoint(directory, eval_batches=eval_batches)
    row = {"variant": name, "val_perplexity": metrics["val_perplexity"],
           "param_bytes": checkpoint_bytes(directory, metrics["step"]), **_speed(directory, repeats, new_tokens)}
    rows.append(row)
    print(f"{name}: perplexity {row['val_perplexity']:.3f}, {row['param_bytes']} bytes", flush=True)
    kv_rows += _kv_cache_rows(directory, name, kv_batches, kv_prefix)
  base = rows[0]
  for row in rows:
    row["ppl_change_pct"] = 100 * (row["val_perplexity"] / base["val_perplexity"] - 1)
    row["size_ratio"] = base["param_bytes"] / row["param_bytes"]
  return rows, kv_rows


def markdown(rows: list[dict]) -> str:
  """The table as GitHub markdown."""
  shape = rows[0]["forward_shape"]
  lines = [f"| variant | val perplexity | change | param bytes | smaller | forward {shape} (ms) | "
           "generate tok/s, B=1 | generate tok/s, B=8 |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['variant']} | {r['val_perplexity']:.3f} | {r['ppl_change_pct']:+.2f}% | "
                 f"{r['param_bytes']:,} | {r['size_ratio']:.2f}x | {r['forward_ms']:.1f} | "
                 f"{r['gen_tok_s_b1']:.0f} | {r['gen_tok_s_b8']:.0f} |")
  return "\n".join(lines) + "\n"


def kv_markdown(kv_rows: list[dict], prefix_len: int) -> str:
  """The KV-cache table as GitHub markdown, with a line saying what was scored."""
  lines = [f"Perplexity read through the KV cache: {kv_rows[0]['scored_tokens']:,} validation tokens, each "
           f"sequence prefilled with {prefix_len} tokens and then decoded token by token on its true tokens "
           "(`lm.decoding.cached_log_probs`); change: against the same weights with the compute-dtype cache.",
           "",
           "| variant | KV cache | perplexity through the cache | change | KV bytes per token |",
           "|---|---|---:|---:|---:|"]
  for r in kv_rows:
    lines.append(f"| {r['variant']} | {r['kv_cache']} | {r['cached_perplexity']:.3f} | "
                 f"{r['ppl_change_pct']:+.3f}% | {r['kv_bytes_per_token']:,} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  cli.quiet_logs()
  if not FLAGS.checkpoint_dir:
    raise app.UsageError("--checkpoint_dir is required.")
  work_dir = FLAGS.work_dir or paths.join(paths.dirname(paths.normalize(FLAGS.checkpoint_dir)), "quantized")
  rows, kv_rows = run(FLAGS.checkpoint_dir, work_dir, quantize_embedding=FLAGS.quantize_embedding,
                      alpha=FLAGS.alpha, calibration_batches=FLAGS.calibration_batches,
                      eval_batches=FLAGS.eval_batches, repeats=FLAGS.repeats, new_tokens=FLAGS.new_tokens,
                      kv_batches=FLAGS.kv_batches, kv_prefix=FLAGS.kv_prefix)
  table = markdown(rows) + "\n" + kv_markdown(kv_rows, FLAGS.kv_prefix)
  paths.write_text(FLAGS.out + ".md", table)
  write_csv(FLAGS.out + ".csv", rows)
  write_csv(FLAGS.out + "_kv_cache.csv", kv_rows)
  print(table)


if __name__ == "__main__":
  cli.run(main)
