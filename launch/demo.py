"""The main job: train the demo LM on 8 simulated CPU devices, evaluate, generate, summarize.

  make demo
  # = python -m launch.demo --config configs/demo.py --workdir runs/demo

Prints a few generated lines and a summary table (validation perplexity beside the unigram
baseline's, tokens/s, steps, checkpoint path); writes <workdir>/summary.md and loss_curve.png.
Running it again on a finished workdir skips training and reports from the saved checkpoint.
"""

import math

import jax
from absl import flags

from launch.run import cli, inputs
from launch.run.devices import simulate_cpu_devices
from launch.run.loop import train
from launch.run.preemption import StopRequest
from launch.run.restore import load_checkpoint
from launch.storage import paths
from lm.data import baseline

flags.DEFINE_string("workdir", "runs/demo", "Directory for checkpoints, metrics and plots.")
flags.DEFINE_integer("cpu_devices", 8, "Simulated CPU devices when running on CPU.")
FLAGS = flags.FLAGS

PROMPTS = ["ROMEO.\n", "To be, or not to be", "KING.\nWhat news"]


def summary_table(rows: list[tuple[str, str]]) -> str:
  """Formats (name, value) rows as a two-column Markdown table."""
  width = max(len(name) for name, _ in rows)
  lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
  lines += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
  return "\n".join(lines)


def main(argv):
  del argv
  cli.quiet_logs()
  simulate_cpu_devices(FLAGS.cpu_devices)  # no-op on GPU/TPU
  cfg = cli.load_config()
  workdir = FLAGS.workdir
  print(f"Demo: {cfg.model.num_params() / 1e6:.1f}M-parameter model, {cfg.train.steps} steps, "
        f"{len(jax.devices())} {jax.devices()[0].platform} devices, workdir {workdir}")
  result = train(cfg, workdir, resume=True, stop=StopRequest().install())
  if result.stopped_early:
    print(f"Stopped at step {result.final_step}; run `make demo` again to continue.")
    return

  loaded = load_checkpoint(result.checkpoint_dir)
  unigram = baseline.unigram_perplexity(inputs.local_data(cfg.data).data_dir, loaded.tokenizer, cfg.data.seq_len)
  samples = loaded.generate(PROMPTS, max_new_tokens=60, temperature=0.8, top_k=50, seed=cfg.seed)
  print("\nSamples (temperature 0.8, top-k 50):")
  for text in samples:
    print("-" * 60)
    print(text)
  print("-" * 60)

  rows = [
      ("validation perplexity", f"{result.val_perplexity:.1f}"),
      ("unigram baseline perplexity", f"{unigram:.1f}"),
      ("validation loss (nats/token)", f"{result.val_loss:.3f}"),
      ("final train loss", f"{result.train_loss:.3f}"),
      ("steps", f"{result.final_step}"),
      ("tokens/s (median of logged windows)", "n/a (no steps run)" if math.isnan(result.tokens_per_s)
       else f"{result.tokens_per_s:,.0f}"),
      ("MFU", "n/a" if math.isnan(result.mfu) else f"{100 * result.mfu:.1f}% of {result.peak_source}"),
      ("devices", f"{len(jax.devices())} x {jax.devices()[0].platform} (mesh {cfg.mesh.rules})"),
      ("checkpoint", result.checkpoint_dir),
      ("loss curve", paths.join(paths.normalize(workdir), "loss_curve.png")),
  ]
  table = summary_table(rows)
  print("\n" + table)
  paths.write_text(paths.join(workdir, "summary.md"), "# Demo summary\n\n" + table + "\n\n## Samples\n\n"
                   + "".join("```\n" + text + "\n```\n\n" for text in samples))


if __name__ == "__main__":
  cli.run(main)
