"""The TPU kernel inside each ring-attention block: Pallas splash attention with its softmax statistics.

Ring attention (sharding/ring_attention.py) folds one key/value block at a time into each query
chunk's result. To fold a block computed by a fused kernel it needs the block's log-sum-exp beside
its output, and its backward pass needs the kernel's gradient taken against the *global* output and
log-sum-exp (the softmax over all blocks), not the block's own. Splash attention provides both:
`save_residuals=True` returns the log-sum-exp, and its backward kernels take (o, logsumexp) as
residuals. The second is not public API: `block_grads` calls splash's private backward
(`jax_internals.splash_mqa_backward`) with the global residuals, as ring implementations built on
flash-attn call its `_flash_attn_backward`. tests/test_ring_attention.py compares it with a dense
reference in Pallas' interpreter.

A block's mask must be one splash knows statically. Each device's block is cut into two pieces, and
in either layout (natural: device i holds chunks 2i and 2i+1 of 2N; zigzag: chunks i and 2N-1-i)
every (query piece, key piece) sub-block is one of three kinds, decided by the chunks' places in
the sequence, with the segment ids applied by the kernel on top:

  * SKIP: the key chunk lies after the query chunk; nothing to compute.
  * FULL: the key chunk lies before the query chunk; every key is earlier than every query.
  * CAUSAL: the same chunk; the usual lower triangle.

This holds when positions increase with the token's index within each document, as the model's do
(offsets within the document, or the index itself).

Shape suffixes: B batch, L query chunk length, S key chunk length, G kv heads, R query heads per kv
head, K head dim.
"""

import jax
import jax.numpy as jnp

from sharding import jax_internals

SKIP, FULL, CAUSAL = 0, 1, 2
BLOCKS = (512, 256, 128)  # splash tiles: the largest that divides the chunk


def chunk_problem(chunk_length: int) -> str:
  """'' when splash can tile a ring sub-block of `chunk_length` tokens, else why not."""
  if chunk_length % BLOCKS[-1]:
    return (f"splash attention tiles a ring sub-block in blocks of {BLOCKS[-1]}, and each device's "
            f"sub-block holds {chunk_length} tokens (data.seq_len / (2 x mesh.sequence))")
  return ""


def kernels(length: int, heads_per_group: int, *, interpret: bool, residuals: bool) -> dict:
  """{FULL: kernel, CAUSAL: kernel}: MQA splash kernels over a [length, length] sub-block, with
  `heads_per_group` query heads per kv head; `residuals` for the forward pass (it returns the
  log-sum-exp), not for the backward; `interpret` runs them in Pallas' interpreter.

  Build them once per pass (processing the masks takes ~0.1-0.3 s) and never cache them across
  traces: the kernels hold arrays made inside the trace that uses them.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  block = next(b for b in BLOCKS if length % b == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                            block_kv_dq=block)
  make = lambda mask: splash.make_splash_mqa(
      splash.MultiHeadMask([mask] * heads_per_group), block_sizes=sizes, head_shards=1,
      q_seq_shards=1, save_residuals=residuals, interpret=interpret)
  return {FULL: make(splash.FullMask((length, length))), CAUSAL: make(splash.CausalMask((length, length)))}


def _heads_first(q_BxLxGxRxK, k_BxSxGxK, v_BxSxGxK):
  """The kernel's layout: q [B, G, R, L, K] scaled by 1/sqrt(K) (splash does not scale), k and v
  [B, G, S, K]."""
  scale = q_BxLxGxRxK.shape[-1] ** -0.5
  return ((q_BxLxGxRxK * scale).astype(q_BxLxGxRxK.dtype).transpose(0, 2, 3, 1, 4),
          k_BxSxGxK.transpose(0, 2, 1, 3), v_BxSxGxK.transpose(0, 2, 1, 3))


def _per_batch_and_group(fn, group_args: int):
  """vmap of fn over batch and kv groups: its first `group_args` arguments have both axes [B, G, ...],
  the rest (segment ids) only batch."""
  in_groups = (0,) * group_args + (None, None)
  return jax.vmap(jax.vmap(fn, in_axes=in_groups))


def _by_kind(kind, skipped, run):
  """skipped() for SKIP, else run(kind)(): directly for a Python int, by `lax.switch` when traced."""
  branches = [skipped, run(FULL), run(CAUSAL)]  # indexed by SKIP, FULL, CAUSAL
  if isinstance(kind, int):
    return branches[kind]()
  return jax.lax.switch(kind, branches)


def block_forward(splash_kernels: dict, kind, q_BxLxGxRxK, q_seg_BxL, k_BxSxGxK, v_BxSxGxK, kv_seg_BxS):
  """One sub-block through splash: (out [B, G, R, L, K] float32, logsumexp [B, G, R, L] float32).

  `splash_kernels` from `kernels(..., residuals=True)`; `kind` is FULL, CAUSAL or SKIP, a Python int
  or a traced int32 (a `lax.switch`). SKIP (and a query row with no visible key in the block) gives
  a log-sum-exp below -1e38, so the row's output carries no weight when blocks are merged.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  batch, length, groups, per_group, head_dim = q_BxLxGxRxK.shape
  q, k, v = _heads_first(q_BxLxGxRxK, k_BxSxGxK, v_BxSxGxK)

  def run(which):
    def one(q, k, v, q_seg, kv_seg):
      out, (lse,) = splash_kernels[which](q, k, v, segment_ids=splash.SegmentIds(q_seg, kv_seg))
      return out.astype(jnp.float32), lse
    return lambda: _per_batch_and_group(one, 3)(q, k, v, q_seg_BxL, kv_seg_BxS)

  def skipped():
    stat = (batch, groups, per_group, length)
    return jnp.zeros(stat + (head_dim,), jnp.float32), jnp.full(stat, -jnp.inf, jnp.float32)

  return _by_kind(kind, skipped, run)


def block_grads(splash_kernels: dict, kind, q_BxLxGxRxK, q_seg_BxL, k_BxSxGxK, v_BxSxGxK, kv_seg_BxS,
                out_BxLxGxRxK, lse_BxGxRxL, dout_BxLxGxRxK):
  """One sub-block's part of (dq [B, L, G, R, K], dk [B, S, G, K], dv [B, S, G, K]), float32.

  `splash_kernels` from `kernels(..., residuals=False)`. `out` and `lse` are the whole ring's output
  and log-sum-exp for these queries (what the softmax over every block gave), so the kernel's
  probabilities are the global ones and the parts add up.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  head_dim = q_BxLxGxRxK.shape[-1]
  q, k, v = _heads_first(q_BxLxGxRxK, k_BxSxGxK, v_BxSxGxK)
  out, dout = (x.astype(q.dtype).transpose(0, 2, 3, 1, 4) for x in (out_BxLxGxRxK, dout_BxLxGxRxK))

  def run(which):
    def one(q, k, v, out, lse, dout, q_seg, kv_seg):
      return jax_internals.splash_mqa_backward(splash_kernels[which], q, k, v,
                                               splash.SegmentIds(q_seg, kv_seg), out, lse, dout)

    def grads():
      dq, dk, dv = _per_batch_and_group(one, 6)(q, k, v, out, lse_BxGxRxL, dout, q_seg_BxL, kv_seg_BxS)
      scale = head_dim ** -0.5  # the kernel saw q * scale
      return ((dq.astype(jnp.float32) * scale).transpose(0, 3, 1, 2, 4),
              dk.astype(jnp.float32).transpose(0, 2, 1, 3), dv.astype(jnp.float32).transpose(0, 2, 1, 3))
    return grads

  def skipped():
    return (jnp.zeros(q_BxLxGxRxK.shape, jnp.float32), jnp.zeros(k_BxSxGxK.shape, jnp.float32),
            jnp.zeros(v_BxSxGxK.shape, jnp.float32))

  return _by_kind(kind, skipped, run)


LAYOUTS = ("natural", "zigzag")


def block_kind(axis_name, step: int, direction: int, query_piece: int, key_piece: int, layout: str):
  """The kind (SKIP, FULL, CAUSAL) of one sub-block at ring step `step` of a ring turning `direction`.

  At step s a device i holds the K/V block that started on device i - s x direction; piece p of
  device d is chunk 2d + p (natural layout) or d / 2N-1-d (p = 0 / 1, zigzag) of 2N. A Python int at
  step 0 (the device's own block, the same in both layouts), a traced int32 after.
  """
  if step == 0:
    return CAUSAL if query_piece == key_piece else (FULL if query_piece > key_piece else SKIP)
  n = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  source = (me - step * direction) % n
  if layout == "zigzag":
    chunk = lambda device, piece: device if piece == 0 else 2 * n - 1 - device
  else:
    chunk = lambda device, piece: 2 * device + piece
  # Different devices hold different chunks, so off the own block a sub-block is never CAUSAL.
  return jnp.where(chunk(me, query_piece) > chunk(source, key_piece), FULL, SKIP).astype(jnp.int32)
