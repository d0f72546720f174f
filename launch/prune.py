"""Prune a trained model by magnitude (unstructured or N:M) while fine-tuning it, or in one shot.

  # 50% unstructured, ramped up over 100 updates (cubic schedule), then 50 more with the mask fixed:
  python -m launch.prune --config configs/demo.py --workdir runs/pruned \
      --config.prune.init_checkpoint=runs/demo/checkpoints --config.prune.method=magnitude \
      --config.prune.sparsity=0.5 --config.prune.end_step=100 --config.train.steps=150 \
      --config.train.learning_rate=1e-3 --config.train.warmup_steps=10
  # 2:4, no training: --config.prune.method=n_m --one_shot

The model config must match the init checkpoint's. Prints the sparsity measured from the saved
checkpoint (and, for n_m, the number of groups that break the N:M pattern: 0). The output is an
ordinary checkpoint that launch.eval and launch.generate read.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from compress import prune as pruning
from launch import checkpoint as ckpt_lib
from launch import train_state as ts
from launch.cli import FLAGS, load_config, quiet_logs
from launch.config import Config
from launch.context import RunContext, build_context
from launch.inference import load_checkpoint
from launch.preemption import StopRequest
from launch.trainer import train


def prune_context(cfg: Config, ctx: RunContext | None = None) -> tuple[RunContext, dict]:
  """Returns (the run context with the pruning transformation chained after the optimizer, layouts)."""
  if cfg.prune.method == "none":
    raise ValueError("prune.method='none'; choose 'magnitude' (with prune.sparsity) or 'n_m' "
                     "(with prune.n and prune.m), e.g. --config.prune.method=magnitude.")
  ctx = ctx or build_context(cfg)
  layouts = pruning.kernel_layouts(cfg.model, cfg.prune.m if cfg.prune.method == "n_m" else None)
  tx = optax.chain(ctx.tx, pruning.pruning(cfg.prune, layouts))
  shardings = ts.state_shardings(ctx.mdef, tx, ctx.mesh, ctx.rules)
  return dataclasses.replace(ctx, tx=tx, shardings=shardings), layouts


def restore_params(checkpoint_dir: str, ctx: RunContext):
  """Restores a checkpoint's parameters onto ctx's shardings; returns (params, step)."""
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          ctx.mdef.abstract_params, ctx.shardings.params)
  checkpointer = ckpt_lib.Checkpointer(checkpoint_dir, read_only=True)
  params, meta = checkpointer.restore_params(abstract)
  checkpointer.close()
  return params, int(meta["step"])


def fresh_state(ctx: RunContext, params) -> ts.TrainState:
  """A step-0 TrainState around `params` with a new optimizer state (masks all True), placed sharded."""
  def make(p):
    return ts.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=ctx.tx.init(p))
  return jax.jit(make, out_shardings=ctx.shardings)(params)


def measure(checkpoint_dir: str, layouts: dict, cfg: Config) -> dict:
  """Sparsity measured from the saved weights, read back the way launch.eval reads them."""
  loaded = load_checkpoint(checkpoint_dir)
  report = pruning.sparsity_report(loaded.params, layouts)
  out = {"sparsity_pruned_kernels": report["pruned_kernels"], "sparsity_all_params": report["all_params"],
         "pruned_kernel_params": int(report["pruned_kernel_params"]), "checkpoint_dir": checkpoint_dir,
         "step": loaded.step}
  if cfg.prune.method == "n_m":
    out["n_m_violations"] = pruning.n_m_violations(loaded.params, layouts, cfg.prune.n, cfg.prune.m)
  return out


def prune(cfg: Config, workdir: str, *, resume: bool = False, stop: StopRequest | None = None) -> dict:
  """Fine-tunes with gradual pruning through the ordinary loop; returns the TrainResult and sparsity."""
  ctx, layouts = prune_context(cfg)
  source = cfg.prune.init_checkpoint
  init_state = None if not source else (lambda c: fresh_state(c, restore_params(source, c)[0]))
  result = train(cfg, workdir, resume=resume, stop=stop, ctx=ctx, init_state=init_state)
  return {**dataclasses.asdict(result), **measure(result.checkpoint_dir, layouts, cfg)}


def prune_one_shot(cfg: Config, workdir: str) -> dict:
  """Prunes prune.init_checkpoint to the final sparsity without training; saves an ordinary checkpoint."""
  if not cfg.prune.init_checkpoint:
    raise ValueError("--one_shot prunes a trained model: set --config.prune.init_checkpoint.")
  ctx, layouts = prune_context(cfg)
  params, step = restore_params(cfg.prune.init_checkpoint, ctx)
  pruned, masks = jax.jit(lambda p: pruning.one_shot(p, layouts, cfg.prune),
                          out_shardings=(ctx.shardings.params, ctx.shardings.params))(params)
  state = fresh_state(ctx, pruned)
  *head, prune_state = state.opt_state
  state = state.replace(opt_state=(*head, prune_state._replace(masks=masks)))
  checkpointer = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", async_save=False)
  if checkpointer.steps():
    raise ValueError(f"{checkpointer.directory} already holds checkpoints {checkpointer.steps()}; "
                     "choose a new --workdir (nothing was overwritten).")
  checkpointer.save(step, state, {"config": cfg.to_dict(), "pruned_from": cfg.prune.init_checkpoint})
  checkpointer.close()
  return measure(checkpointer.directory, layouts, cfg)


def main(argv):
  del argv
  quiet_logs()
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required.")
  cfg = load_config()
  if FLAGS.one_shot:
    out = prune_one_shot(cfg, FLAGS.workdir)
  else:
    out = prune(cfg, FLAGS.workdir, resume=FLAGS.resume, stop=StopRequest().install())
  if jax.process_index() == 0:
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
  # Flags are defined only when run as a program, so the benchmark can import this module beside others.
  flags.DEFINE_string("workdir", None, "Directory for the pruned model's checkpoints and metrics.")
  flags.DEFINE_bool("resume", False, "Continue the pruning run whose checkpoints are in --workdir.")
  flags.DEFINE_bool("one_shot", False, "Prune prune.init_checkpoint at once, without fine-tuning.")
  app.run(main)
