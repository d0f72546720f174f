"""A structured pruning run end to end: a trained checkpoint in, a smaller ordinary checkpoint out
(`python -m launch.prune --config.prune.method=structured ...`; docs/compression.md).

The model config must match prune.init_checkpoint's; prune.{num_layers, d_model, num_heads,
num_kv_heads, mlp_dim} give the new shape. The saved config says the new shape, so launch.eval,
generate, quantize, export, convert --to-hf and distill read the result like any run. Recovery is a
distillation from the unpruned model: `launch.distill` with train.init_checkpoint = this output.
"""

import dataclasses

import jax
import numpy as np

from compress import structured
from launch.run import checkpoint as ckpt_lib
from launch.run import inputs
from launch.run import state as ts
from launch.run.config import Config
from launch.run.plan import make_plan
from launch.run.restore import check_compatible, read_saved_config, restore_params
from launch.storage import paths
from lm.data import loader


def calibration_batches(cfg: Config, num_batches: int) -> list[dict[str, np.ndarray]]:
  """The first `num_batches` training batches ({"inputs", "targets"}: int [B, L]) of cfg's corpus and seed."""
  tokenizer = inputs.prepare(cfg.data, cfg.model.vocab_size)
  it = loader.train_iterator_for(inputs.local_data(cfg.data), tokenizer, global_batch_size=cfg.train.global_batch_size,
                                 seed=cfg.seed)
  return [{k: np.asarray(v) for k, v in next(it).items() if k in ("inputs", "targets")}
          for _ in range(num_batches)]


def pruned_config(cfg: Config) -> Config:
  """`cfg` with the model replaced by prune.*'s target shape; ValueError naming the key if impossible."""
  return dataclasses.replace(cfg, model=structured.target_config(cfg.model, cfg.prune))


def prune_structured(cfg: Config, workdir: str) -> dict:
  """Prunes prune.init_checkpoint to the target shape and saves it to <workdir>/checkpoints.

  Every input is checked (target shape, mesh fit, an empty output directory) before any array is
  read. Returns {"checkpoint_dir", "step", "params_before", "params_after", "model": {new shape},
  "layers_kept", "layer_importance", "importance"}; the kept indices go to the checkpoint's meta.
  """
  source = cfg.prune.init_checkpoint
  if not source:
    raise ValueError("prune.method='structured' prunes a trained model: set --config.prune.init_checkpoint.")
  saved, step = read_saved_config(source)
  check_compatible(cfg, saved, "init", f"prune.init_checkpoint={source}")
  small_cfg = pruned_config(cfg)
  small_plan = make_plan(small_cfg)  # raises if the new shapes do not divide over the mesh
  plan = make_plan(cfg, list(small_plan.mesh.devices.flat))  # the source model's, on the same devices
  out_dir = paths.join(workdir, "checkpoints")
  checkpointer = ckpt_lib.Checkpointer(out_dir, async_save=False)
  try:
    if checkpointer.steps():
      raise ValueError(f"{checkpointer.directory} already holds checkpoints {checkpointer.steps()}; "
                       "choose a new --workdir (nothing was overwritten).")
    mdef = plan.mdef
    params, _ = restore_params(source, mdef, ts.param_shardings(mdef, small_plan.mesh, small_plan.rules), step)
    batches = calibration_batches(cfg, cfg.prune.calibration_batches)
    small, report = structured.prune_params(plan, params, batches, small_plan.cfg.model)
    placed = jax.device_put(small, small_plan.shardings.params)
    state = ts.train_state_from_params(placed, small_plan.tx, small_plan.shardings)
    checkpointer.save(step, state, {"config": small_plan.cfg.to_dict(), "pruned_from": source,
                                    "structured": report})
  finally:
    checkpointer.close()
  shape = {k: getattr(small_cfg.model, k) for k in structured.TARGET_KEYS}
  return {"checkpoint_dir": out_dir, "step": step, "params_before": cfg.model.num_params(),
          "params_after": small_cfg.model.num_params(), "model": shape,
          **{k: v for k, v in report.items() if k != "kept"}}  # the kept indices are in the meta
