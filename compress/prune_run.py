"""A pruning run end to end: magnitude (unstructured) or N:M pruning while fine-tuning through the ordinary
training loop, or in one shot (the command is `python -m launch.prune`; docs/compression.md).

The model config must match the init checkpoint's. The sparsity reported is measured from the saved
checkpoint (and, for n_m, the number of groups that break the N:M pattern: 0). The output is an
ordinary checkpoint that launch.eval and launch.generate read.
"""

import dataclasses

import jax
import optax

from compress import prune as pruning
from launch.run import checkpoint as ckpt_lib
from launch.run import state as ts
from launch.run.config import Config
from launch.run.plan import RunPlan, make_plan
from launch.run.loop import train
from launch.run.preemption import StopRequest
from launch.run.restore import check_compatible, load_checkpoint, read_saved_config, restore_params


def prune_context(cfg: Config, plan: RunPlan | None = None) -> tuple[RunPlan, dict]:
  """Returns (the run context with the pruning transformation chained after the optimizer, layouts)."""
  if cfg.prune.method == "none":
    raise ValueError("prune.method='none'; choose 'magnitude' (with prune.sparsity) or 'n_m' "
                     "(with prune.n and prune.m), e.g. --config.prune.method=magnitude.")
  plan = plan or make_plan(cfg)
  layouts = pruning.kernel_layouts(plan.cfg.model, cfg.prune.m if cfg.prune.method == "n_m" else None)
  tx = optax.chain(plan.tx, pruning.pruning(cfg.prune, layouts))
  shardings = ts.state_shardings(plan.mdef, tx, plan.mesh, plan.rules)
  return dataclasses.replace(plan, tx=tx, shardings=shardings), layouts


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


def _pruning_start(plan: RunPlan, checkpoint_dir: str) -> tuple[ts.TrainState, int]:
  """(A step-0 state around `checkpoint_dir`'s parameters, with fresh masks (all True), its step)."""
  saved, step = read_saved_config(checkpoint_dir)
  check_compatible(plan.cfg, saved, "init", f"prune.init_checkpoint={checkpoint_dir}")
  params, _ = restore_params(checkpoint_dir, plan.mdef, plan.shardings.params, step)
  return ts.train_state_from_params(params, plan.tx, plan.shardings), step


def prune(cfg: Config, workdir: str, *, resume: bool = False, stop: StopRequest | None = None) -> dict:
  """Fine-tunes with gradual pruning through the ordinary loop; returns the TrainResult and sparsity."""
  plan, layouts = prune_context(cfg)
  source = cfg.prune.init_checkpoint
  init_state = None if not source else (lambda c: _pruning_start(c, source)[0])
  result = train(cfg, workdir, resume=resume, stop=stop, plan=plan, init_state=init_state)
  return {**dataclasses.asdict(result), **measure(result.checkpoint_dir, layouts, cfg)}


def prune_one_shot(cfg: Config, workdir: str) -> dict:
  """Prunes prune.init_checkpoint to the final sparsity without training; saves an ordinary checkpoint."""
  if not cfg.prune.init_checkpoint:
    raise ValueError("--one_shot prunes a trained model: set --config.prune.init_checkpoint.")
  plan, layouts = prune_context(cfg)
  saved, step = read_saved_config(cfg.prune.init_checkpoint)
  check_compatible(cfg, saved, "init", f"prune.init_checkpoint={cfg.prune.init_checkpoint}")
  params, _ = restore_params(cfg.prune.init_checkpoint, plan.mdef, plan.shardings.params, step)
  pruned, masks = jax.jit(lambda p: pruning.one_shot(p, layouts, cfg.prune),
                          out_shardings=(plan.shardings.params, plan.shardings.params))(params)
  state = ts.train_state_from_params(pruned, plan.tx, plan.shardings)
  *head, prune_state = state.opt_state
  state = state.replace(opt_state=(*head, prune_state._replace(masks=masks)))
  checkpointer = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", keep=cfg.checkpoint.keep)
  if checkpointer.steps():
    raise ValueError(f"{checkpointer.directory} already holds checkpoints {checkpointer.steps()}; "
                     "choose a new --workdir (nothing was overwritten).")
  checkpointer.save(step, state, {"config": cfg.to_dict(), "pruned_from": cfg.prune.init_checkpoint})
  checkpointer.close()
  return measure(checkpointer.directory, layouts, cfg)
