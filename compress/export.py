"""A servable artifact of the forward pass: serialized StableHLO (`jax.export`) plus the parameters.

The artifact directory holds
  forward.stablehlo   jax.export serialization of fn(param_0, ..., param_{n-1}, tokens_BxL) -> logits
  generate.stablehlo  (with generate_tokens > 0) fn(params..., prompt_BxP, prompt_lengths_B, seed) ->
                      tokens [B, P + generate_tokens]: prefill + the cached decode loop of lm/serving.py
  params.npz          the n parameters as arrays p00000 ... (float ones widened to float32 on disk)
  servable.json       what the function expects: batch/length, vocabulary, quantization, dtypes
It is loaded and run by compress/servable.py, which needs only jax and numpy (no model code).
Parameters are arguments rather than baked-in constants, so the StableHLO stays small and one
artifact can serve retrained weights of the same shape.
"""

import functools
import json
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from launch.run import programs
from launch.run.restore import load_checkpoint
from launch.storage import bucket
from launch.storage import paths
from lm.config import ModelConfig
from lm.decoding import generate
from lm.sampling import check_sampling_args
from lm.serving import serving_params

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


def export_generate(cfg: ModelConfig, params: Params, *, serving_graphdef: nnx.GraphDef, batch: int | None,
                    prompt_len: int, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                    eos_id: int | None = None):
  """Exports generation: fn(*params, prompt_BxP, prompt_lengths_B, seed) -> int32 tokens [B, P + N].

  It runs what `launch.generate` runs: `serving_params` (the float weights cast to the compute dtype
  and split per layer; once per call, before the loop) and `lm.decoding.generate` over the serving
  layout's Transformer (`serving_graphdef`: `launch.run.programs.serving_mdef(plan).graphdef`, its
  kernels the plan's): one prefill, then a while loop of cached decode steps that stops when every row
  has emitted `eos_id`. Rows are left-padded to P (`lm.generate.left_pad`); `seed` (int32) seeds
  sampling. `params` are the Transformer's (stacked, as in the checkpoint). Returns (Exported, the
  flat parameter list in argument order).
  """
  check_sampling_args(temperature, top_k, 1.0)
  if not 1 <= prompt_len or prompt_len + max_new_tokens > cfg.max_seq_len or max_new_tokens < 1:
    raise ValueError(f"prompt_len={prompt_len} + generate_tokens={max_new_tokens} must fit "
                     f"model.max_seq_len={cfg.max_seq_len}, with both >= 1.")
  flat, treedef = jax.tree_util.tree_flatten(params)

  def run(*args):
    *flat_params, prompt_BxP, lengths_B, seed = args
    tree = jax.tree_util.tree_unflatten(treedef, flat_params)
    model = nnx.merge(serving_graphdef, serving_params(tree, cfg.compute_dtype, unstack="blocks" in tree))
    return generate(model, prompt_BxP, max_new_tokens=max_new_tokens, rng=jax.random.key(seed),
                    temperature=temperature, top_k=top_k, eos_id=eos_id, prompt_lengths_B=lengths_B)

  batch_dim = jax.export.symbolic_shape("b")[0] if batch is None else batch
  specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flat]
  specs += [jax.ShapeDtypeStruct((batch_dim, prompt_len), jnp.int32),
            jax.ShapeDtypeStruct((batch_dim,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)]
  return jax.export.export(jax.jit(run))(*specs), flat


def save_servable(out_dir: str, graphdef: nnx.GraphDef, params: Params, cfg: ModelConfig, *,
                  batch: int | None, seq_len: int, step: int, generate_tokens: int = 0,
                  temperature: float = 0.0, top_k: int = 0, eos_id: int | None = None,
                  serving_graphdef: nnx.GraphDef | None = None) -> dict:
  """Writes the artifact of the model (`graphdef`, `params`, `cfg`) to `out_dir`; returns its info.

  With `generate_tokens` > 0 it also exports generation (`export_generate`) of that many tokens
  after prompts of `seq_len` (left-padded) columns, sampling with `temperature` and `top_k`,
  through the serving layout's `serving_graphdef` (required then).
  """
  if seq_len < 1 or seq_len > cfg.max_seq_len:
    raise ValueError(f"seq_len={seq_len}: must be in [1, model.max_seq_len={cfg.max_seq_len}].")
  if batch is not None and batch < 1:
    raise ValueError(f"batch={batch}: must be >= 1, or None for any batch size.")
  if generate_tokens and serving_graphdef is None:
    raise ValueError("generate_tokens > 0 needs serving_graphdef (launch.run.programs.serving_mdef(plan)).")
  exported, flat = export_forward(graphdef, params, batch=batch, seq_len=seq_len)
  serialized = exported.serialize()
  generation = None
  if generate_tokens:
    generation = export_generate(cfg, params, serving_graphdef=serving_graphdef, batch=batch, prompt_len=seq_len,
                                 max_new_tokens=generate_tokens, temperature=temperature, top_k=top_k,
                                 eos_id=eos_id)[0].serialize()
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "forward.stablehlo"), "wb") as f:
    f.write(serialized)
  if generation is not None:
    with open(os.path.join(out_dir, "generate.stablehlo"), "wb") as f:
      f.write(generation)
  arrays = {}
  for i, x in enumerate(flat):
    x = np.asarray(jax.device_get(x))
    arrays[f"p{i:05d}"] = x.astype(np.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x
  np.savez(os.path.join(out_dir, "params.npz"), **arrays)
  info = {"batch": batch, "seq_len": seq_len, "vocab_size": cfg.vocab_size, "quant": cfg.quant,
          "kv_cache_dtype": cfg.kv_cache_dtype,
          "num_params": len(flat), "param_dtypes": [str(x.dtype) for x in flat], "step": step,
          "platforms": list(exported.platforms), "generate_tokens": generate_tokens,
          "temperature": temperature, "top_k": top_k, "eos_id": eos_id}
  with open(os.path.join(out_dir, "servable.json"), "w") as f:
    json.dump(info, f, indent=2)
  return info


def export_checkpoint(checkpoint_dir: str, out_dir: str, *, step: int | None = None, seq_len: int = 0,
                      batch: int = 0, generate_tokens: int = 0, temperature: float = 0.0,
                      top_k: int = 0) -> dict:
  """Writes the servable artifact of `checkpoint_dir` (float or quantized) to `out_dir`; returns its info.

  `seq_len` 0 means the run's data.seq_len; `batch` 0 a symbolic batch; `generate_tokens` > 0 adds
  generation (`save_servable`), stopping at the tokenizer's EOS. Parameters are restored onto one device.
  """
  if not out_dir:
    raise ValueError("out_dir is required: the directory the artifact is written to.")
  bucket.probe(out_dir)  # a gs:// out_dir: staged locally below, then uploaded
  loaded = load_checkpoint(checkpoint_dir, step, devices=jax.devices()[:1])
  seq_len = seq_len or loaded.cfg.data.seq_len
  if generate_tokens and seq_len + generate_tokens > loaded.cfg.model.max_seq_len:
    raise ValueError(f"seq_len={seq_len} + generate_tokens={generate_tokens} exceeds model.max_seq_len="
                     f"{loaded.cfg.model.max_seq_len}; lower --seq_len or --generate_tokens.")
  save = functools.partial(save_servable, graphdef=loaded.plan.mdef.graphdef, params=loaded.params,
                           serving_graphdef=programs.serving_mdef(loaded.plan).graphdef,
                           cfg=loaded.cfg.model, batch=batch or None, seq_len=seq_len, step=loaded.step,
                           generate_tokens=generate_tokens, temperature=temperature, top_k=top_k,
                           eos_id=loaded.tokenizer.eos_id if generate_tokens else None)
  if not paths.is_url(out_dir):
    return save(out_dir)
  with tempfile.TemporaryDirectory(prefix="shardlm-export-") as staging:
    info = save(staging)
    paths.upload_tree(staging, out_dir)
  return info
