"""The KV cache's storage: keys and values in the compute dtype, or int8 with a scale per (token, kv head).

`model.kv_cache_dtype` picks the format. A cache is a dict of arrays with leading dims
[layers, B, S, G] (S cache columns, G kv heads, K head_dim):
  compute: "k", "v"  [layers, B, S, G, K] in the compute dtype
  int8:    "k", "v"  [layers, B, S, G, K] int8, and "k_scale", "v_scale" [layers, B, S, G, 1] float32
An int8 entry is quantized when it is written, symmetrically over head_dim with
scale = max |x| / 127 (`lm.quant.quantize_symmetric`), so each dequantized element is within
scale / 2 of the value written. A decode step reads its layer's int8 slice converted (exactly) to the
compute dtype and applies the scales inside attention, to the scores and the probabilities
(`read_unscaled`, `lm.attention.xla_attention`), so no scaled copy of the keys and values is
made. The scales are float32: one per K values, they cost 4 / K bytes per value (6% at K = 64) and add no
error of their own. A prefill attends within the prompt on the unquantized keys and values; only
the later decode steps read them back from the cache.

The serving layout (lm/serving.py) keeps one such dict per layer with `layers` = 1.
"""

import jax
import jax.numpy as jnp

from lm import quant
from lm.config import ModelConfig

KVCache = dict[str, jax.Array]
_SCALE_BYTES = 4  # float32


def empty(cfg: ModelConfig, layers: int, batch: int, max_len: int) -> KVCache:
  """A zero cache of `cfg.kv_cache_dtype` for `layers` layers, `batch` rows and `max_len` columns."""
  shape = (layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  if cfg.kv_cache_dtype == "compute":
    return {"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype)}
  scale_shape = shape[:-1] + (1,)
  # A zero scale dequantizes the unwritten (masked) columns to exact zeros, as the float cache has.
  return {"k": jnp.zeros(shape, jnp.int8), "v": jnp.zeros(shape, jnp.int8),
          "k_scale": jnp.zeros(scale_shape, jnp.float32), "v_scale": jnp.zeros(scale_shape, jnp.float32)}


def write(cache: KVCache, layer, column, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array) -> KVCache:
  """Writes L new keys and values of layer `layer` at cache columns column..column+L-1; returns the cache.

  `dynamic_update_slice` into the whole buffer, which XLA updates in place when the cache is
  loop-carried (a per-layer slice written and re-stacked would copy the whole cache every token).
  """
  start = (layer, 0, column, 0, 0)
  put = lambda buffer, new: jax.lax.dynamic_update_slice(buffer, new[None].astype(buffer.dtype), start)
  if "k_scale" not in cache:
    return {"k": put(cache["k"], k_BxLxGxK), "v": put(cache["v"], v_BxLxGxK)}
  k_q, k_scale = quant.quantize_symmetric(k_BxLxGxK, (3,))
  v_q, v_scale = quant.quantize_symmetric(v_BxLxGxK, (3,))
  return {"k": put(cache["k"], k_q), "v": put(cache["v"], v_q),
          "k_scale": put(cache["k_scale"], k_scale), "v_scale": put(cache["v_scale"], v_scale)}


def read(cache: KVCache, layer, dtype) -> tuple[jax.Array, jax.Array]:
  """Layer `layer`'s keys and values, each [B, S, G, K] in `dtype` (int8 entries dequantized)."""
  if "k_scale" not in cache:
    return read_unscaled(cache, layer, dtype)[:2]
  # float32 product, then one rounding to `dtype`: a bf16 scale alone would add 2^-9 relative error.
  k, v, k_scale, v_scale = read_unscaled(cache, layer, jnp.float32)
  return (k * k_scale).astype(dtype), (v * v_scale).astype(dtype)


def read_unscaled(cache: KVCache, layer, dtype):
  """Layer `layer`'s (keys, values, key scales, value scales) for attention that scales them itself.

  Keys and values are [B, S, G, K] in `dtype` (an int8 entry converted as is: every int8 value is
  exact in bf16 and float32); the scales are float32 [B, S, G, 1], or None for a compute-dtype
  cache. key = keys x key scales (likewise values), as `read` returns them.
  """
  take = lambda name: jax.lax.dynamic_index_in_dim(cache[name], layer, keepdims=False)
  if "k_scale" not in cache:
    return take("k").astype(dtype), take("v").astype(dtype), None, None
  return take("k").astype(dtype), take("v").astype(dtype), take("k_scale"), take("v_scale")


def bytes_per_column(cfg: ModelConfig) -> int:
  """Bytes one cache column holds per layer and row: keys and values of every kv head (and scales)."""
  if cfg.kv_cache_dtype == "compute":
    per_head = cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize
  else:
    per_head = cfg.head_dim + _SCALE_BYTES
  return 2 * cfg.num_kv_heads * per_head
