"""Hugging Face Llama checkpoints to ours and back, end to end (the command is `python -m launch.convert`;
docs/huggingface.md).

Import writes a params-only checkpoint at step 0 (no optimizer state): `launch.generate` and
`launch.eval` read it, and a training run starts from it with `--config.train.init_checkpoint=<out>`
(fresh optimizer). The model section of its config comes from config.json; the other sections from
the given config (default configs/base.py), whose mesh decides where each tensor shard is read to.
Every check runs before anything is written.
"""

import os
import tempfile

import jax

from configs.base import base_config
from launch.huggingface import checkpoint as hf_lib
from launch.run import checkpoint as ckpt_lib
from launch.run import state as ts
from launch.run.config import validate
from launch.run.plan import make_plan
from launch.run.restore import WEIGHT_FIELDS, restore_params, saved_config
from launch.storage import bucket
from launch.storage import paths
from lm.data import tokenizer as tokenizer_lib
from lm.model_def import for_shapes

# The files of a Hugging Face tokenizer (and its generation settings) that travel with the weights:
# import copies them to <checkpoint>/tokenizer/, export copies them next to the exported weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "added_tokens.json", "tokenizer.model",
                   "vocab.json", "merges.txt")
TOKENIZER_DIR = "tokenizer"


def _check_out_dir(out: str) -> None:
  """Raises ValueError when `out` (local or gs://) holds anything; probes a bucket's write access."""
  if paths.isdir(out) and paths.listdir(out):
    raise ValueError(f"--out {out} is not empty; choose a new directory (nothing was written).")
  bucket.probe(out)


def import_hf(hf_dir: str, out: str, raw_config=None, param_dtype: str | None = None) -> dict:
  """Converts the HF checkpoint in `hf_dir` into a params-only checkpoint in `out`; returns its config dict.

  `raw_config` (a ConfigDict, default base_config()) supplies everything but the model's shapes.
  `hf_dir` and `out` may be gs:// URLs (the HF files are read from a local cached copy).
  """
  _check_out_dir(out)
  source, hf_dir = hf_dir, paths.local_copy(hf_dir)
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
  has_tokenizer = os.path.isfile(os.path.join(hf_dir, "tokenizer.json"))
  if has_tokenizer and not raw.data.tokenizer_path:  # the model's own tokenizer, copied below
    tokenizer_lib.load_tokenizer("huggingface", "", fields["vocab_size"], hf_dir)  # checks the vocabulary
    raw.data.tokenizer = "huggingface"
    raw.data.tokenizer_path = paths.join(paths.normalize(out), TOKENIZER_DIR, "tokenizer.json")
  cfg = validate(raw)
  plan = make_plan(cfg)  # the mesh and rule table the run will use; checks they fit the model
  with hf_lib.HfTensors(hf_dir) as tensors:
    hf_lib.check_tensors(tensors, cfg.model)
    params = hf_lib.import_params(tensors, cfg.model, plan.mdef.abstract_params, plan.shardings.params)
    jax.block_until_ready(params)
  checkpointer = ckpt_lib.Checkpointer(out, keep=1, async_save=False)
  checkpointer.save_params(0, params, {"data_state": None, "config": cfg.to_dict(), "hf_config": hf_config,
                                      "source": paths.normalize(source)})
  checkpointer.close()
  if has_tokenizer:
    copy_tokenizer_files(hf_dir, paths.join(out, TOKENIZER_DIR))
  return cfg.to_dict()


def copy_tokenizer_files(source: str, dest: str) -> list[str]:
  """Copies the TOKENIZER_FILES present in `source` into `dest` (created; either may be gs://);
  returns their names."""
  names = [f for f in TOKENIZER_FILES if paths.isfile(paths.join(source, f))]
  paths.makedirs(dest)
  for name in names:
    paths.write_bytes(paths.join(dest, name), paths.read_bytes(paths.join(source, name)))
  return names


def export_hf(ckpt_dir: str, out: str, step: int | None = None, dtype: str | None = None) -> list[str]:
  """Writes config.json + model.safetensors for the checkpoint in `ckpt_dir` to `out`; returns file names.

  Parameters are restored onto one host device (the export gathers every tensor to host memory).
  The tokenizer files beside the run's `data.tokenizer_path` (a Hugging Face tokenizer) are copied too.
  `ckpt_dir` and `out` may be gs:// URLs (a bucket `out` is written locally first, then uploaded).
  """
  _check_out_dir(out)
  if paths.is_url(out):
    with tempfile.TemporaryDirectory(prefix="shardlm-hf-") as staging:
      if export_hf(ckpt_dir, staging, step, dtype):
        return paths.upload_tree(staging, out)
      return []
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
  meta = checkpointer.read_meta(step)
  run_cfg = saved_config(meta, ckpt_dir)
  cfg = run_cfg.model
  if cfg.quant != "none":
    raise ValueError(f"{ckpt_dir} step {meta['step']} is quantized (model.quant={cfg.quant!r}); "
                     "export the float checkpoint it was made from.")
  checkpointer.close()
  mdef = ts.model_def(for_shapes(cfg))  # read the parameters onto the host; nothing runs
  try:
    device = jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu
    device = jax.devices()[0]
  single = jax.sharding.SingleDeviceSharding(device)
  params, _ = restore_params(ckpt_dir, mdef, jax.tree.map(lambda _: single, mdef.abstract_params), meta["step"])
  files = hf_lib.write_hf(out, params, cfg, dtype or cfg.param_dtype, _imported_hf_config(meta))
  if files and run_cfg.data.tokenizer == "huggingface" and paths.isfile(run_cfg.data.tokenizer_path):
    copy_tokenizer_files(paths.dirname(run_cfg.data.tokenizer_path), out)
    files = sorted(os.listdir(out))
  return files


def _imported_hf_config(meta: dict) -> dict | None:
  """The config.json saved at import: in this checkpoint, or in the one its run started from."""
  if "hf_config" in meta:
    return meta["hf_config"]
  source = meta.get("config", {}).get("train", {}).get("init_checkpoint")
  if source and paths.isdir(source):
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
