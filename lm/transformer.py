"""A Llama-style decoder: pre-norm blocks of grouped-query attention and a SwiGLU MLP, stacked with scan.

Shape suffixes: B batch, L query length, S key length (the KV cache), D d_model, N query heads,
G kv heads, K head_dim, F mlp_dim, V vocab.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lm import attention as attention_lib
from lm import layers, quant
from lm.axes import constrain
from lm.config import ModelConfig

KVCache = dict[str, jax.Array]  # {"k": [layers, B, S, G, K], "v": [layers, B, S, G, K]}
RematWrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


class Attention(nnx.Module):
  """Causal grouped-query self-attention with rotary positions and an optional KV cache."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
    d, n, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.query = quant.dense(cfg, "attention.query")([d], [n, k], ("embed", "heads", "kv"), **kw)
    self.key = quant.dense(cfg, "attention.key")([d], [g, k], ("embed", "kv_heads", "kv"), **kw)
    self.value = quant.dense(cfg, "attention.value")([d], [g, k], ("embed", "kv_heads", "kv"), **kw)
    self.out = quant.dense(cfg, "attention.out")([n, k], [d], ("heads", "kv", "embed"),
                             init_scale=(2 * cfg.num_layers) ** -0.5, **kw)

  def __call__(self, x_BxLxD, sin, cos, segment_ids_BxL=None, mask_BxLxS=None, cache_kv=None,
               cache_index=None):
    """Returns (y [B, L, D], updated (k, v) cache slices of this layer or None).

    Without a cache, or when prefilling an empty one (`cache_index` the int 0), attention runs
    through the implementation `lm.attention.select` picks for this length; a decode step reads
    the cache through XLA with `mask_BxLxS`.
    """
    q_BxLxNxK = layers.apply_rotary(self.query(x_BxLxD), sin, cos)
    k_BxLxGxK = layers.apply_rotary(self.key(x_BxLxD), sin, cos)
    v_BxLxGxK = self.value(x_BxLxD)
    q_BxLxNxK = checkpoint_name(constrain(q_BxLxNxK, ("batch", "length", "heads", "kv")), "query")
    k_BxLxGxK = checkpoint_name(constrain(k_BxLxGxK, ("batch", "length", "kv_heads", "kv")), "key")
    v_BxLxGxK = checkpoint_name(constrain(v_BxLxGxK, ("batch", "length", "kv_heads", "kv")), "value")

    new_kv = None
    if cache_kv is not None:
      k_cache, v_cache = cache_kv
      start = (0, cache_index, 0, 0)
      k_BxSxGxK = jax.lax.dynamic_update_slice(k_cache, k_BxLxGxK.astype(k_cache.dtype), start)
      v_BxSxGxK = jax.lax.dynamic_update_slice(v_cache, v_BxLxGxK.astype(v_cache.dtype), start)
      new_kv = (k_BxSxGxK, v_BxSxGxK)
    prefill = isinstance(cache_index, int) and cache_index == 0
    if cache_kv is None or prefill:
      cfg = self.cfg
      choice = attention_lib.select_for(cfg.attention, cfg.dtype, cfg.head_dim, x_BxLxD.shape[1],
                                        segments=segment_ids_BxL is not None)
      out_BxLxNxK = attention_lib.attend(choice.implementation, q_BxLxNxK, k_BxLxGxK, v_BxLxGxK,
                                         segment_ids_BxL, recompute=cfg.remat == "none")
    else:
      out_BxLxNxK = attention_lib.xla_attention(
          q_BxLxNxK, k_BxSxGxK.astype(q_BxLxNxK.dtype), v_BxSxGxK.astype(q_BxLxNxK.dtype), mask_BxLxS)
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

  def __call__(self, x_BxLxD, recompute: bool = False):
    """Takes [B, L, D] and returns [B, L, D].

    `recompute`: the backward pass recomputes silu(gate) * up from gate and up (elementwise) instead
    of keeping it and silu's intermediates: two [B, L, F] tensors stay between passes, not five.
    """
    def gated_down(gate_BxLxF, up_BxLxF):
      h_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
      h_BxLxF = checkpoint_name(constrain(h_BxLxF, ("batch", "length", "mlp")), "mlp_hidden")
      return self.down(h_BxLxF)

    if recompute:
      gated_down = jax.checkpoint(gated_down, policy=jax.checkpoint_policies.nothing_saveable,
                                  prevent_cse=False)
    return gated_down(self.gate(x_BxLxD), self.up(x_BxLxD))


class Block(nnx.Module):
  """One pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    # remat=none keeps every activation the backward pass needs; `lean` trims that to what is
    # expensive to recompute (matmul outputs), recomputing norms, SwiGLU and attention scores.
    self.lean = cfg.remat == "none"
    # Quantized layers may record input ranges (nnx state), which cannot change inside a
    # jax.checkpoint; they only run forward, where recomputation saves nothing anyway.
    self.lean_mlp = self.lean and cfg.quant == "none"
    norm_kw = dict(eps=cfg.norm_eps, param_dtype=cfg.storage_dtype, rngs=rngs)
    self.attention_norm = layers.RMSNorm(cfg.d_model, **norm_kw)
    self.attention = Attention(cfg, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, **norm_kw)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x_BxLxD, sin, cos, segment_ids_BxL=None, mask_BxLxS=None, cache_kv=None,
               cache_index=None):
    """Returns (x [B, L, D], this layer's updated KV cache or None)."""
    attn, new_kv = self.attention(self.attention_norm(x_BxLxD, self.lean), sin, cos, segment_ids_BxL,
                                  mask_BxLxS, cache_kv, cache_index)
    x_BxLxD = constrain(x_BxLxD + attn, ("batch", "length", "embed"))
    x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD, self.lean), self.lean_mlp)
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
                    segment_ids_BxL=None):
    """Runs the decoder up to (and including) the final norm.

    Takes int tokens [B, L]; positions [B, L] default to `cache_index + arange(L)`, or with
    `segment_ids_BxL` (int [B, L], the document index of each token within its packed row) to the
    offset within each document: positions restart at 0 where a document starts, and no token
    attends to another document. With `cache` (from `init_cache`), keys/values are written at
    `cache_index` and attention reads the cache (no segments there). Returns (hidden [B, L, D],
    updated cache or None).
    """
    cfg = self.cfg
    batch, length = tokens_BxL.shape
    start = 0 if cache_index is None else cache_index
    if positions_BxL is None and segment_ids_BxL is not None:
      positions_BxL = positions_in_documents(segment_ids_BxL)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
    sin, cos = layers.rotary_tables(positions_BxL, cfg.head_dim, cfg.rope_theta)
    # Expanded once here, outside the layer scan: autodiff then keeps one copy, not one per layer.
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    x_BxLxD = constrain(self.embed(tokens_BxL), ("batch", "length", "embed"))

    mask_BxLxS = None
    if cache is not None:
      cache_len = cache["k"].shape[2]
      key_positions_S = jnp.arange(cache_len, dtype=jnp.int32)
      mask_BxLxS = key_positions_S[None, None, :] <= positions_BxL[:, :, None]

    def layer(x, block, kv):
      return block(x, sin, cos, segment_ids_BxL, mask_BxLxS, kv, cache_index)

    if self.remat_wrapper is not None:
      layer = self.remat_wrapper(layer)
    kv_in = None if cache is None else (cache["k"], cache["v"])
    scan = nnx.scan(layer, in_axes=(nnx.Carry, 0, 0 if cache is not None else None),
                    out_axes=(nnx.Carry, 0), unroll=cfg.scan_unroll)
    x_BxLxD, kv_out = scan(x_BxLxD, self.blocks, kv_in)
    new_cache = None if cache is None else {"k": kv_out[0], "v": kv_out[1]}
    return self.final_norm(x_BxLxD), new_cache

  def logits(self, hidden_BxLxD):
    """Projects hidden states [B, L, D] to float32 logits [B, L, V]."""
    if self.unembed is None:
      logits_BxLxV = self.embed.attend(hidden_BxLxD)
    else:
      f32_dot = lambda *a, **k: jax.lax.dot_general(*a, preferred_element_type=jnp.float32, **k)
      logits_BxLxV = self.unembed(hidden_BxLxD, dot_general=f32_dot)
    # Logits stay float32: a softmax over a large vocabulary in bf16 loses the small probabilities.
    return constrain(logits_BxLxV.astype(jnp.float32), ("batch", "length", "vocab"))

  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None):
    """Takes int tokens [B, L] (and optional segment ids [B, L]); returns float32 logits [B, L, V]."""
    hidden, _ = self.hidden_states(tokens_BxL, positions_BxL, segment_ids_BxL=segment_ids_BxL)
    return self.logits(hidden)

  def decode(self, tokens_BxL, cache: KVCache, cache_index):
    """Incremental decoding: takes tokens [B, L] that sit at positions cache_index..cache_index+L-1.

    Returns (logits [B, L, V] float32, the cache with these tokens' keys and values written in).
    """
    cache_len = cache["k"].shape[2]
    if isinstance(cache_index, int) and cache_index + tokens_BxL.shape[1] > cache_len:
      # (A traced index cannot be checked here; `lm.generate` checks lengths before tracing.)
      raise ValueError(f"decoding {tokens_BxL.shape[1]} tokens at position {cache_index} overruns the "
                       f"KV cache of length {cache_len}; allocate a longer cache with init_cache.")
    hidden, cache = self.hidden_states(tokens_BxL, cache=cache, cache_index=cache_index)
    return self.logits(hidden), cache


def positions_in_documents(segment_ids_BxL: jax.Array) -> jax.Array:
  """int32 [B, L]: each token's offset from the first token of its segment (run of equal ids)."""
  length = segment_ids_BxL.shape[1]
  index_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids_BxL.shape)
  starts_BxL = jnp.concatenate([jnp.ones_like(segment_ids_BxL[:, :1], dtype=bool),
                                segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
  first_BxL = jax.lax.cummax(jnp.where(starts_BxL, index_BxL, 0), axis=1)
  return index_BxL - first_BxL


def init_cache(cfg: ModelConfig, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
  """Returns a zero KV cache {"k", "v"}: each [num_layers, batch, max_len, num_kv_heads, head_dim]."""
  max_len = cfg.max_seq_len if max_len is None else max_len
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  dtype = dtype or cfg.compute_dtype
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
