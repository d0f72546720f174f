"""Post-training int8 quantization: float parameters in, the parameters of an `lm.quant` model out.

  W8A16: every dense kernel W [*I, *O] becomes int8 W_q with one float32 scale per output channel,
         scale_o = max_i |W[i, o]| / 127, so |W - W_q * scale| <= scale / 2 elementwise.
  W8A8:  the same, after SmoothQuant smoothing: with calibrated activation ranges a_i = max |x_i|
         and weight ranges w_i = max_o |W[i, o]|, s_i = a_i^alpha / w_i^(1 - alpha); the kernel
         becomes diag(s) W and the layer divides its input by s (x W = (x / s)(diag(s) W)), which
         moves activation outliers into the weights, where per-channel scales absorb them.

Everything here is jnp on whole parameter trees, so it can run inside `jit` with the quantized
model's `out_shardings` (launch/quantize.py does) and nothing is gathered onto one device.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import DENSE_LAYERS, ModelConfig
from lm.quant import quantize_symmetric
from lm.model_def import define

Params = dict[str, Any]
MODES = ("w8a16", "w8a8")

# Logical names live on the Param variables; sharding is decided by rule tables, never at creation.
nnx.use_eager_sharding(False)


def quantized_config(cfg: ModelConfig, mode: str, *, embedding: bool = False,
                     skip: tuple[str, ...] = ()) -> ModelConfig:
  """Returns `cfg` switched to int8 inference; raises ValueError for a bad mode or skip-list name."""
  if cfg.quant != "none":
    raise ValueError(f"The checkpoint is already quantized (model.quant={cfg.quant!r}); quantize the "
                     "float checkpoint it came from instead.")
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}: choose one of {list(MODES)}.")
  known = [n for n in DENSE_LAYERS if n != "unembed" or not cfg.tie_embeddings]
  for name in skip:
    if name not in known:
      raise ValueError(f"skip list names {name!r}, which is not a dense layer of this model; "
                       f"choose from {known}.")
  return dataclasses.replace(cfg, quant=mode, quant_embedding=embedding, quant_skip=",".join(skip))


def abstract_params(cfg: ModelConfig) -> Params:
  """The parameter tree of Transformer(cfg) as ShapeDtypeStructs, without allocating."""
  return nnx.to_pure_dict(nnx.state(define(cfg).abstract, nnx.Param))


def smoothing_factors(input_range: jax.Array, kernel: jax.Array, num_in: int, alpha: float) -> jax.Array:
  """SmoothQuant's per-input-channel s = a^alpha / w^(1 - alpha).

  `input_range` is [*S, *I] (S: stacked layers, if any) and `kernel` [*S, *I, *O]. Channels that never
  fired or have all-zero weights keep s = 1.
  """
  if not 0 <= alpha <= 1:
    raise ValueError(f"alpha={alpha}: the smoothing strength must be in [0, 1] (SmoothQuant uses 0.5).")
  num_out = kernel.ndim - input_range.ndim
  w_range = jnp.max(jnp.abs(kernel.astype(jnp.float32)), axis=tuple(range(kernel.ndim - num_out, kernel.ndim)))
  a = input_range.astype(jnp.float32)
  s = a ** alpha / jnp.maximum(w_range, 1e-12) ** (1 - alpha)
  return jnp.where((a > 0) & (w_range > 0), jnp.clip(s, 1e-5, 1e5), 1.0)


def quantize_kernel(kernel: jax.Array, num_stacked: int, num_in: int) -> tuple[jax.Array, jax.Array]:
  """int8 kernel [*S, *I, *O] and float32 scales [*S, *O], one per output channel (per stacked layer)."""
  reduce_axes = tuple(range(num_stacked, num_stacked + num_in))
  values, scale = quantize_symmetric(kernel, reduce_axes)
  return values, jnp.squeeze(scale, reduce_axes)


def _quantize_linear(target: Params, source: Params, ranges: Params | None, num_stacked: int,
                     alpha: float) -> Params:
  kernel = source["kernel"].astype(jnp.float32)
  num_out = target["scale"].ndim - num_stacked
  num_in = kernel.ndim - num_stacked - num_out
  out = {}
  if "smooth" in target:
    smooth = jnp.ones(target["smooth"].shape, jnp.float32)
    if ranges is not None:
      smooth = smoothing_factors(ranges["input_range"], kernel, num_in, alpha)
    kernel = kernel * smooth.reshape(smooth.shape + (1,) * num_out)
    out["smooth"] = smooth
  out["kernel"], out["scale"] = quantize_kernel(kernel, num_stacked, num_in)
  if "bias" in target:  # model.qkv_bias: the bias stays float32, unchanged by smoothing
    out["bias"] = source["bias"].astype(jnp.float32)
  return out


def quantize_params(float_params: Params, quant_cfg: ModelConfig, input_ranges: Params | None = None,
                    alpha: float = 0.5) -> Params:
  """Converts a float model's parameters into those of `Transformer(quant_cfg)`.

  `input_ranges` (from compress.calibrate) turns on SmoothQuant smoothing with strength `alpha` for
  the W8A8 layers; without it their `smooth` vectors are ones. Layers in `quant_cfg.quant_skip` and
  norms are copied unchanged. Traceable (use inside jit).
  """
  if input_ranges is not None and quant_cfg.quant != "w8a8":
    raise ValueError(f"Smoothing needs model.quant='w8a8', got {quant_cfg.quant!r}: W8A16 keeps "
                     "activations in float, so there is nothing to smooth.")

  def convert(target, source, ranges, num_stacked):
    if isinstance(target, dict) and "kernel" in target and target["kernel"].dtype == jnp.int8:
      return _quantize_linear(target, source, ranges, num_stacked, alpha)
    if isinstance(target, dict) and "table" in target and target["table"].dtype == jnp.int8:
      table, scale = quantize_kernel(source["table"].T, 0, 1)  # one scale per vocabulary row
      return {"table": table.T, "scale": scale}
    if isinstance(target, dict):
      missing = sorted(set(target) - set(source))
      if missing:
        raise ValueError(f"The float parameters lack {missing}; were they saved by a model with "
                         "another config?")
      return {key: convert(value, source[key], (ranges or {}).get(key),
                           num_stacked + (key == "blocks")) for key, value in target.items()}
    if tuple(source.shape) != tuple(target.shape):
      raise ValueError(f"A float parameter has shape {source.shape}; the model needs {target.shape}.")
    return source

  return convert(abstract_params(quant_cfg), float_params, input_ranges, 0)


def dequantize_params(params: Params) -> Params:
  """The float kernels an int8 tree stands for: kernel * scale / smooth (for error checks)."""
  def convert(node, num_stacked):
    if isinstance(node, dict) and "kernel" in node and node["kernel"].dtype == jnp.int8:
      num_out = node["scale"].ndim - num_stacked
      kernel = node["kernel"].astype(jnp.float32)
      scale = node["scale"].reshape(node["scale"].shape[:num_stacked] +
                                    (1,) * (kernel.ndim - node["scale"].ndim) + node["scale"].shape[num_stacked:])
      kernel = kernel * scale
      if "smooth" in node:
        kernel = kernel / node["smooth"].reshape(node["smooth"].shape + (1,) * num_out)
      return {"kernel": kernel, **({"bias": node["bias"]} if "bias" in node else {})}
    if isinstance(node, dict) and "table" in node and node["table"].dtype == jnp.int8:
      return {"table": node["table"].astype(jnp.float32) * node["scale"][:, None]}
    if isinstance(node, dict):
      return {k: convert(v, num_stacked + (k == "blocks")) for k, v in node.items()}
    return node
  return convert(params, 0)
