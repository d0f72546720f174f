"""The building blocks of the decoder: RMSNorm, a general linear map, the embedding, rotary embeddings.

Every parameter carries logical axis names (`out_sharding`); none of this code knows about devices.
"""

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lm.axes import constrain

DotGeneral = Callable[..., jax.Array]


def _normal(std: float):
  return jax.nn.initializers.truncated_normal(stddev=std)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm with a learned per-channel scale; statistics in float32."""

  def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("embed",))

  def __call__(self, x_BxLxD: jax.Array, recompute: bool = False) -> jax.Array:
    """Takes [..., D] and returns [..., D] in x's dtype.

    `recompute`: the backward pass recomputes the float32 intermediates from x (elementwise work)
    instead of keeping two float32 copies of x per norm (what remat=none would otherwise store).
    """
    norm = functools.partial(rms_norm, eps=self.eps)
    if recompute:
      norm = jax.checkpoint(norm, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    return norm(x_BxLxD, self.scale[...])


def rms_norm(x_BxLxD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) * scale over the last dim, statistics in float32; returns x's dtype."""
  # Variance in float32: in bf16 the mean of squares loses most of its mantissa.
  x32 = x_BxLxD.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (normed * scale_D.astype(jnp.float32)).astype(x_BxLxD.dtype)


class Linear(nnx.Module):
  """y = x · W contracting x's last `len(in_shape)` dims with W's first ones.

  The kernel has shape `in_shape + out_shape` and logical names `names`. `dot_general` is the matmul
  used; quantized variants replace it without changing shapes or names. With `use_bias`, a bias of
  shape `out_shape` (named by the output dims, zeros at init) is added.
  """

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], names: Sequence[str], *,
               dtype, param_dtype, rngs: nnx.Rngs, init_scale: float = 1.0, use_bias: bool = False):
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if len(names) != len(in_shape) + len(out_shape):
      raise ValueError(f"Linear kernel {in_shape + out_shape} needs one logical name per dim, got {names}.")
    fan_in = 1
    for n in in_shape:
      fan_in *= n
    init = _normal(init_scale / fan_in ** 0.5)
    self.kernel = nnx.Param(init(rngs.params(), in_shape + out_shape, param_dtype),
                            out_sharding=tuple(names))
    self.bias = nnx.data(None)
    if use_bias:
      self.bias = nnx.Param(jnp.zeros(out_shape, param_dtype), out_sharding=tuple(names)[len(in_shape):])
    self.num_in = len(in_shape)
    self.dtype = dtype

  def __call__(self, x: jax.Array, dot_general: DotGeneral = jax.lax.dot_general) -> jax.Array:
    """Takes [..., *in_shape] and returns [..., *out_shape] in the compute dtype."""
    kernel = self.kernel[...].astype(self.dtype)
    x = x.astype(self.dtype)
    contract_x = tuple(range(x.ndim - self.num_in, x.ndim))
    contract_k = tuple(range(self.num_in))
    y = dot_general(x, kernel, ((contract_x, contract_k), ((), ())))
    return y if self.bias is None else y + self.bias[...].astype(y.dtype)


class Embedding(nnx.Module):
  """Token embedding table [vocab, embed]; `attend` reuses it as the tied output projection."""

  def __init__(self, vocab_size: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    init = _normal(dim ** -0.5)
    self.table = nnx.Param(init(rngs.params(), (vocab_size, dim), param_dtype),
                           out_sharding=("vocab", "embed"))
    self.dtype = dtype

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    """Takes int tokens [B, L] and returns embeddings [B, L, D] in the compute dtype."""
    # The lookup reads whole rows: under FSDP the table's `embed` dimension is gathered first (as
    # every FSDP weight is before use); a `vocab` split stays and becomes a masked lookup + reduce.
    table_VxD = constrain(self.table[...], ("vocab", None))
    return jnp.take(table_VxD, tokens_BxL, axis=0).astype(self.dtype)

  def attend(self, x_BxLxD: jax.Array) -> jax.Array:
    """Takes hidden states [B, L, D] and returns logits [B, L, V] (float32 accumulation)."""
    table = self.table[...].astype(self.dtype)
    return jnp.einsum("bld,vd->blv", x_BxLxD.astype(self.dtype), table,
                      preferred_element_type=jnp.float32)


def rope_inv_freq(head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_len: int = 8192) -> jax.Array:
  """The rotary inverse frequencies [head_dim // 2] float32, rescaled as Hugging Face's rope types do.

  none: theta^(-2i/K). linear: all divided by `factor` (positions interpolated). llama3 (Llama 3.1+):
  wavelengths 2π/f longer than original_max_len / low_freq_factor are divided by `factor`, shorter
  than original_max_len / high_freq_factor kept, and those between interpolated smoothly.
  """
  inv_freq = theta ** -(jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if scaling == "linear":
    return inv_freq / factor
  if scaling == "llama3":
    wavelen = 2 * jnp.pi / inv_freq
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = jnp.where(wavelen > original_max_len / low_freq_factor, inv_freq / factor, inv_freq)
    medium = (wavelen >= original_max_len / high_freq_factor) & (wavelen <= original_max_len / low_freq_factor)
    return jnp.where(medium, smoothed, scaled)
  if scaling != "none":
    raise ValueError(f"model.rope_scaling={scaling!r}: choose none, linear or llama3.")
  return inv_freq


def rotary_tables(positions_BxL: jax.Array, head_dim: int, theta: float,
                  **scaling) -> tuple[jax.Array, jax.Array]:
  """Returns (sin, cos), each [B, L, head_dim // 2] float32, for integer positions [B, L].

  `scaling`: the rope scaling arguments of `rope_inv_freq` (ModelConfig.rope_scaling_kwargs).
  """
  inv_freq = rope_inv_freq(head_dim, theta, **scaling)
  angles = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
  return jnp.sin(angles), jnp.cos(angles)


def apply_rotary(x_BxLxHxK: jax.Array, sin_BxLxK2: jax.Array, cos_BxLxK2: jax.Array) -> jax.Array:
  """Rotates [B, L, H, K] by position, pairing dim i with dim i + K/2 (the Llama/Hugging Face layout).

  The tables are [B, L, K/2] or already [B, L, 1, K/2] (the decoder expands them once, outside its
  layer scan, so the backward pass does not keep one expanded copy per layer).
  """
  half = x_BxLxHxK.shape[-1] // 2
  x32 = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  sin, cos = sin_BxLxK2, cos_BxLxK2
  if sin.ndim == 3:
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxLxHxK.dtype)
