"""Convert Hugging Face Llama checkpoints to ours and back (docs/huggingface.md).

  python -m launch.convert --from-hf path/to/hf_model --out runs/llama/converted
  python -m launch.convert --from-hf path/to/hf_model --out runs/llama/converted \
      --config configs/my_finetune.py --config.mesh.rules=fsdp --config.mesh.data=1 --config.mesh.fsdp=-1
  python -m launch.convert --to-hf runs/llama-ft/checkpoints --out runs/llama-ft/hf [--dtype bfloat16]

Import writes a params-only checkpoint at step 0 (no optimizer state): `launch.generate` and
`launch.eval` read it, and a training run starts from it with
`--config.train.init_checkpoint=<out>` (fresh optimizer). The model section of its config comes from
config.json; the other sections from --config (default configs/base.py), whose mesh decides where
each tensor shard is read to. Every check runs before anything is written.
"""

import dataclasses
import os

import jax
from absl import app, flags

from configs.base import base_config
from launch import checkpoint as ckpt_lib
from launch import hf_checkpoint as hf_lib
from launch import train_state as ts
from launch.cli import FLAGS, quiet_logs
from launch.config import validate
from launch.context import build_context
from launch.trainer import WEIGHT_FIELDS
from lm.config import DTYPES, ModelConfig

flags.DEFINE_string("from-hf", None, "A Hugging Face LlamaForCausalLM directory to import.")
flags.DEFINE_string("to-hf", None, "One of our checkpoint directories to export.")
flags.DEFINE_string("out", None, "Output directory (must be empty or absent).")
flags.DEFINE_integer("step", None, "--to-hf: checkpoint step to export (default: latest).")
flags.DEFINE_enum("param_dtype", None, list(DTYPES),
                  "--from-hf: storage dtype of our parameters (default: the config's model.param_dtype).")
flags.DEFINE_enum("dtype", None, list(DTYPES),
                  "--to-hf: dtype of the exported tensors (default: the checkpoint's model.param_dtype).")


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


def saved_model_config(meta: dict) -> ModelConfig:
  """The ModelConfig in a checkpoint's meta (fields it lacks take today's defaults)."""
  model = meta.get("config", {}).get("model")
  if model is None:
    raise ckpt_lib.CheckpointError(f"checkpoint step {meta.get('step')} has no saved model config.")
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**{k: v for k, v in model.items() if k in known})


def export_hf(ckpt_dir: str, out: str, step: int | None = None, dtype: str | None = None) -> list[str]:
  """Writes config.json + model.safetensors for the checkpoint in `ckpt_dir` to `out`; returns file names.

  Parameters are restored onto one host device (the export gathers every tensor to host memory).
  """
  _check_out_dir(out)
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
  meta = checkpointer.read_meta(step)
  cfg = saved_model_config(meta)
  if cfg.quant != "none":
    raise ValueError(f"{ckpt_dir} step {meta['step']} is quantized (model.quant={cfg.quant!r}); "
                     "export the float checkpoint it was made from.")
  mdef = ts.model_def(cfg)
  try:
    device = jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu
    device = jax.devices()[0]
  single = jax.sharding.SingleDeviceSharding(device)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=single),
                          mdef.abstract_params)
  params, _ = checkpointer.restore_params(abstract, meta["step"])
  checkpointer.close()
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


def main(argv):
  del argv
  quiet_logs()
  from_hf, to_hf = FLAGS["from-hf"].value, FLAGS["to-hf"].value
  if bool(from_hf) == bool(to_hf) or not FLAGS.out:
    raise app.UsageError("pass exactly one of --from-hf DIR or --to-hf CKPT_DIR, and --out DIR.")
  if from_hf:
    config = import_hf(from_hf, FLAGS.out, FLAGS.config, FLAGS.param_dtype)
    n = ModelConfig(**config["model"]).num_params() / 1e6
    print(f"Converted {from_hf} ({n:.2f}M params) to a params-only checkpoint at {FLAGS.out} (step 0).\n"
          f"Its model config, as flags for a training config:\n  {model_flags(config)}\n"
          f"Fine-tune from it with --config.train.init_checkpoint={FLAGS.out}")
  else:
    files = export_hf(to_hf, FLAGS.out, FLAGS.step, FLAGS.dtype)
    if files:
      print(f"Exported {to_hf} to {FLAGS.out}: {', '.join(files)}")


if __name__ == "__main__":
  app.run(main)
