"""A Llama-style decoder: pre-norm blocks of grouped-query attention and a SwiGLU MLP, stacked with scan.

Shape suffixes: B batch, L query length, S key length (the KV cache), D d_model, N query heads,
G kv heads, K head_dim, F mlp_dim, V vocab.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lm import layers, quant
from lm.axes import constrain
from lm.config import ModelConfig

KVCache = dict[str, jax.Array]  # {"k": [layers, B, S, G, K], "v": [layers, B, S, G, K]}
RematWrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


class Attention(nnx.Module):
  """Causal grouped-query self-attention with rotary positions and an optional KV cache."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
    d, n, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.query = quant.dense(cfg, "attention.query")([d], [n, k], ("embed", "heads", "kv"), **kw)
    self.key = quant.dense(cfg, "attention.key")([d], [g, k], ("embed", "kv_heads", "kv"), **kw)
    self.value = quant.dense(cfg, "attention.value")([d], [g, k], ("embed", "kv_heads", "kv"), **kw)
    self.out = quant.dense(cfg, "attention.out")([n, k], [d], ("heads", "kv", "embed"),
                             init_scale=(2 * cfg.num_layers) ** -0.5, **kw)

  def __call__(self, x_BxLxD, sin, cos, mask_BxLxS=None, cache_kv=None, cache_index=None, layer=None):
    """Returns (y [B, L, D], the updated (k, v) caches of all layers, or None without a cache).

    With a cache, `cache_kv` is every layer's (k, v) [layers, B, S, G, K] and `layer` this block's index.
    """
    q_BxLxNxK = layers.apply_rotary(self.query(x_BxLxD), sin, cos)
    k_BxLxGxK = layers.apply_rotary(self.key(x_BxLxD), sin, cos)
    v_BxLxGxK = self.value(x_BxLxD)
    q_BxLxNxK = checkpoint_name(constrain(q_BxLxNxK, ("batch", "length", "heads", "kv")), "query")
    k_BxLxGxK = checkpoint_name(constrain(k_BxLxGxK, ("batch", "length", "kv_heads", "kv")), "key")
    v_BxLxGxK = checkpoint_name(constrain(v_BxLxGxK, ("batch", "length", "kv_heads", "kv")), "value")

    new_kv = None
    if cache_kv is None:
      out_BxLxNxK = jax.nn.dot_product_attention(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, is_causal=True)
    else:
      # ---- KV-cache write (issue 17) ----
      # The new entries go straight into the whole loop-carried cache buffer, so XLA updates it in
      # place; writing into a per-layer slice and re-stacking it copied the whole cache every token.
      k_all, v_all = cache_kv
      start = (layer, 0, cache_index, 0, 0)
      k_all = jax.lax.dynamic_update_slice(k_all, k_BxLxGxK[None].astype(k_all.dtype), start)
      v_all = jax.lax.dynamic_update_slice(v_all, v_BxLxGxK[None].astype(v_all.dtype), start)
      new_kv = (k_all, v_all)
      k_BxSxGxK = jax.lax.dynamic_index_in_dim(k_all, layer, keepdims=False)
      v_BxSxGxK = jax.lax.dynamic_index_in_dim(v_all, layer, keepdims=False)
      # ---- end KV-cache write ----
      out_BxLxNxK = jax.nn.dot_product_attention(
          q_BxLxNxK, k_BxSxGxK.astype(q_BxLxNxK.dtype), v_BxSxGxK.astype(q_BxLxNxK.dtype),
          mask=mask_BxLxS[:, None])
    out_BxLxNxK = checkpoint_name(constrain(out_BxLxNxK, ("batch", "length", "heads", "kv")),
                                  "attention")
    return self.out(out_BxLxNxK), new_kv


class Mlp(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
    self.gate = quant.dense(cfg, "mlp.gate")([cfg.d_model], [cfg.mlp_dim], ("embed", "mlp"), **kw)
    self.up = quant.dense(cfg, "mlp.up")([cfg.d_model], [cfg.mlp_dim], ("embed", "mlp"), **kw)
    self.down = quant.dense(cfg, "mlp.down")([cfg.mlp_dim], [cfg.d_model], ("mlp", "embed"),
                              init_scale=(2 * cfg.num_layers) ** -0.5, **kw)

  def __call__(self, x_BxLxD):
    """Takes [B, L, D] and returns [B, L, D]."""
    h_BxLxF = jax.nn.silu(self.gate(x_BxLxD)) * self.up(x_BxLxD)
    h_BxLxF = checkpoint_name(constrain(h_BxLxF, ("batch", "length", "mlp")), "mlp_hidden")
    return self.down(h_BxLxF)


class Block(nnx.Module):
  """One pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    norm_kw = dict(eps=cfg.norm_eps, param_dtype=cfg.storage_dtype, rngs=rngs)
    self.attention_norm = layers.RMSNorm(cfg.d_model, **norm_kw)
    self.attention = Attention(cfg, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, **norm_kw)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x_BxLxD, sin, cos, mask_BxLxS=None, cache_kv=None, cache_index=None, layer=None):
    """Returns (x [B, L, D], the updated KV caches of all layers or None)."""
    attn, new_kv = self.attention(self.attention_norm(x_BxLxD), sin, cos, mask_BxLxS, cache_kv,
                                  cache_index, layer)
    x_BxLxD = constrain(x_BxLxD + attn, ("batch", "length", "embed"))
    x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
    return constrain(x_BxLxD, ("batch", "length", "embed")), new_kv


class Transformer(nnx.Module):
  """Decoder-only language model; the layer stack is one `Block` with a leading `layers` axis.

  `remat_wrapper` (from `sharding.remat`) wraps the per-layer function to choose what the backward
  pass recomputes; None keeps every activation.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, remat_wrapper: RematWrapper | None = None):
    self.cfg = cfg
    self.remat_wrapper = remat_wrapper
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
    self.embed = quant.embedding(cfg)(cfg.vocab_size, cfg.d_model, **kw)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.storage_dtype,
                                     rngs=rngs)
    self.unembed = nnx.data(None if cfg.tie_embeddings else quant.dense(cfg, "unembed")(
        [cfg.d_model], [cfg.vocab_size], ("embed", "vocab"), **kw))

  def hidden_states(self, tokens_BxL, positions_BxL=None, cache=None, cache_index=None,
                    key_start_B=None):
    """Runs the decoder up to (and including) the final norm.

    Takes int tokens [B, L]; positions [B, L] default to `cache_index + arange(L)`. With `cache`
    (from `init_cache`), keys/values are written at cache columns `cache_index..cache_index+L-1` and
    each query attends to the columns from its row's `key_start_B` (default 0; a left-padded row's
    first real column) up to its own column. Returns (hidden [B, L, D], updated cache or None).
    """
    cfg = self.cfg
    batch, length = tokens_BxL.shape
    start = 0 if cache_index is None else cache_index
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
    sin, cos = layers.rotary_tables(positions_BxL, cfg.head_dim, cfg.rope_theta)
    x_BxLxD = constrain(self.embed(tokens_BxL), ("batch", "length", "embed"))

    if cache is not None:
      return self._cached_layers(x_BxLxD, sin, cos, cache, start, key_start_B)

    def layer(x, block):
      return block(x, sin, cos)[0]

    if self.remat_wrapper is not None:
      layer = self.remat_wrapper(layer)
    scan = nnx.scan(layer, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, unroll=cfg.scan_unroll)
    return self.final_norm(scan(x_BxLxD, self.blocks)), None

  def _cached_layers(self, x_BxLxD, sin, cos, cache, start, key_start_B):
    """The layer stack of `hidden_states` with a KV cache; returns (hidden [B, L, D], updated cache)."""
    cfg = self.cfg
    length = x_BxLxD.shape[1]
    # ---- cached decoding (issue 17) ----
    mask_BxLxS = cache_mask(cache["k"].shape[2], start, length, key_start_B)

    def cached_layer(carry, block, index):
      x, k_all, v_all = carry
      x, (k_all, v_all) = block(x, sin, cos, mask_BxLxS, (k_all, v_all), start, index)
      return x, k_all, v_all

    # The whole cache rides in the layer loop's carry (not its scanned inputs/outputs), so each
    # layer's write is an in-place update of one buffer.
    scan = nnx.scan(cached_layer, in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry,
                    unroll=cfg.scan_unroll)
    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    x_BxLxD, k_all, v_all = scan((x_BxLxD, cache["k"], cache["v"]), self.blocks, layer_ids)
    # ---- end cached decoding ----
    return self.final_norm(x_BxLxD), {"k": k_all, "v": v_all}

  def logits(self, hidden_BxLxD):
    """Projects hidden states [B, L, D] to float32 logits [B, L, V]."""
    if self.unembed is None:
      logits_BxLxV = self.embed.attend(hidden_BxLxD)
    else:
      f32_dot = lambda *a, **k: jax.lax.dot_general(*a, preferred_element_type=jnp.float32, **k)
      logits_BxLxV = self.unembed(hidden_BxLxD, dot_general=f32_dot)
    # Logits stay float32: a softmax over a large vocabulary in bf16 loses the small probabilities.
    return constrain(logits_BxLxV.astype(jnp.float32), ("batch", "length", "vocab"))

  def __call__(self, tokens_BxL, positions_BxL=None):
    """Takes int tokens [B, L] and returns float32 next-token logits [B, L, V]."""
    hidden, _ = self.hidden_states(tokens_BxL, positions_BxL)
    return self.logits(hidden)

  def decode(self, tokens_BxL, cache: KVCache, cache_index, positions_BxL=None, key_start_B=None):
    """Incremental decoding: takes tokens [B, L] written at cache columns cache_index..cache_index+L-1.

    Their positions default to the columns; left-padded rows pass their own `positions_BxL` and the
    first real column `key_start_B` (see `hidden_states`). Returns (logits [B, L, V] float32, the
    cache with these tokens' keys and values written in).
    """
    cache_len = cache["k"].shape[2]
    if isinstance(cache_index, int) and cache_index + tokens_BxL.shape[1] > cache_len:
      # (A traced index cannot be checked here; `lm.generate` checks lengths before tracing.)
      raise ValueError(f"decoding {tokens_BxL.shape[1]} tokens at position {cache_index} overruns the "
                       f"KV cache of length {cache_len}; allocate a longer cache with init_cache.")
    hidden, cache = self.hidden_states(tokens_BxL, positions_BxL, cache, cache_index, key_start_B)
    return self.logits(hidden), cache


def cache_mask(cache_len: int, start, length: int, key_start_B=None) -> jax.Array:
  """Which cache columns [S] each of `length` queries at columns start.. may attend to: bool [B|1, L, S].

  A query at column c sees columns key_start..c (key_start: a left-padded row's first real column,
  default 0), and always itself, so a padding query has one valid key instead of none.
  """
  columns_S = jnp.arange(cache_len, dtype=jnp.int32)
  query_columns_L = start + jnp.arange(length, dtype=jnp.int32)
  mask_BxLxS = columns_S[None, None, :] <= query_columns_L[None, :, None]
  if key_start_B is not None:
    mask_BxLxS &= ((columns_S[None, None, :] >= key_start_B[:, None, None])
                   | (columns_S[None, None, :] == query_columns_L[None, :, None]))
  return mask_BxLxS


def init_cache(cfg: ModelConfig, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
  """Returns a zero KV cache {"k", "v"}: each [num_layers, batch, max_len, num_kv_heads, head_dim]."""
  max_len = cfg.max_seq_len if max_len is None else max_len
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  dtype = dtype or cfg.compute_dtype
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
