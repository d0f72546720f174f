"""Hugging Face Llama checkpoints to ours and back, end to end (the command is `python -m launch.convert`;
docs/huggingface.md).

Import writes a params-only checkpoint at step 0 (no optimizer state): `launch.generate` and
`launch.eval` read it, and a training run starts from it with `--config.train.init_checkpoint=<out>`
(fresh optimizer). The model section of its config comes from config.json; the other sections from
the given config (default configs/base.py), whose mesh decides where each tensor shard is read to.
Every check runs before anything is written.
"""

import os

import jax

from configs.base import base_config
from launch.huggingface import checkpoint as hf_lib
from launch.run import checkpoint as ckpt_lib
from launch.run import state as ts
from launch.run.config import validate
from launch.run.context import build_context
from launch.run.restore import WEIGHT_FIELDS, restore_params, saved_config

def _check_out_dir(out: str) -> None:
  if os.path.exists(out) and os.listdir(out):
    raise ValueError(f"--out {out} is not empty; choose a new directory (nothing was written).")


def import_hf(hf_dir: str, out: str, raw_config=None, param_dtype: str | None = None) -> dict:
  """Converts the HF checkpoint in `hf_dir` into a params-only checkpoint in `out`; returns its config dict.

  `raw_config` (a ConfigDict, default base_config()) supplies everything but the model's shapes.
  """
  _check_out_dir(out)
  hf_config = hf_lib.read_hf_config(hf_dir)
  fields = hf_lib.model_fields_from_hf(hf_config)
  raw = base_config() if raw_config is None else raw_config
  if raw_config is None:  # defaults that fit any model and device count
    raw.data.seq_len = min(raw.data.seq_len, fields["max_seq_len"])
    raw.train.global_batch_size = len(jax.devices())
  for key, value in fields.items():
    raw.model[key] = value
  if param_dtype is not None:
    raw.model.param_dtype = param_dtype
  cfg = validate(raw)
  ctx = build_context(cfg)  # the mesh and rule table the run will use; checks they fit the model
  with hf_lib.HfTensors(hf_dir) as tensors:
    hf_lib.check_tensors(tensors, cfg.model)
    params = hf_lib.import_params(tensors, cfg.model, ctx.mdef.abstract_params, ctx.shardings.params)
    jax.block_until_ready(params)
  checkpointer = ckpt_lib.Checkpointer(out, keep=1, async_save=False)
  checkpointer.save_params(0, params, {"data_state": None, "config": cfg.to_dict(), "hf_config": hf_config,
                                      "source": os.path.abspath(hf_dir)})
  checkpointer.close()
  return cfg.to_dict()


def export_hf(ckpt_dir: str, out: str, step: int | None = None, dtype: str | None = None) -> list[str]:
  """Writes config.json + model.safetensors for the checkpoint in `ckpt_dir` to `out`; returns file names.

  Parameters are restored onto one host device (the export gathers every tensor to host memory).
  """
  _check_out_dir(out)
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
  meta = checkpointer.read_meta(step)
  cfg = saved_config(meta, ckpt_dir).model
  if cfg.quant != "none":
    raise ValueError(f"{ckpt_dir} step {meta['step']} is quantized (model.quant={cfg.quant!r}); "
                     "export the float checkpoint it was made from.")
  checkpointer.close()
  mdef = ts.model_def(cfg)
  try:
    device = jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu
    device = jax.devices()[0]
  single = jax.sharding.SingleDeviceSharding(device)
  params, _ = restore_params(ckpt_dir, mdef, jax.tree.map(lambda _: single, mdef.abstract_params), meta["step"])
  return hf_lib.write_hf(out, params, cfg, dtype or cfg.param_dtype, _imported_hf_config(meta))


def _imported_hf_config(meta: dict) -> dict | None:
  """The config.json saved at import: in this checkpoint, or in the one its run started from."""
  if "hf_config" in meta:
    return meta["hf_config"]
  source = meta.get("config", {}).get("train", {}).get("init_checkpoint")
  if source and os.path.isdir(source):
    checkpointer = ckpt_lib.Checkpointer(source, read_only=True)
    try:
      return checkpointer.read_meta().get("hf_config")
    except ckpt_lib.CheckpointError:
      return None
    finally:
      checkpointer.close()
  return None


def model_flags(config: dict) -> str:
  """The --config.model.* flags that make a training config match a converted checkpoint."""
  return " ".join(f"--config.model.{k}={config['model'][k]}" for k in WEIGHT_FIELDS + ("max_seq_len",))
