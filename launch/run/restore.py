"""The one way back from a checkpoint: its saved config as a `Config`, its parameters onto shardings.

Every command that reads a checkpoint (train --resume and train.init_checkpoint, eval, generate,
quantize, distill's teacher, prune, export, convert --to-hf) comes through here, so a saved config
is read by one rule: keys added to configs/base.py since the save take their defaults, keys the
code no longer knows are refused (the checkpoint was written by another version).
"""

import dataclasses
from typing import Any

from configs.base import base_config
from launch.run import checkpoint as ckpt_lib
from launch.run import inputs
from launch.run import state as ts
from launch.run.config import Config, validate, with_overrides
from launch.run import programs
from launch.run.plan import RunPlan, make_plan, with_dtype
from launch.storage import paths
from lm.generate import generate_text

# Which model.* keys a run that reads a checkpoint may set differently from the run that saved it:
# one rule for every reader (docs/training.md, "What a checkpoint fixes").
# WEIGHT_FIELDS shape the weights or change what they compute (rope_scaling.., qkv_bias: issue 14).
WEIGHT_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "mlp_dim", "rope_theta", "rope_scaling", "rope_factor", "rope_low_freq_factor",
                 "rope_high_freq_factor", "rope_original_max_len", "qkv_bias", "norm_eps", "tie_embeddings")
# QUANT_FIELDS change the saved tree (int8 kernels and their scales).
QUANT_FIELDS = ("quant", "quant_embedding", "quant_skip")
# FIXED[reader]: the keys `reader` must take from the checkpoint. "resume" (--resume) restores the
# parameters and optimizer state as saved, so their dtype (model.param_dtype) is fixed too; "read"
# (eval, generate, quantize, export, a distillation teacher: the checkpoint's own config plus
# overrides) reads the parameters as saved; "init" (train.init_checkpoint, prune.init_checkpoint)
# starts a new run from the parameters only, restored in the new run's model.param_dtype.
# Every other model key (dtype, remat, attention, max_seq_len, scan_unroll, logits_chunk_size,
# kv_cache_dtype) says how a step computes, and any reader may change it.
FIXED = {"resume": WEIGHT_FIELDS + QUANT_FIELDS + ("param_dtype",),
         "read": WEIGHT_FIELDS + QUANT_FIELDS + ("param_dtype",),
         "init": WEIGHT_FIELDS + QUANT_FIELDS}


def saved_config(meta: dict[str, Any], where: str = "checkpoint", overrides: dict | None = None) -> Config:
  """The validated Config stored in a checkpoint's `meta`, with dotted-key `overrides` applied.

  Raises CheckpointError when the meta has no config or holds keys this code does not know, and
  ValueError when an override names a model key a reader must take from the checkpoint
  (FIXED["read"]); the others (dtype, kv_cache_dtype, remat, attention, ...) may be overridden.
  """
  raw = meta.get("config")
  if not isinstance(raw, dict) or "model" not in raw:
    raise ckpt_lib.CheckpointError(f"{where} step {meta.get('step')} has no saved config; it was not "
                                   "written by launch.train, launch.convert or compress/.")
  defaults = base_config().to_dict()
  unknown = [f"{s}.{k}" if isinstance(v, dict) else s for s, v in raw.items()
             for k in (v if isinstance(v, dict) else [None])
             if s not in defaults or (k is not None and k not in defaults[s])]
  if unknown:
    raise ckpt_lib.CheckpointError(f"{where} step {meta.get('step')} was saved with config keys this code "
                                   f"does not know: {unknown}; read it with the version that wrote it.")
  merged = {s: {**d, **raw.get(s, {})} if isinstance(d, dict) else raw.get(s, d) for s, d in defaults.items()}
  fixed = [k for k in (overrides or {}) if k.startswith("model.") and k[len("model."):] in FIXED["read"]]
  if fixed:
    raise ValueError(f"{fixed[0]}: the checkpoint fixes it (its weights' shape or stored form) and it "
                     "cannot be overridden.")
  return validate(with_overrides(merged, overrides or {}))


def read_saved_config(checkpoint_dir: str, step: int | None = None,
                      overrides: dict | None = None) -> tuple[Config, int]:
  """Returns (the Config `checkpoint_dir` was saved with, the step read); CheckpointError if unreadable.

  A tokenizer saved inside the checkpoint directory (launch.convert's `<out>/tokenizer/`) is found
  there even when the directory has moved since: the saved absolute data.tokenizer_path is then
  replaced by the same file name under `<checkpoint_dir>/tokenizer/`.
  """
  checkpointer = ckpt_lib.Checkpointer(checkpoint_dir, read_only=True)
  try:
    meta = checkpointer.read_meta(step)
  finally:
    checkpointer.close()
  cfg = saved_config(meta, checkpoint_dir, overrides)
  return _tokenizer_beside(cfg, checkpoint_dir), int(meta["step"])


def _tokenizer_beside(cfg: Config, checkpoint_dir: str) -> Config:
  """`cfg` with data.tokenizer_path moved into `checkpoint_dir`/tokenizer/ when the saved path is gone
  and the checkpoint carries a file of that name (a converted checkpoint that was moved or copied)."""
  path = cfg.data.tokenizer_path
  if not path or paths.exists(path):
    return cfg
  beside = paths.join(paths.normalize(checkpoint_dir), "tokenizer", path.rstrip("/").rsplit("/", 1)[-1])
  if not paths.exists(beside):
    return cfg
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer_path=beside))


def restore_params(checkpoint_dir: str, mdef: ts.ModelDef, shardings: ts.Params,
                   step: int | None = None) -> tuple[ts.Params, dict]:
  """Restores `step`'s (default: latest) parameters of `mdef`'s shapes onto `shardings`; returns (params, meta)."""
  checkpointer = ckpt_lib.Checkpointer(checkpoint_dir, read_only=True)
  try:
    return checkpointer.restore_params(ts.abstract_params(mdef, shardings), step)
  finally:
    checkpointer.close()


def check_compatible(cfg: Config, saved: Config, reader: str, what: str) -> None:
  """Raises ValueError naming the flags to set when `cfg`'s model differs from `saved`'s in a key that
  `reader` ("resume", "read" or "init"; see FIXED) must take from the checkpoint; `what` names the
  checkpoint in the message."""
  now, then = dataclasses.asdict(cfg.model), dataclasses.asdict(saved.model)
  diff = [k for k in FIXED[reader] if then[k] != now[k]]
  if diff:
    raise ValueError(
        f"{what} holds a different model ("
        + ", ".join(f"model.{k}={now[k]!r}, saved {then[k]!r}" for k in diff) + "); set "
        + " ".join(f"--config.model.{k}={then[k]}" for k in diff) + " (nothing was written).")


# --- issue 14: a fine-tune reads text with the tokenizer its init_checkpoint was trained with ---
def inherit_tokenizer(cfg: Config) -> Config:
  """`cfg` with train.init_checkpoint's Hugging Face tokenizer when `cfg` leaves the tokenizer at its
  default (data.tokenizer='sentencepiece', data.tokenizer_path=''), which would train a new one.

  A converted checkpoint (launch.convert --from-hf) saves data.tokenizer='huggingface' and a
  data.tokenizer_path inside itself; a run fine-tuned from it inherits that and saves it in turn,
  so eval, generate, quantize and export of the fine-tuned run use the same tokenizer.
  """
  d = cfg.data
  if not cfg.train.init_checkpoint or d.tokenizer != "sentencepiece" or d.tokenizer_path:
    return cfg
  saved, _ = read_saved_config(cfg.train.init_checkpoint)
  if saved.data.tokenizer != "huggingface":
    return cfg
  data = dataclasses.replace(d, tokenizer=saved.data.tokenizer, tokenizer_path=saved.data.tokenizer_path)
  return dataclasses.replace(cfg, data=data)
# --- end issue 14 ---


def init_from_checkpoint(plan: RunPlan, checkpoint_dir: str) -> ts.TrainState:
  """A step-0 TrainState: `checkpoint_dir`'s latest parameters and a fresh optimizer state, sharded.

  The checkpoint may be params-only (launch.convert) or another run's. Raises ValueError naming the
  flags to set when the run's model differs from the saved one in a key FIXED["init"] names.
  """
  saved, step = read_saved_config(checkpoint_dir)
  check_compatible(plan.cfg, saved, "init", f"train.init_checkpoint={checkpoint_dir}")
  params, _ = restore_params(checkpoint_dir, plan.mdef, plan.shardings.params, step)
  return ts.train_state_from_params(params, plan.tx, plan.shardings)


@dataclasses.dataclass
class LoadedModel:
  cfg: Config
  plan: RunPlan
  params: dict
  tokenizer: object
  step: int

  def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, **batching) -> list[str]:
    """lm.generate.generate_text with this checkpoint's model and tokenizer, through the programs
    `launch.generate` runs (launch/run/programs.py: the serving layout under the plan's mesh);
    `batching`: seed, batch_size, stop_ids, echo. Returns one string per prompt (prompt included
    unless echo=False)."""
    params = programs.serving_params(self.plan, self.params)
    generator = programs.text_generator(self.plan, params, max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_k=top_k, top_p=top_p)
    return generate_text(generator, self.tokenizer, prompts, max_seq_len=self.cfg.model.max_seq_len,
                         max_new_tokens=max_new_tokens, **batching)


def load_checkpoint(checkpoint_dir: str, step: int | None = None, devices: list | None = None,
                    overrides: dict | None = None) -> LoadedModel:
  """Restores parameters (not optimizer state) and the run's config from `checkpoint_dir`.

  `overrides` maps dotted keys ("mesh.rules", "train.global_batch_size", ...) to new values, e.g. to
  evaluate on another mesh; model shapes come from the checkpoint. Raises CheckpointError for a
  missing or unreadable checkpoint before anything compiles.
  """
  cfg, step = read_saved_config(checkpoint_dir, step, overrides)
  tokenizer = inputs.prepare(cfg.data, cfg.model.vocab_size)
  plan = make_plan(cfg, devices)
  cfg = with_dtype(cfg, plan.cfg.model.dtype)
  params, _ = restore_params(checkpoint_dir, plan.mdef, plan.shardings.params, step)
  return LoadedModel(cfg, plan, params, tokenizer, step)
