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
from lm import kv_cache, layers, quant
from lm.attention_plan import AttentionPlan
from lm.axes import constrain, sequence_attention
from lm.config import ModelConfig

KVCache = kv_cache.KVCache  # {"k", "v": [layers, B, S, G, K]} (+ int8 scales: lm/kv_cache.py)
RematWrapper = Callable[[Callable[..., Any]], Callable[..., Any]]
# Runs the stacked blocks in another way than one scan (a pipeline, sharding/pipeline.py):
# layer_stack(layer_fn, blocks, x_BxLxD, row_inputs, constrain) -> x_BxLxD, where
# layer_fn(x, block, *rows) applies one layer and row_inputs are per-row arrays [B, ...] it reads.
LayerStack = Callable[..., jax.Array]
SHAPES_ONLY = ("this model was built without an attention plan (shapes only): build it from a run plan "
               "(launch.run.plan.make_plan / launch.run.programs) or pass "
               "attention=lm.attention_plan.unplanned(...) in a test")


class Attention(nnx.Module):
  """Causal grouped-query self-attention with rotary positions and an optional KV cache; `kernels`
  None builds it for its shapes only (running it raises ValueError)."""

  def __init__(self, cfg: ModelConfig, kernels: AttentionPlan | None, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.kernels = kernels
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
    d, n, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = dict(kw, use_bias=cfg.qkv_bias)  # Qwen2's q/k/v biases (issue 14)
    self.query = quant.dense(cfg, "attention.query")([d], [n, k], ("embed", "heads", "kv"), **qkv)
    self.key = quant.dense(cfg, "attention.key")([d], [g, k], ("embed", "kv_heads", "kv"), **qkv)
    self.value = quant.dense(cfg, "attention.value")([d], [g, k], ("embed", "kv_heads", "kv"), **qkv)
    self.out = quant.dense(cfg, "attention.out")([n, k], [d], ("heads", "kv", "embed"),
                             init_scale=(2 * cfg.num_layers) ** -0.5, **kw)

  def __call__(self, x_BxLxD, sin, cos, segment_ids_BxL=None, mask_BxLxS=None, cache_kv=None,
               cache_index=None, layer=None, positions_BxL=None):
    """Returns (y [B, L, D], the updated cache of all layers, or None without a cache).

    With a cache, `cache_kv` is every layer's cache (a `KVCache`, lm/kv_cache.py) and `layer` this
    block's index. Without a cache, or when prefilling an empty one (`cache_index` the int 0),
    attention runs through the kernel the model's attention plan names for that place and length
    (`self.kernels`, made by `lm.attention_plan.plan_attention`; segment ids keep documents, or a
    left-padded row's padding, apart); a decode step reads the cache through XLA with
    `mask_BxLxS`. When the plan splits the sequence over devices (`self.kernels.ring_block`),
    full-sequence attention runs across the shards through the function the program installed
    (`lm.axes.sequence_attention`: only how to reach the mesh), with this plan's strategy, block
    kernel and layout, masking by each token's `positions_BxL`. Raises ValueError when the model
    was built without an attention plan (shapes only).
    """
    if self.kernels is None:
      raise ValueError(SHAPES_ONLY)
    q_BxLxNxK = layers.apply_rotary(self.query(x_BxLxD), sin, cos)
    k_BxLxGxK = layers.apply_rotary(self.key(x_BxLxD), sin, cos)
    v_BxLxGxK = self.value(x_BxLxD)
    q_BxLxNxK = checkpoint_name(constrain(q_BxLxNxK, ("batch", "length", "heads", "kv")), "query")
    k_BxLxGxK = checkpoint_name(constrain(k_BxLxGxK, ("batch", "length", "kv_heads", "kv")), "key")
    v_BxLxGxK = checkpoint_name(constrain(v_BxLxGxK, ("batch", "length", "kv_heads", "kv")), "value")

    new_kv = None
    if cache_kv is not None:
      # ---- KV-cache write (issue 17) ----
      # The new entries go straight into the whole loop-carried cache buffers (in place), quantized
      # there for an int8 cache, whose scales attention applies to its scores and probabilities.
      new_kv = kv_cache.write(cache_kv, layer, cache_index, k_BxLxGxK, v_BxLxGxK)
      k_BxSxGxK, v_BxSxGxK, k_scale, v_scale = kv_cache.read_unscaled(new_kv, layer, q_BxLxNxK.dtype)
      # ---- end KV-cache write ----
    prefill = isinstance(cache_index, int) and cache_index == 0
    kernels = self.kernels
    if kernels.ring_block is not None and cache_kv is None:
      # The plan split the sequence over devices: the program installs how to cross the mesh
      # (lm.axes.sequence_attention); the strategy, block kernel and layout are this model's own.
      across_shards = sequence_attention()
      if across_shards is None:
        raise ValueError(
            f"this model's attention plan splits each sequence over {kernels.ring_shards} devices "
            f"({kernels.ring_strategy}, {kernels.ring_layout} order), but the program calling it installs "
            "no attention across sequence shards; build the program from the run plan "
            "(launch.run.programs).")
      out_BxLxNxK = across_shards(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, positions_BxL, segment_ids_BxL,
                                  strategy=kernels.ring_strategy, block_kernel=kernels.ring_block.implementation,
                                  layout=kernels.ring_layout, interpret=kernels.interpret,
                                  recompute=self.cfg.remat == "none")
    elif cache_kv is None or prefill:
      place = self.kernels.full if cache_kv is None else self.kernels.prefill
      out_BxLxNxK = attention_lib.attend(place.for_length(x_BxLxD.shape[1]), q_BxLxNxK, k_BxLxGxK,
                                         v_BxLxGxK, segment_ids_BxL, recompute=self.cfg.remat == "none",
                                         interpret=self.kernels.interpret)
    else:
      out_BxLxNxK = attention_lib.xla_attention(q_BxLxNxK, k_BxSxGxK, v_BxSxGxK, mask_BxLxS,
                                                k_scale_BxSxGx1=k_scale, v_scale_BxSxGx1=v_scale)
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

  def __init__(self, cfg: ModelConfig, kernels: AttentionPlan | None, *, rngs: nnx.Rngs):
    # remat=none keeps every activation the backward pass needs; `lean` trims that to what is
    # expensive to recompute (matmul outputs), recomputing norms, SwiGLU and attention scores.
    self.lean = cfg.remat == "none"
    # Quantized layers may record input ranges (nnx state), which cannot change inside a
    # jax.checkpoint; they only run forward, where recomputation saves nothing anyway.
    self.lean_mlp = self.lean and cfg.quant == "none"
    norm_kw = dict(eps=cfg.norm_eps, param_dtype=cfg.storage_dtype, rngs=rngs)
    self.attention_norm = layers.RMSNorm(cfg.d_model, **norm_kw)
    self.attention = Attention(cfg, kernels, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, **norm_kw)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x_BxLxD, sin, cos, segment_ids_BxL=None, mask_BxLxS=None, cache_kv=None,
               cache_index=None, layer=None, positions_BxL=None):
    """Returns (x [B, L, D], the updated KV caches of all layers or None)."""
    attn, new_kv = self.attention(self.attention_norm(x_BxLxD, self.lean), sin, cos, segment_ids_BxL,
                                  mask_BxLxS, cache_kv, cache_index, layer, positions_BxL)
    x_BxLxD = constrain(x_BxLxD + attn, ("batch", "length", "embed"))
    x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD, self.lean), self.lean_mlp)
    return constrain(x_BxLxD, ("batch", "length", "embed")), new_kv


class Transformer(nnx.Module):
  """Decoder-only language model; the layer stack is one `Block` with a leading `layers` axis, or
  with `per_layer` (the serving layout) one `Block` per layer.

  `remat_wrapper` (from `sharding.remat`) wraps the per-layer function to choose what the backward
  pass recomputes; None keeps every activation. `layer_stack` (from `sharding.pipeline`) runs the
  layers of a full forward pass (training, evaluation) instead of one scan; the KV-cache path
  always scans. `attention` is the run plan's attention plan (`lm.attention_plan.plan_attention`: the
  kernel for each place); without one the model is for its shapes only (parameters, logical names, a
  graphdef to restore into), and running its attention raises ValueError.
  None of these changes the parameters' values.

  `per_layer` lays the weights out for serving: `layers` holds one Block per layer instead of
  `blocks` stacked along `layers`, and the decoder runs them in a Python loop with one KV cache array
  per layer. A decode step then reads each layer's weights and cache directly, where the stacked
  layout copies each layer's slice out of the stack first (`lm.serving.serving_params` converts; the
  same logical names place them, minus `layers`).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, remat_wrapper: RematWrapper | None = None,
               layer_stack: LayerStack | None = None,
               attention: AttentionPlan | None = None, per_layer: bool = False):
    self.cfg = cfg
    self.remat_wrapper = remat_wrapper
    self.layer_stack = layer_stack
    self.per_layer = per_layer
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
    self.embed = quant.embedding(cfg)(cfg.vocab_size, cfg.d_model, **kw)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(cfg, attention, rngs=rngs)

    if per_layer:
      self.layers = nnx.List([Block(cfg, attention, rngs=rngs) for _ in range(cfg.num_layers)])
    else:
      self.blocks = make_blocks(rngs)
    self.final_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.storage_dtype,
                                     rngs=rngs)
    self.unembed = nnx.data(None if cfg.tie_embeddings else quant.dense(cfg, "unembed")(
        [cfg.d_model], [cfg.vocab_size], ("embed", "vocab"), **kw))

  def hidden_states(self, tokens_BxL, positions_BxL=None, cache=None, cache_index=None,
                    segment_ids_BxL=None, key_start_B=None):
    """Runs the decoder up to (and including) the final norm.

    Takes int tokens [B, L]; positions [B, L] default to `cache_index + arange(L)`, or with
    `segment_ids_BxL` (int [B, L], the document index of each token within its packed row) to the
    offset within each document: positions restart at 0 where a document starts, and no token
    attends to another document. With `cache` (from `init_cache`), keys/values are written at cache
    columns `cache_index..cache_index+L-1` and each query attends to the columns from its row's
    `key_start_B` (default 0; a left-padded row's first real column) up to its own column. Returns
    (hidden [B, L, D], updated cache or None).
    """
    cfg = self.cfg
    batch, length = tokens_BxL.shape
    start = 0 if cache_index is None else cache_index
    if positions_BxL is None and segment_ids_BxL is not None:
      positions_BxL = positions_in_documents(segment_ids_BxL)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
    sin, cos = rotary_inputs(cfg, positions_BxL)
    x_BxLxD = constrain(self.embed(tokens_BxL), ("batch", "length", "embed"))

    if cache is not None:
      return self._cached_layers(x_BxLxD, sin, cos, cache, start, key_start_B)

    def layer(x, block):
      return block(x, sin, cos, segment_ids_BxL, positions_BxL=positions_BxL)[0]

    if self.per_layer:
      for block in self.layers:
        x_BxLxD = layer(x_BxLxD, block)
      return self.final_norm(x_BxLxD), None

    if self.layer_stack is not None and cache is None:
      # The pipeline carries each row's rotary tables (and segment ids) with its micro-batch.
      rows = (sin, cos) if segment_ids_BxL is None else (sin, cos, segment_ids_BxL)
      def stage_layer(x, block, *row_inputs):
        return block(x, *row_inputs)[0]
      if self.remat_wrapper is not None:
        stage_layer = self.remat_wrapper(stage_layer)
      x_BxLxD = self.layer_stack(stage_layer, self.blocks, x_BxLxD, rows, constrain)
      return self.final_norm(x_BxLxD), None

    if self.remat_wrapper is not None:
      layer = self.remat_wrapper(layer)
    scan = nnx.scan(layer, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, unroll=cfg.scan_unroll)
    return self.final_norm(scan(x_BxLxD, self.blocks)), None

  def _cached_layers(self, x_BxLxD, sin, cos, cache, start, key_start_B):
    """The layer stack of `hidden_states` with a KV cache; returns (hidden [B, L, D], updated cache)."""
    cfg = self.cfg
    length = x_BxLxD.shape[1]
    # ---- cached decoding (issue 17) ----
    mask_BxLxS = cache_mask(cache_length(cache), start, length, key_start_B)
    # A prefill attends within the prompt through the selected kernel: segment ids keep a left-padded
    # row's padding (segment 0) away from its real tokens (segment 1).
    segments_BxL = padding_segments(start, length, key_start_B)

    if self.per_layer:  # one cache array per layer, each with a leading layers axis of 1
      new_cache = {name: list(arrays) for name, arrays in cache.items()}
      for i, block in enumerate(self.layers):
        x_BxLxD, layer_cache = block(x_BxLxD, sin, cos, segments_BxL, mask_BxLxS,
                                     {name: arrays[i] for name, arrays in cache.items()}, start, 0)
        for name, array in layer_cache.items():
          new_cache[name][i] = array
      return self.final_norm(x_BxLxD), new_cache

    def cached_layer(carry, block, index):
      x, cache = carry
      return block(x, sin, cos, segments_BxL, mask_BxLxS, cache, start, index)

    # The whole cache rides in the layer loop's carry (not its scanned inputs/outputs), so each
    # layer's write is an in-place update of one buffer.
    scan = nnx.scan(cached_layer, in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry,
                    unroll=cfg.scan_unroll)
    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    x_BxLxD, cache = scan((x_BxLxD, cache), self.blocks, layer_ids)
    # ---- end cached decoding ----
    return self.final_norm(x_BxLxD), cache

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

  def decode(self, tokens_BxL, cache: KVCache, cache_index, positions_BxL=None, key_start_B=None,
             last_only: bool = False):
    """Incremental decoding: takes tokens [B, L] written at cache columns cache_index..cache_index+L-1.

    Their positions default to the columns; left-padded rows pass their own `positions_BxL` and the
    first real column `key_start_B` (see `hidden_states`). Returns (logits [B, L, V] float32, the
    cache with these tokens' keys and values written in); with `last_only`, logits [B, 1, V] of the
    last column only (what a prefill needs: XLA does not narrow [B, L, V] logits that are sliced).
    """
    cache_len = cache_length(cache)
    if isinstance(cache_index, int) and cache_index + tokens_BxL.shape[1] > cache_len:
      # (A traced index cannot be checked here; `lm.generate` checks lengths before tracing.)
      raise ValueError(f"decoding {tokens_BxL.shape[1]} tokens at position {cache_index} overruns the "
                       f"KV cache of length {cache_len}; allocate a longer cache with init_cache.")
    hidden, cache = self.hidden_states(tokens_BxL, positions_BxL, cache=cache, cache_index=cache_index,
                                       key_start_B=key_start_B)
    return self.logits(hidden[:, -1:] if last_only else hidden), cache

  def init_cache(self, batch: int, max_len: int | None = None) -> KVCache:
    """A zero KV cache for this model's layout (`init_cache`)."""
    return init_cache(self.cfg, batch, max_len, per_layer=self.per_layer)


def positions_in_documents(segment_ids_BxL: jax.Array) -> jax.Array:
  """int32 [B, L]: each token's offset from the first token of its segment (run of equal ids)."""
  length = segment_ids_BxL.shape[1]
  index_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids_BxL.shape)
  starts_BxL = jnp.concatenate([jnp.ones_like(segment_ids_BxL[:, :1], dtype=bool),
                                segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
  first_BxL = jax.lax.cummax(jnp.where(starts_BxL, index_BxL, 0), axis=1)
  return index_BxL - first_BxL


def rotary_inputs(cfg: ModelConfig, positions_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sin, cos), each float32 [B, L, 1, head_dim // 2], as every block reads them (rope scaling applied).

  Expanded once, outside the layer loop: the backward pass then keeps one copy, not one per layer.
  """
  sin, cos = layers.rotary_tables(positions_BxL, cfg.head_dim, cfg.rope_theta, **cfg.rope_scaling_kwargs)
  return sin[:, :, None, :], cos[:, :, None, :]


def padding_segments(start, length: int, key_start_B=None) -> jax.Array | None:
  """Segment ids [B, L] for `length` queries at cache columns start..: 0 on a left-padded row's
  padding (columns before `key_start_B`), 1 on its tokens; None without `key_start_B`."""
  if key_start_B is None:
    return None
  columns_L = start + jnp.arange(length, dtype=jnp.int32)
  return (columns_L[None, :] >= key_start_B[:, None]).astype(jnp.int32)


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


def init_cache(cfg: ModelConfig, batch: int, max_len: int | None = None, per_layer: bool = False) -> KVCache:
  """Returns a zero KV cache {"k", "v"}: each [num_layers, batch, max_len, num_kv_heads, head_dim],
  in the compute dtype, or int8 with scales for model.kv_cache_dtype = int8 (lm/kv_cache.py). With
  `per_layer` (the serving layout) each entry is a list of one [1, batch, max_len, ...] array per layer."""
  max_len = cfg.max_seq_len if max_len is None else max_len
  if not per_layer:
    return kv_cache.empty(cfg, cfg.num_layers, batch, max_len)
  layers = [kv_cache.empty(cfg, 1, batch, max_len) for _ in range(cfg.num_layers)]
  return {name: [layer[name] for layer in layers] for name in layers[0]}


def cache_length(cache: KVCache) -> int:
  """The number of columns of a KV cache (either layout)."""
  k = cache["k"]
  return (k[0] if isinstance(k, (list, tuple)) else k).shape[2]
