"""A servable artifact of the forward pass: serialized StableHLO (`jax.export`) plus the parameters.

The artifact directory holds
  forward.stablehlo   jax.export serialization of fn(param_0, ..., param_{n-1}, tokens_BxL) -> logits
  params.npz          the n parameters as arrays p00000 ... (float ones widened to float32 on disk)
  servable.json       what the function expects: batch/length, vocabulary, quantization, dtypes
It is loaded and run by compress/servable.py, which needs only jax and numpy (no model code).
Parameters are arguments rather than baked-in constants, so the StableHLO stays small and one
artifact can serve retrained weights of the same shape.
"""

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from launch.run.restore import load_checkpoint
from lm.config import ModelConfig

Params = dict[str, Any]


def export_forward(graphdef: nnx.GraphDef, params: Params, *, batch: int | None, seq_len: int):
  """Exports the logits of `nnx.merge(graphdef, params)` for int32 tokens [batch, seq_len].

  `batch=None` exports a symbolic batch size (any batch runs). Returns (jax.export.Exported, the flat
  list of parameter arrays in argument order).
  """
  flat, treedef = jax.tree_util.tree_flatten(params)

  def forward(*args):
    *flat_params, tokens_BxL = args
    model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, flat_params))
    return model(tokens_BxL)

  batch_dim = jax.export.symbolic_shape("b")[0] if batch is None else batch
  specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flat]
  specs.append(jax.ShapeDtypeStruct((batch_dim, seq_len), jnp.int32))
  return jax.export.export(jax.jit(forward))(*specs), flat


def save_servable(out_dir: str, graphdef: nnx.GraphDef, params: Params, cfg: ModelConfig, *,
                  batch: int | None, seq_len: int, step: int) -> dict:
  """Writes the artifact of the model (`graphdef`, `params`, `cfg`) to `out_dir`; returns its info."""
  if seq_len < 1 or seq_len > cfg.max_seq_len:
    raise ValueError(f"seq_len={seq_len}: must be in [1, model.max_seq_len={cfg.max_seq_len}].")
  if batch is not None and batch < 1:
    raise ValueError(f"batch={batch}: must be >= 1, or None for any batch size.")
  exported, flat = export_forward(graphdef, params, batch=batch, seq_len=seq_len)
  serialized = exported.serialize()
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "forward.stablehlo"), "wb") as f:
    f.write(serialized)
  arrays = {}
  for i, x in enumerate(flat):
    x = np.asarray(jax.device_get(x))
    arrays[f"p{i:05d}"] = x.astype(np.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x
  np.savez(os.path.join(out_dir, "params.npz"), **arrays)
  info = {"batch": batch, "seq_len": seq_len, "vocab_size": cfg.vocab_size, "quant": cfg.quant,
          "num_params": len(flat), "param_dtypes": [str(x.dtype) for x in flat], "step": step,
          "platforms": list(exported.platforms)}
  with open(os.path.join(out_dir, "servable.json"), "w") as f:
    json.dump(info, f, indent=2)
  return info


def export_checkpoint(checkpoint_dir: str, out_dir: str, *, step: int | None = None, seq_len: int = 0,
                      batch: int = 0) -> dict:
  """Writes the servable artifact of `checkpoint_dir` (float or quantized) to `out_dir`; returns its info.

  `seq_len` 0 means the run's data.seq_len; `batch` 0 a symbolic batch. Parameters are restored onto
  one device.
  """
  if not out_dir:
    raise ValueError("out_dir is required: the directory the artifact is written to.")
  loaded = load_checkpoint(checkpoint_dir, step, devices=jax.devices()[:1])
  return save_servable(out_dir, loaded.ctx.mdef.graphdef, loaded.params, loaded.cfg.model,
                       batch=batch or None, seq_len=seq_len or loaded.cfg.data.seq_len, step=loaded.step)
