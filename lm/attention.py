"""Causal attention with document (segment) masking: the kernels an attention plan names.

Which kernel runs where is decided once, by lm/attention_plan.py; `attend` runs a whole sequence
(training, eval, prefill) through the resolved name it is given:

  * `cudnn`: cuDNN's fused flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`).
    Segment ids reach it as a boolean mask, which cuDNN turns into an additive [B, 1, L, L] bias:
    the kernel stays fused, but that bias (and its gradient) costs B*L^2 values.
  * `splash`: the Pallas splash attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`)
    with its own segment ids, run per device through `lm.axes.per_shard` (a shard_map over batch and
    heads installed by the step).
  * `xla`: `xla_attention`. It materialises the [B, N, L, S] scores; with `recompute=True`
    (remat=none) the backward pass recomputes them from q, k, v instead of keeping them, as flash
    kernels do. Cached decoding calls it directly, with an int8 cache's scales.

Shape suffixes: B batch, L query length, S key length, N query heads, G kv heads, R = N / G query
heads per kv head, K head dim.
"""

import jax
import jax.numpy as jnp
import numpy as np

from lm import axes

SPLASH_KERNEL_BLOCK = 512    # the block sizes the splash kernels are built with (or the length, if shorter)
_MASKED = -0.7 * float(np.finfo(np.float32).max)  # finite, so a fully masked row cannot make NaNs


def segment_mask(segment_ids_BxL: jax.Array | None, length: int) -> jax.Array:
  """Boolean [B or 1, L, L]: causal, and within one segment when segment ids are given."""
  positions = jnp.arange(length)
  causal_LxL = positions[:, None] >= positions[None, :]
  if segment_ids_BxL is None:
    return causal_LxL[None]
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return same_BxLxL & causal_LxL[None]


def xla_attention(q_BxLxNxK, k_BxSxGxK, v_BxSxGxK, mask_BxLxS, *, recompute: bool = False,
                  k_scale_BxSxGx1=None, v_scale_BxSxGx1=None):
  """Softmax attention in XLA: scores and softmax in float32, the weighted sum in the compute dtype.

  `mask_BxLxS` is boolean (True: attend), broadcastable to [B, L, S]. With `recompute` the backward
  pass recomputes scores and probabilities from q, k, v (nothing of size L*S is kept between passes).
  Scales (float32 [B, S, G, 1], an int8 KV cache's: lm/kv_cache.py) mean the keys are k x k_scale
  and the values v x v_scale; they are applied to the [.., L, S] scores and probabilities, never to
  a copy of k or v. Returns [B, L, N, K] in q's dtype.
  """
  # Per-key scales [B, S, G, 1] -> [B, G, 1, 1, S], beside the scores' key axis.
  per_key = lambda scale: None if scale is None else scale[..., 0].transpose(0, 2, 1)[:, :, None, None]
  k_scale, v_scale = per_key(k_scale_BxSxGx1), per_key(v_scale_BxSxGx1)

  def core(q_BxLxNxK, k_BxSxGxK, v_BxSxGxK, mask_BxLxS):
    batch, length, heads, head_dim = q_BxLxNxK.shape
    groups = k_BxSxGxK.shape[2]
    q_BxLxGxRxK = q_BxLxNxK.reshape(batch, length, groups, heads // groups, head_dim)
    scores_BxGxRxLxS = jnp.einsum("blgrk,bsgk->bgrls", q_BxLxGxRxK, k_BxSxGxK,
                                  preferred_element_type=jnp.float32) * head_dim ** -0.5
    if k_scale is not None:
      scores_BxGxRxLxS = scores_BxGxRxLxS * k_scale
    scores_BxGxRxLxS = jnp.where(mask_BxLxS[:, None, None], scores_BxGxRxLxS, _MASKED)
    probs_BxGxRxLxS = jax.nn.softmax(scores_BxGxRxLxS, axis=-1)
    if v_scale is not None:
      probs_BxGxRxLxS = probs_BxGxRxLxS * v_scale
    probs_BxGxRxLxS = probs_BxGxRxLxS.astype(v_BxSxGxK.dtype)
    out_BxLxGxRxK = jnp.einsum("bgrls,bsgk->blgrk", probs_BxGxRxLxS, v_BxSxGxK,
                               preferred_element_type=jnp.float32)
    return out_BxLxGxRxK.reshape(q_BxLxNxK.shape).astype(q_BxLxNxK.dtype)

  if recompute:
    # prevent_cse=False: the blocks run inside scan, where XLA cannot merge the recomputation away.
    core = jax.checkpoint(core, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
  return core(q_BxLxNxK, k_BxSxGxK, v_BxSxGxK, jnp.asarray(mask_BxLxS))


def cudnn_attention(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL=None):
  """cuDNN flash attention (causal, GQA native); segment ids enter as a boolean mask (an added bias)."""
  mask = None
  if segment_ids_BxL is not None:
    mask = (segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :])
  return jax.nn.dot_product_attention(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, mask=mask, is_causal=True,
                                      implementation="cudnn")


def _splash_kernel(length: int, heads_per_group: int, interpret: bool):
  # Built at every trace, never cached: the kernel holds arrays made inside the trace that calls it.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  block = min(SPLASH_KERNEL_BLOCK, length)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                            block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads_per_group)
  return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret), splash.SegmentIds


def splash_attention(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL=None, *, interpret=False):
  """Pallas splash attention (TPU): one MQA kernel per kv head, vmapped over kv heads and batch.

  Runs per device through `lm.axes.per_shard` (batch and heads split as the rules say, the sequence
  whole). `interpret` runs the kernel in Pallas' interpreter (CPU tests). Returns [B, L, N, K].
  """
  batch, length, heads, head_dim = q_BxLxNxK.shape
  if segment_ids_BxL is None:
    segment_ids_BxL = jnp.zeros((batch, length), jnp.int32)

  def per_device(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL):
    b, _, n, _ = q_BxLxNxK.shape
    g = k_BxLxGxK.shape[2]
    kernel, segment_ids_cls = _splash_kernel(length, n // g, interpret)
    # The kernel wants heads first; it does not scale the query.
    q_BxGxRxLxK = (q_BxLxNxK * head_dim ** -0.5).reshape(b, length, g, n // g, head_dim)
    q_BxGxRxLxK = q_BxGxRxLxK.transpose(0, 2, 3, 1, 4)
    k_BxGxLxK, v_BxGxLxK = (t.transpose(0, 2, 1, 3) for t in (k_BxLxGxK, v_BxLxGxK))
    one = lambda q, k, v, s: kernel(q, k, v, segment_ids=segment_ids_cls(s, s))
    over_groups = jax.vmap(one, in_axes=(0, 0, 0, None))
    out_BxGxRxLxK = jax.vmap(over_groups)(q_BxGxRxLxK, k_BxGxLxK, v_BxGxLxK, segment_ids_BxL)
    return out_BxGxRxLxK.transpose(0, 3, 1, 2, 4).reshape(b, length, n, head_dim)

  # The sequence stays whole on each device: the kernel needs every key of its queries.
  heads_names = ("batch", None, "heads", None)
  kv_names = ("batch", None, "kv_heads", None)
  run = axes.per_shard(per_device, (heads_names, kv_names, kv_names, ("batch", None)), heads_names)
  return run(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)


def attend(implementation: str, q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL=None, *,
           recompute: bool = False, interpret: bool = False):
  """Causal self-attention of a whole sequence (training, eval, prefill) through `implementation`.

  `implementation` is a resolved name (xla | cudnn | splash: an attention plan's, lm/attention_plan.py);
  segment ids [B, L] keep documents apart. `recompute` applies to XLA only (see xla_attention).
  Returns [B, L, N, K].
  """
  if implementation == "cudnn":
    return cudnn_attention(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
  if implementation == "splash":
    return splash_attention(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, interpret=interpret)
  if implementation != "xla":
    raise ValueError(f"attention implementation {implementation!r} is not one of xla, cudnn, splash.")
  mask = segment_mask(segment_ids_BxL, q_BxLxNxK.shape[1])
  return xla_attention(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, mask, recompute=recompute)
