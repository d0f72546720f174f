"""Prune a trained model by magnitude (unstructured or N:M) while fine-tuning it, or in one shot; or
structurally, to a genuinely smaller model.

  # 50% unstructured, ramped up over 100 updates (cubic schedule), then 50 more with the mask fixed:
  python -m launch.prune --config configs/demo.py --workdir runs/pruned \
      --config.prune.init_checkpoint=runs/demo/checkpoints --config.prune.method=magnitude \
      --config.prune.sparsity=0.5 --config.prune.end_step=100 --config.train.steps=150 \
      --config.train.learning_rate=1e-3 --config.train.warmup_steps=10
  # 2:4, no training: --config.prune.method=n_m --one_shot
  # A smaller model (whole layers, KV groups, MLP neurons, embedding channels removed; no training):
  python -m launch.prune --config configs/demo.py --workdir runs/small \
      --config.prune.init_checkpoint=runs/demo/checkpoints --config.prune.method=structured \
      --config.prune.num_layers=3 --config.prune.d_model=128 --config.prune.num_kv_heads=2 \
      --config.prune.mlp_dim=320

The model config must match the init checkpoint's. Prints the sparsity measured from the saved
checkpoint (and, for n_m, the number of groups that break the N:M pattern: 0). The output is an
ordinary checkpoint that launch.eval and launch.generate read.
"""

import json

import jax
from absl import flags

from compress.prune_run import prune, prune_one_shot
from compress.structured_run import prune_structured
from launch.run import cli
from launch.run.preemption import StopRequest

flags.DEFINE_string("workdir", None, "Directory for the pruned model's checkpoints and metrics.")
flags.DEFINE_bool("resume", False, "Continue the pruning run whose checkpoints are in --workdir.")
flags.DEFINE_bool("one_shot", False, "Prune prune.init_checkpoint at once, without fine-tuning.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_logs()
  cli.require("workdir")
  cfg = cli.load_config()
  if cfg.prune.method == "structured":  # always one shot; recover with launch.distill
    out = prune_structured(cfg, FLAGS.workdir)
  elif FLAGS.one_shot:
    out = prune_one_shot(cfg, FLAGS.workdir)
  else:
    out = prune(cfg, FLAGS.workdir, resume=FLAGS.resume, stop=StopRequest().install())
  if jax.process_index() == 0:
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
  cli.run(main)
