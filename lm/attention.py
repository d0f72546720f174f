"""Causal attention with document (segment) masking, and the one place that picks its implementation.

`model.attention` is `auto | xla | cudnn | splash`. `select` turns it, with the platform, dtype, head
dim and sequence length, into the implementation that runs and the reason; the run prints that once
and stores it in its checkpoints' meta (launch/run/context.py, launch/run/loop.py), and the model calls
the same function while tracing, with the lengths it really sees (so prefill of a short prompt may
fall back where training did not). What `auto` picks:

  * NVIDIA GPU, bf16/fp16, head dim a multiple of 8 up to 128 (256 on Hopper and later), and an
    even sequence length when segment ids come too: cuDNN's fused flash attention
    (`jax.nn.dot_product_attention(implementation="cudnn")`). Segment ids reach it as a boolean
    mask, which cuDNN turns into an additive [B, 1, L, L] bias: the kernel stays fused, but that
    bias (and its gradient) costs B*L^2 values.
  * TPU, sequence length a multiple of 128: the Pallas splash attention kernel
    (`jax.experimental.pallas.ops.tpu.splash_attention`) with its own segment ids, run per device
    through `lm.axes.per_shard` (a shard_map over batch and heads installed by the step).
  * everything else, and CPU always: XLA (`xla_attention` below). It materialises the [B, N, L, S]
    scores; with `recompute=True` (remat=none) the backward pass recomputes them from q, k, v
    instead of keeping them, as flash kernels do.

Shape suffixes: B batch, L query length, S key length, N query heads, G kv heads, R = N / G query
heads per kv head, K head dim.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lm import axes

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
# Platforms `select` knows: jax's "gpu" is split by vendor because only NVIDIA has cuDNN.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
_SPLASH_BLOCK = 128          # splash tiles the sequence in blocks of this many positions (or fewer)
_MASKED = -0.7 * float(np.finfo(np.float32).max)  # finite, so a fully masked row cannot make NaNs


@dataclasses.dataclass(frozen=True)
class Selection:
  """What runs (`implementation`: xla | cudnn | splash) and why (`reason`, one sentence)."""
  requested: str
  implementation: str
  reason: str

  def message(self) -> str:
    """One line for the start-up log, e.g. 'attention: cudnn (auto: cuDNN flash attention ...)'."""
    return f"attention: {self.implementation} ({self.requested}: {self.reason})"


def platform_of(device) -> str:
  """'cpu' | 'cuda' | 'rocm' | 'tpu' for a jax device (a GPU's vendor read from its backend)."""
  if device.platform != "gpu":
    return device.platform
  version = getattr(device.client, "platform_version", "").lower()
  return "rocm" if "rocm" in version else "cuda"


def _cudnn_problem(dtype: str, head_dim: int, seq_len: int, compute_capability: str | None,
                   masked: bool) -> str:
  """'' when cuDNN flash attention takes these shapes, else why not (jax's own checks, mirrored)."""
  if dtype not in ("bfloat16", "float16"):
    return f"cuDNN flash attention needs bfloat16 or float16 compute, not model.dtype={dtype!r}"
  hopper = compute_capability is not None and tuple(map(int, compute_capability.split("."))) >= (9, 0)
  max_head = 256 if hopper else 128
  if head_dim % 8 or head_dim > max_head:
    return (f"cuDNN flash attention needs a head dim that is a multiple of 8 and at most {max_head}, "
            f"not model.head_dim={head_dim}")
  if masked and seq_len % 2:
    # Training with a bias (the segment mask) needs even lengths (jax's check_is_flash_attention).
    return f"cuDNN flash attention with a segment mask needs an even sequence length, not {seq_len}"
  return ""


def _splash_problem(seq_len: int) -> str:
  if seq_len % _SPLASH_BLOCK:
    return (f"splash attention tiles the sequence in blocks of {_SPLASH_BLOCK}; length {seq_len} is "
            f"not a multiple")
  return ""


def select(requested: str, *, platform: str, dtype: str, head_dim: int, seq_len: int,
           compute_capability: str | None = None, segments: bool = True) -> Selection:
  """Resolves `model.attention` for one platform and shape; the only place the choice is made.

  `platform` is one of PLATFORMS, `dtype` the compute dtype name, `seq_len` the query length the
  kernel sees, `compute_capability` a CUDA device's ("9.0"; None when unknown), `segments` whether
  a segment mask comes too (training and eval; not a prompt's prefill). Returns a Selection.
  Raises ValueError when an explicit `cudnn` or `splash` cannot run here (auto falls back instead).
  """
  if requested not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={requested!r}: choose one of {list(IMPLEMENTATIONS)}.")
  if platform not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; expected one of {list(PLATFORMS)}.")
  if requested == "xla":
    return Selection(requested, "xla", "as configured")
  cudnn_problem = ("cuDNN runs only on NVIDIA GPUs, and this is " + platform if platform != "cuda"
                   else _cudnn_problem(dtype, head_dim, seq_len, compute_capability, segments))
  splash_problem = ("splash attention is a TPU (Pallas Mosaic) kernel, and this is " + platform
                    if platform != "tpu" else _splash_problem(seq_len))
  if requested == "cudnn":
    if cudnn_problem:
      raise ValueError(f"model.attention='cudnn' cannot run: {cudnn_problem}. Use "
                       "--config.model.attention=auto (picks what this machine has) or xla.")
    return Selection(requested, "cudnn", "as configured")
  if requested == "splash":
    if splash_problem:
      raise ValueError(f"model.attention='splash' cannot run: {splash_problem}. Use "
                       "--config.model.attention=auto (picks what this machine has) or xla.")
    return Selection(requested, "splash", "as configured")
  if platform == "cuda":
    if not cudnn_problem:
      return Selection(requested, "cudnn", "cuDNN fused flash attention on an NVIDIA GPU")
    return Selection(requested, "xla", f"fell back to XLA: {cudnn_problem}")
  if platform == "tpu":
    if not splash_problem:
      return Selection(requested, "splash", "Pallas splash attention on TPU")
    return Selection(requested, "xla", f"fell back to XLA: {splash_problem}")
  return Selection(requested, "xla", f"no fused attention kernel on {platform}; XLA")


def current_device() -> tuple[str, str | None]:
  """(platform as `select` spells it, CUDA compute capability or None) of jax's default device.

  The model reads this while tracing; it is the only device fact lm/ looks at.
  """
  device = jax.devices()[0]
  return platform_of(device), getattr(device, "compute_capability", None)


def select_for(requested: str, dtype: str, head_dim: int, seq_len: int, segments: bool) -> Selection:
  """`select` on jax's default device."""
  platform, capability = current_device()
  return select(requested, platform=platform, dtype=dtype, head_dim=head_dim, seq_len=seq_len,
                compute_capability=capability, segments=segments)


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
  block = min(512, length)
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

  `implementation` is a resolved name (xla | cudnn | splash, from `select`); segment ids [B, L] keep
  documents apart. `recompute` applies to XLA only (see xla_attention). Returns [B, L, N, K].
  """
  if implementation == "cudnn":
    return cudnn_attention(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
  if implementation == "splash":
    return splash_attention(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, interpret=interpret)
  if implementation != "xla":
    raise ValueError(f"attention implementation {implementation!r} is not one of xla, cudnn, splash.")
  mask = segment_mask(segment_ids_BxL, q_BxLxNxK.shape[1])
  return xla_attention(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, mask, recompute=recompute)
