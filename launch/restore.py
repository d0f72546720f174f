"""Loading a trained model for inference: config from the checkpoint, parameters onto a mesh."""

import dataclasses

import jax

from launch import checkpoint as ckpt_lib
from launch import train_state as ts
from launch.config import Config, validate
from launch.context import RunContext, build_context
from lm.data import loader


@dataclasses.dataclass
class LoadedModel:
  cfg: Config
  ctx: RunContext
  params: dict
  tokenizer: object
  step: int


def load_checkpoint(checkpoint_dir: str, step: int | None = None, devices: list | None = None,
                    overrides: dict | None = None) -> LoadedModel:
  """Restores parameters (not optimizer state) and the run's config from `checkpoint_dir`.

  `overrides` maps dotted keys ("mesh.rules", "train.global_batch_size", ...) to new values, e.g. to
  evaluate on another mesh; model shapes come from the checkpoint. Raises CheckpointError for a
  missing or unreadable checkpoint before anything compiles.
  """
  checkpointer = ckpt_lib.Checkpointer(checkpoint_dir, read_only=True)
  meta = checkpointer.read_meta(step)
  if "config" not in meta:
    raise ckpt_lib.CheckpointError(f"{checkpoint_dir} step {meta.get('step')} has no saved config.")
  raw = meta["config"]
  for key, value in (overrides or {}).items():
    section, name = key.split(".", 1)
    if section == "model":
      raise ValueError(f"{key}: model shapes come from the checkpoint and cannot be overridden.")
    raw[section][name] = value
  cfg = validate(raw)
  tokenizer = loader.prepare(cfg.data.data_dir, cfg.data.tokenizer, cfg.model.vocab_size)
  ctx = build_context(cfg, devices)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          ctx.mdef.abstract_params, ctx.shardings.params)
  params, meta = checkpointer.restore_params(abstract, meta["step"])
  checkpointer.close()
  return LoadedModel(cfg, ctx, params, tokenizer, int(meta["step"]))
