"""Int8 inference layers: the dense layer and embedding that `model.quant` swaps in, and their math.

A quantized layer has the float layer's shapes and logical names: the int8 `kernel` keeps the float
kernel's names, its float32 `scale` is named by the output dims (one scale per output channel), and
the W8A8 `smooth` vector (SmoothQuant) by the input dims. So rule tables shard a quantized model
exactly like the float one. Converting float parameters into these is `compress/`'s job.

  w8a16: y = (x · float(W_q)) * scale_w                       weights int8, activations float
  w8a8:  y = int32(Q(x / smooth) · W_q) * scale_x * scale_w   Q: per-token symmetric int8

Shape suffixes as in transformer.py; I are the contracted input dims, O the output dims.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lm import layers
from lm.config import ModelConfig

INT8_MAX = 127
# A channel or token that is all zeros gets this scale, so 0 / scale stays 0 instead of NaN.
_TINY = 1e-12


class InputRange(nnx.Variable):
  """Running max |x| of each input channel of a dense layer, recorded by calibration runs."""


def quantize_symmetric(x: jax.Array, reduce_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 quantization with one scale per slice: max |x| over `reduce_axes` maps to 127.

  Returns (int8 values, float32 scales); the scales keep `reduce_axes` as size-1 dims, so
  `values * scales` dequantizes. Rounding error per element is at most scale / 2.
  """
  x32 = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x32), axis=reduce_axes, keepdims=True)
  scale = jnp.maximum(amax, _TINY) / INT8_MAX
  values = jnp.clip(jnp.round(x32 / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return values, scale


def int8_matmul(x_q: jax.Array, kernel_q: jax.Array, num_in: int) -> jax.Array:
  """int8 [..., *I] x int8 [*I, *O] -> int32 [..., *O], contracting the last `num_in` dims of x.

  int32 accumulation is exact while the contracted size is below 2^31 / 127^2 (about 133k).
  """
  contract_x = tuple(range(x_q.ndim - num_in, x_q.ndim))
  dims = ((contract_x, tuple(range(num_in))), ((), ()))
  return jax.lax.dot_general(x_q, kernel_q, dims, preferred_element_type=jnp.int32)


def w8a8_matmul(x: jax.Array, kernel_q: jax.Array, kernel_scale_O: jax.Array, num_in: int) -> jax.Array:
  """Quantizes x [..., *I] per token, multiplies in int8 with int32 sums; returns float32 [..., *O]."""
  batch_dims = x.ndim - num_in
  x_q, x_scale = quantize_symmetric(x, tuple(range(batch_dims, x.ndim)))
  acc = int8_matmul(x_q, kernel_q, num_in)
  num_out = kernel_q.ndim - num_in
  token_scale = x_scale.reshape(x_scale.shape[:batch_dims] + (1,) * num_out)
  return acc.astype(jnp.float32) * token_scale * kernel_scale_O.astype(jnp.float32)


class QuantLinear(nnx.Module):
  """`layers.Linear` with an int8 kernel and per-output-channel scales (w8a16 or w8a8).

  Parameters start as placeholders (zeros, unit scales); they are filled from a float checkpoint by
  compress.quantize. `rngs` and `init_scale` are accepted so it is a drop-in for `layers.Linear`.
  """

  def __init__(self, in_shape, out_shape, names, *, mode: str, dtype, param_dtype, rngs: nnx.Rngs,
               init_scale: float = 1.0, use_bias: bool = False):
    del param_dtype, rngs, init_scale
    in_shape, out_shape, names = tuple(in_shape), tuple(out_shape), tuple(names)
    if mode not in ("w8a16", "w8a8"):
      raise ValueError(f"QuantLinear mode={mode!r}: choose 'w8a16' or 'w8a8'.")
    num_in = len(in_shape)
    self.kernel = nnx.Param(jnp.zeros(in_shape + out_shape, jnp.int8), out_sharding=names)
    # Scales stay float32 whatever param_dtype is: they are tiny and set the precision of every output.
    self.scale = nnx.Param(jnp.ones(out_shape, jnp.float32), out_sharding=names[num_in:])
    self.smooth = nnx.data(None)
    if mode == "w8a8":
      self.smooth = nnx.Param(jnp.ones(in_shape, jnp.float32), out_sharding=names[:num_in])
    # A bias (model.qkv_bias) stays float32 and is added after the int8 product.
    self.bias = nnx.data(None)
    if use_bias:
      self.bias = nnx.Param(jnp.zeros(out_shape, jnp.float32), out_sharding=names[num_in:])
    self.mode, self.num_in, self.dtype = mode, num_in, dtype

  def __call__(self, x: jax.Array, dot_general: layers.DotGeneral = jax.lax.dot_general) -> jax.Array:
    """Takes [..., *I] and returns [..., *O] in the dtype `dot_general` gives for compute-dtype inputs.

    (The output projection passes a float32-accumulating dot_general, so logits stay float32.)
    """
    kernel = self.kernel[...]
    contract_x = tuple(range(x.ndim - self.num_in, x.ndim))
    dims = ((contract_x, tuple(range(self.num_in))), ((), ()))
    bias = 0.0 if self.bias is None else self.bias[...]
    if self.mode == "w8a16":
      y = dot_general(x.astype(self.dtype), kernel.astype(self.dtype), dims)
      return (y * self.scale[...] + bias).astype(y.dtype)
    out_dtype = jax.eval_shape(functools.partial(dot_general, dimension_numbers=dims),
                               jax.ShapeDtypeStruct(x.shape, self.dtype),
                               jax.ShapeDtypeStruct(kernel.shape, self.dtype)).dtype
    x32 = x.astype(jnp.float32) / self.smooth[...]
    return (w8a8_matmul(x32, kernel, self.scale[...], self.num_in) + bias).astype(out_dtype)


class QuantEmbedding(nnx.Module):
  """`layers.Embedding` with an int8 table and one scale per vocabulary row.

  A row's scale serves both uses: dequantizing the looked-up embedding, and as the per-output-channel
  scale when `attend` uses the table as the tied output projection.
  """

  def __init__(self, vocab_size: int, dim: int, *, mode: str, dtype, param_dtype, rngs: nnx.Rngs):
    del param_dtype, rngs
    self.table = nnx.Param(jnp.zeros((vocab_size, dim), jnp.int8), out_sharding=("vocab", "embed"))
    self.scale = nnx.Param(jnp.ones((vocab_size,), jnp.float32), out_sharding=("vocab",))
    self.mode, self.dtype = mode, dtype

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    """Takes int tokens [B, L] and returns embeddings [B, L, D] in the compute dtype."""
    rows_BxLxD = jnp.take(self.table[...], tokens_BxL, axis=0).astype(jnp.float32)
    scales_BxL = jnp.take(self.scale[...], tokens_BxL, axis=0)
    return (rows_BxLxD * scales_BxL[..., None]).astype(self.dtype)

  def attend(self, x_BxLxD: jax.Array) -> jax.Array:
    """Takes hidden states [B, L, D] and returns float32 logits [B, L, V]."""
    # Contract with the [V, D] table as stored: a transposed view would be materialized per call.
    table_VxD = self.table[...]
    dims = (((2,), (1,)), ((), ()))
    if self.mode == "w8a8":
      x_q, x_scale_BxLx1 = quantize_symmetric(x_BxLxD, (2,))
      acc_BxLxV = jax.lax.dot_general(x_q, table_VxD, dims, preferred_element_type=jnp.int32)
      return acc_BxLxV.astype(jnp.float32) * x_scale_BxLx1 * self.scale[...]
    logits = jax.lax.dot_general(x_BxLxD.astype(self.dtype), table_VxD.astype(self.dtype), dims,
                                 preferred_element_type=jnp.float32)
    return logits * self.scale[...]


class ObservedLinear(layers.Linear):
  """A float `layers.Linear` that also records max |x| per input channel (for SmoothQuant)."""

  def __init__(self, in_shape, out_shape, names, **kwargs):
    super().__init__(in_shape, out_shape, names, **kwargs)
    self.input_range = InputRange(jnp.zeros(tuple(in_shape), jnp.float32),
                                  out_sharding=tuple(names)[:len(in_shape)])

  def __call__(self, x: jax.Array, dot_general: layers.DotGeneral = jax.lax.dot_general) -> jax.Array:
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=tuple(range(x.ndim - self.num_in)))
    self.input_range[...] = jnp.maximum(self.input_range[...], amax)
    return super().__call__(x, dot_general)


def dense(cfg: ModelConfig, name: str):
  """Returns the class (or partial) that builds dense layer `name` (one of lm.config.DENSE_LAYERS)."""
  if cfg.quant == "none" or name in cfg.quant_skip_layers:
    return layers.Linear
  if cfg.quant == "observe":
    return ObservedLinear
  return functools.partial(QuantLinear, mode=cfg.quant)


def embedding(cfg: ModelConfig):
  """Returns the class (or partial) that builds the token embedding."""
  if cfg.quant in ("w8a16", "w8a8") and cfg.quant_embedding:
    return functools.partial(QuantEmbedding, mode=cfg.quant)
  return layers.Embedding
