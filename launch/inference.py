"""Inference from a checkpoint: load config and parameters onto a mesh, then generate text."""

import dataclasses

import jax
import numpy as np

from configs.base import base_config
from launch import checkpoint as ckpt_lib
from launch import train_state as ts
from launch.config import Config, validate
from launch.context import RunContext, build_context
from lm.data import loader
from lm.generate import check_sampling_args, make_generate_fn


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
  for section, defaults in base_config().to_dict().items():
    raw.setdefault(section, defaults)  # a checkpoint older than a config section gets its defaults
    if isinstance(defaults, dict):
      raw[section] = {**defaults, **raw[section]}  # ... and so does one older than a key
  for key, value in (overrides or {}).items():
    section, name = key.split(".", 1)
    if section == "model":
      raise ValueError(f"{key}: model shapes come from the checkpoint and cannot be overridden.")
    raw[section][name] = value
  cfg = validate(raw)
  tokenizer = loader.prepare_from_config(cfg.data, cfg.model.vocab_size)
  ctx = build_context(cfg, devices)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          ctx.mdef.abstract_params, ctx.shardings.params)
  params, meta = checkpointer.restore_params(abstract, meta["step"])
  checkpointer.close()
  return LoadedModel(cfg, ctx, params, tokenizer, int(meta["step"]))


def generate_text(loaded: LoadedModel, prompts: list[str], *, max_new_tokens: int, temperature: float,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[str]:
  """Returns one continuation per prompt (prompt text included), sampled with the KV cache.

  Prompts run one at a time so that each keeps its own length (batched rows share a length).
  """
  check_sampling_args(temperature, top_k, top_p)
  tokenizer = loaded.tokenizer
  fn = make_generate_fn(loaded.ctx.mdef.graphdef, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, eos_id=tokenizer.eos_id)
  outputs = []
  for i, prompt in enumerate(prompts):
    ids = tokenizer.encode(prompt)
    limit = loaded.cfg.model.max_seq_len - max_new_tokens
    if not ids or len(ids) > limit:
      raise ValueError(f"prompt {prompt[:40]!r} has {len(ids)} tokens; it needs 1 to {limit} "
                       f"(model.max_seq_len={loaded.cfg.model.max_seq_len} minus max_new_tokens).")
    tokens = fn(loaded.params, np.asarray([ids], np.int32), jax.random.key(seed + i))
    generated = [int(t) for t in np.asarray(tokens[0, len(ids):])]
    if tokenizer.eos_id in generated:
      generated = generated[:generated.index(tokenizer.eos_id)]
    outputs.append(prompt + tokenizer.decode(generated))
  return outputs
