"""Ring attention: causal attention over a sequence split along a mesh axis (Liu et al., 2023).

Each device of the `sequence` axis holds a chunk of the queries and of the keys/values. K/V blocks
(with their positions and segment ids) travel round the ring with `ppermute`; each device folds the
block it holds into an online (flash) softmax (running max and denominator in float32), and the mask
is computed from the positions that travel with the block, so any token layout works (natural or the
balanced zigzag below). Within a block the keys are folded in chunks of `block_size` by a `lax.scan`,
so a device holds [L_local/2, block_size] scores at a time, not [L_local, L_local]: its temporaries
grow linearly with L_local.

The backward pass is a `custom_vjp` that keeps only q, k, v, the output and the log-sum-exp and
recomputes the blocks, key chunk by key chunk, in a second ring (turning the other way), in which
the dK/dV accumulators travel with their K/V block and come home after one last hop: activation
memory is O(L_local), not O(L_total).

Causal balance: with the natural layout device i's queries see only blocks 0..i, so the last device
works N times as long as the first. `sharding.zigzag.zigzag_order` puts chunk i and chunk 2N-1-i of 2N chunks on
device i; then, at every ring step, exactly half of each device's (front/back chunk x front/back
chunk) sub-blocks are fully masked, and `skip_masked=True` skips their key chunks with `lax.cond`
(one branch per key chunk whose mask is all False).

Shape suffixes: B batch, L local query length, S local key length, N query heads, G kv heads,
R = N / G query heads per kv head, K head dim. Pure JAX: no config, mesh plan or launch imports.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from sharding import ring_splash

KERNELS = ("xla", "splash")  # what computes each block: XLA (any platform) or Pallas splash (TPU)
_MASKED = -0.7 * float(np.finfo(np.float32).max)  # finite, so a row with nothing to see makes no NaN


# ------------------------------------------------------------------------------------------------
# One block: a query chunk against a key/value chunk.

def _block_mask(q_pos_BxL, kv_pos_BxS, q_seg_BxL, kv_seg_BxS):
  """Boolean [B, 1, 1, L, S]: causal by global position, and within one document."""
  mask_BxLxS = ((q_pos_BxL[:, :, None] >= kv_pos_BxS[:, None, :])
                & (q_seg_BxL[:, :, None] == kv_seg_BxS[:, None, :]))
  return mask_BxLxS[:, None, None]


def _scores(q_BxLxGxRxK, k_BxSxGxK, mask):
  """Scaled scores [B, G, R, L, S] in float32 (1/sqrt(K), as lm/attention.py), masked entries finite."""
  head_dim = q_BxLxGxRxK.shape[-1]
  s = jnp.einsum("blgrk,bsgk->bgrls", q_BxLxGxRxK, k_BxSxGxK,
                 preferred_element_type=jnp.float32) * head_dim ** -0.5
  return jnp.where(mask, s, _MASKED)


def _forward_block(q, k, v, mask, carry):
  """Folds one K/V block into the running (max, denominator, accumulator) of one query chunk."""
  max_BxGxRxL, denom_BxGxRxL, acc_BxGxRxLxK = carry
  s = _scores(q, k, mask)
  new_max = jnp.maximum(max_BxGxRxL, s.max(-1))
  p = jnp.where(mask, jnp.exp(s - new_max[..., None]), 0.0)
  correction = jnp.exp(max_BxGxRxL - new_max)
  denom = denom_BxGxRxL * correction + p.sum(-1)
  acc = acc_BxGxRxLxK * correction[..., None] + jnp.einsum(
      "bgrls,bsgk->bgrlk", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return new_max, denom, acc


def _backward_block(q, k, v, dout, lse_BxGxRxL, delta_BxGxRxL, mask, grads):
  """Adds one block's contribution to (dq [B,L,G,R,K], dk [B,S,G,K], dv [B,S,G,K]), all float32."""
  dq, dk, dv = grads
  scale = q.shape[-1] ** -0.5
  p = jnp.where(mask, jnp.exp(_scores(q, k, mask) - lse_BxGxRxL[..., None]), 0.0)
  dv = dv + jnp.einsum("bgrls,blgrk->bsgk", p.astype(dout.dtype), dout,
                       preferred_element_type=jnp.float32)
  dp = jnp.einsum("blgrk,bsgk->bgrls", dout, v, preferred_element_type=jnp.float32)
  ds = (p * (dp - delta_BxGxRxL[..., None])).astype(q.dtype)
  dq = dq + scale * jnp.einsum("bgrls,bsgk->blgrk", ds, k, preferred_element_type=jnp.float32)
  dk = dk + scale * jnp.einsum("bgrls,blgrk->bsgk", ds, q, preferred_element_type=jnp.float32)
  return dq, dk, dv


def _maybe(skip: bool, mask, fn, skipped, carry):
  """fn(carry), or skipped(carry) when `skip` and the chunk's mask is all False (a real branch)."""
  if not skip:
    return fn(carry)
  return jax.lax.cond(jnp.any(mask), fn, skipped, carry)


def chunk_size(length: int, block_size: int) -> int:
  """The key chunk that tiles a sub-block of `length` keys: the largest divisor <= `block_size`."""
  return max(d for d in range(1, min(block_size, length) + 1) if length % d == 0)


def _key_chunks(x, chunk: int):
  """[B, S, ...] -> [S / chunk, B, chunk, ...]: the leading axis is what `lax.scan` walks."""
  return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // chunk, chunk, *x.shape[2:]), 1, 0)


def _from_key_chunks(x):
  """[S / chunk, B, chunk, ...] -> [B, S, ...] (the inverse of `_key_chunks`)."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _forward_sub_block(skip, chunk, q, qpos, qseg, k, v, kpos, kseg, carry):
  """Folds the keys of one sub-block into one query chunk's (max, denominator, accumulator), `chunk`
  keys at a time: the scores held are [B, G, R, L, chunk], whatever the sub-block's length."""
  def fold(carry, keys):
    k, v, kpos, kseg = keys
    mask = _block_mask(qpos, kpos, qseg, kseg)
    return _maybe(skip, mask, functools.partial(_forward_block, q, k, v, mask), lambda c: c, carry), None
  keys = (k, v, kpos, kseg)
  if k.shape[1] == chunk:  # one chunk: no loop
    return fold(carry, keys)[0]
  return jax.lax.scan(fold, carry, tuple(_key_chunks(x, chunk) for x in keys))[0]


def _backward_sub_block(skip, chunk, q, qpos, qseg, dout, lse, delta, k, v, kpos, kseg, dq):
  """(dq + this sub-block's part, dk, dv of its keys), recomputing the scores `chunk` keys at a time
  from the saved log-sum-exp; dq is carried through the chunks, dk and dv are produced per chunk."""
  def fold(dq, keys):
    k, v, kpos, kseg = keys
    mask = _block_mask(qpos, kpos, qseg, kseg)
    zeros = (_zeros_like_vma(k.shape, k), _zeros_like_vma(v.shape, v))
    grads = functools.partial(_backward_block, q, k, v, dout, lse, delta, mask)
    dq, dk, dv = _maybe(skip, mask, grads, lambda g: g, (dq, *zeros))
    return dq, (dk, dv)
  keys = (k, v, kpos, kseg)
  if k.shape[1] == chunk:
    dq, (dk, dv) = fold(dq, keys)
    return dq, dk, dv
  dq, (dk, dv) = jax.lax.scan(fold, dq, tuple(_key_chunks(x, chunk) for x in keys))
  return dq, _from_key_chunks(dk), _from_key_chunks(dv)


def _zeros_like_vma(shape, like, value=0.0):
  """float32 `value`s of `shape`, varying over the same mesh axes as `like` (so `lax.cond` branches
  and the ring's carries agree under shard_map's check_vma; a no-op without it)."""
  x = jnp.full(shape, value, jnp.float32)
  aval = jax.typeof(like)
  # jax 0.10 keeps the varying axes in `manual_axis_type.varying`; earlier versions in `vma`.
  manual = getattr(aval, "manual_axis_type", None)
  axes = tuple(sorted(manual.varying if manual is not None else getattr(aval, "vma", ())))
  return jax.lax.pcast(x, axes, to="varying") if axes else x


def _pieces(length: int) -> int:
  # Two sub-chunks per local block: in the zigzag layout they are the front and back chunk, and
  # exactly two of the four sub-blocks are fully masked at every ring step off the diagonal. The
  # same split without skipping, so that skipping is the only difference between the two.
  return 2 if length % 2 == 0 else 1


# ------------------------------------------------------------------------------------------------
# The two rings.

def _ring_perm(axis_name, direction: int = 1):
  """(ring size, ppermute pairs sending each device's block to its neighbour `direction` away)."""
  n = jax.lax.axis_size(axis_name)
  return n, [(i, (i + direction) % n) for i in range(n)]


def _fold_kernel_block(carry, out_BxGxRxLxK, lse_BxGxRxL):
  """Merges one block's normalized output and log-sum-exp (a kernel's) into the running (max,
  denominator, accumulator); rows that saw no key in the block (log-sum-exp < -1e38) add nothing."""
  max_BxGxRxL, denom_BxGxRxL, acc_BxGxRxLxK = carry
  seen = lse_BxGxRxL > -1e38
  new_max = jnp.maximum(max_BxGxRxL, jnp.where(seen, lse_BxGxRxL, max_BxGxRxL))
  correction = jnp.exp(max_BxGxRxL - new_max)
  weight = jnp.where(seen, jnp.exp(lse_BxGxRxL - new_max), 0.0)
  return (new_max, denom_BxGxRxL * correction + weight,
          acc_BxGxRxLxK * correction[..., None] + out_BxGxRxLxK * weight[..., None])


def _forward(axis_name, skip, block_size, kernel, layout, interpret, q_BxLxNxK, k_BxSxGxK, v_BxSxGxK, q_pos,
             kv_pos, q_seg, kv_seg):
  """(out [B, L, N, K] in q's dtype, logsumexp [B, G, R, L] float32)."""
  batch, length, heads, head_dim = q_BxLxNxK.shape
  groups = k_BxSxGxK.shape[2]
  n, perm = _ring_perm(axis_name)
  c = _pieces(length)
  chunk = chunk_size(k_BxSxGxK.shape[1] // c, block_size)
  q_BxLxGxRxK = q_BxLxNxK.reshape(batch, length, groups, heads // groups, head_dim)
  q_parts = jnp.split(q_BxLxGxRxK, c, axis=1)
  qpos_parts, qseg_parts = jnp.split(q_pos, c, axis=1), jnp.split(q_seg, c, axis=1)
  stat = (batch, groups, heads // groups, length // c)
  carries = [(_zeros_like_vma(stat, q_BxLxNxK, _MASKED), _zeros_like_vma(stat, q_BxLxNxK),
              _zeros_like_vma(stat + (head_dim,), q_BxLxNxK)) for _ in range(c)]
  travelling = (k_BxSxGxK, v_BxSxGxK, kv_pos, kv_seg)
  if kernel == "splash":
    splash_kernels = ring_splash.kernels(length // c, heads // groups, interpret=interpret, residuals=True)
  for step in range(n):
    # Send this block on before using it, so the transfer can overlap the block's compute.
    following = jax.lax.ppermute(travelling, axis_name, perm) if step < n - 1 else None
    k, v, kpos, kseg = (jnp.split(t, c, axis=1) for t in travelling)
    for a in range(c):
      for b in range(c):
        if kernel == "splash":
          kind = ring_splash.block_kind(axis_name, step, 1, a, b, layout)
          block = ring_splash.block_forward(splash_kernels, kind, q_parts[a], qseg_parts[a], k[b], v[b],
                                            kseg[b])
          carries[a] = _fold_kernel_block(carries[a], *block)
        else:
          carries[a] = _forward_sub_block(skip, chunk, q_parts[a], qpos_parts[a], qseg_parts[a],
                                          k[b], v[b], kpos[b], kseg[b], carries[a])
    travelling = following
  maxes, denoms, accs = (jnp.concatenate(parts, axis=3) for parts in zip(*carries))
  denoms = jnp.where(denoms == 0.0, 1.0, denoms)  # a query with no key at all (never causal self)
  out_BxGxRxLxK = accs / denoms[..., None]
  out = out_BxGxRxLxK.transpose(0, 3, 1, 2, 4).reshape(q_BxLxNxK.shape).astype(q_BxLxNxK.dtype)
  return out, maxes + jnp.log(denoms)


def _backward(axis_name, skip, block_size, kernel, layout, interpret, q_BxLxNxK, k_BxSxGxK, v_BxSxGxK, q_pos,
              kv_pos, q_seg, kv_seg, out_BxLxNxK, lse_BxGxRxL, dout_BxLxNxK):
  """(dq, dk, dv) in the inputs' dtypes; dk/dv accumulate in float32 while they travel."""
  batch, length, heads, head_dim = q_BxLxNxK.shape
  groups = k_BxSxGxK.shape[2]
  # The backward ring turns the other way. Were its K/V hops the forward's, XLA would merge the two
  # rings when both passes sit in one computation (CSE; XLA:CPU drops optimization barriers before
  # it) and keep every device's K/V block alive from forward to backward: O(L_total) memory. (At
  # sequence=2 both ways are the one pair and the hop is shared: the block it keeps is held anyway.)
  n, perm = _ring_perm(axis_name, direction=-1)
  c = _pieces(length)
  chunk = chunk_size(k_BxSxGxK.shape[1] // c, block_size)
  grouped = lambda x: x.reshape(batch, length, groups, heads // groups, head_dim)
  q, dout, out = grouped(q_BxLxNxK), grouped(dout_BxLxNxK), grouped(out_BxLxNxK)
  # delta = rowsum(dO * O): the softmax Jacobian's correction term, one per query and head.
  delta_BxGxRxL = jnp.einsum("blgrk,blgrk->bgrl", dout.astype(jnp.float32),
                             out.astype(jnp.float32))
  q_parts, dout_parts, out_parts = (jnp.split(x, c, axis=1) for x in (q, dout, out))
  lse_parts, delta_parts = jnp.split(lse_BxGxRxL, c, axis=3), jnp.split(delta_BxGxRxL, c, axis=3)
  qpos_parts, qseg_parts = jnp.split(q_pos, c, axis=1), jnp.split(q_seg, c, axis=1)
  dq_parts = [_zeros_like_vma(p.shape, q_BxLxNxK) for p in q_parts]
  block = (k_BxSxGxK, v_BxSxGxK, kv_pos, kv_seg)
  dkv = (_zeros_like_vma(k_BxSxGxK.shape, k_BxSxGxK), _zeros_like_vma(v_BxSxGxK.shape, v_BxSxGxK))
  if kernel == "splash":
    splash_kernels = ring_splash.kernels(length // c, heads // groups, interpret=interpret, residuals=False)
  for step in range(n):
    following = jax.lax.ppermute(block, axis_name, perm) if step < n - 1 else None
    k, v, kpos, kseg = (jnp.split(t, c, axis=1) for t in block)
    # This block's dK/dV start at zero and are added to the arriving accumulators afterwards, so
    # the accumulators' transfer overlaps this block's compute too.
    dk_parts = [_zeros_like_vma(p.shape, k_BxSxGxK) for p in k]
    dv_parts = [_zeros_like_vma(p.shape, v_BxSxGxK) for p in v]
    for a in range(c):
      for b in range(c):
        if kernel == "splash":
          kind = ring_splash.block_kind(axis_name, step, -1, a, b, layout)
          dq, dk, dv = ring_splash.block_grads(splash_kernels, kind, q_parts[a], qseg_parts[a], k[b],
                                               v[b], kseg[b], out_parts[a], lse_parts[a], dout_parts[a])
          dq_parts[a] = dq_parts[a] + dq
        else:
          dq_parts[a], dk, dv = _backward_sub_block(
              skip, chunk, q_parts[a], qpos_parts[a], qseg_parts[a], dout_parts[a], lse_parts[a],
              delta_parts[a], k[b], v[b], kpos[b], kseg[b], dq_parts[a])
        dk_parts[b], dv_parts[b] = dk_parts[b] + dk, dv_parts[b] + dv
    dkv = (dkv[0] + jnp.concatenate(dk_parts, axis=1), dkv[1] + jnp.concatenate(dv_parts, axis=1))
    # The accumulators follow their block; after the last step one more hop brings them home.
    dkv = jax.lax.ppermute(dkv, axis_name, perm)
    block = following
  dq = jnp.concatenate(dq_parts, axis=1).reshape(q_BxLxNxK.shape)
  return dq.astype(q_BxLxNxK.dtype), dkv[0].astype(k_BxSxGxK.dtype), dkv[1].astype(v_BxSxGxK.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5))
def _ring(axis_name, skip, block_size, kernel, layout, interpret, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
  return _forward(axis_name, skip, block_size, kernel, layout, interpret, q, k, v, q_pos, kv_pos, q_seg,
                  kv_seg)[0]


def _ring_fwd(axis_name, skip, block_size, kernel, layout, interpret, q, k, v, q_pos, kv_pos, q_seg,
              kv_seg):
  # Under the model's remat (nnx.remat, dots_no_batch) this forward is split into a pass and a
  # recomputation, and the skipping `lax.cond` inside the key-chunk scan then handed every chunk's
  # mask and scores from one to the other as stacked scan outputs: the whole [L/2, L/2] sub-block
  # again (llama_1b, 128k, sequence=8: 36.5 GB of temporaries instead of 7.8). Saving nothing here
  # makes the recomputation start from q, k, v alone.
  forward = jax.checkpoint(functools.partial(_forward, axis_name, skip, block_size, kernel, layout,
                                             interpret),
                           policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
  out, lse = forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
  return out, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _ring_bwd(axis_name, skip, block_size, kernel, layout, interpret, residuals, dout):
  q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = residuals
  dq, dk, dv = _backward(axis_name, skip, block_size, kernel, layout, interpret, q, k, v, q_pos, kv_pos,
                         q_seg, kv_seg, out, lse, dout)
  no_grad = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # integer inputs have no cotangent
  return dq, dk, dv, no_grad(q_pos), no_grad(kv_pos), no_grad(q_seg), no_grad(kv_seg)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention_shard(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, q_positions_BxL, kv_positions_BxL,
                         q_segments_BxL, kv_segments_BxL, *, axis_name: str,
                         skip_masked: bool = True, block_size: int = 512, kernel: str = "xla",
                         layout: str = "natural", interpret: bool = False):
  """The per-device body of ring attention; call it inside `jax.shard_map` over `axis_name`.

  q [B, L, N, K], k and v [B, L, G, K] (G divides N; K/V travel with G heads, never repeated), and
  int positions and segment ids [B, L] of this device's chunk (global positions: any layout). A
  query attends to keys with position <= its own in the same segment. `skip_masked` skips fully
  masked key chunks with `lax.cond`. Each sub-block's keys are folded `block_size` at a time (the
  largest divisor of L/2 not above it), so the float32 scores held are [B, N, L/2, block_size].

  `kernel="splash"` computes each sub-block with the Pallas splash kernel instead (TPU;
  sharding/ring_splash.py; `interpret` runs it in Pallas' interpreter for CPU tests). It reads each
  sub-block's mask from the chunks' places in `layout` (natural | zigzag: what the arrays are in),
  so it needs positions that increase with the index within each document (the model's), and L/2
  a multiple of 128; it skips masked sub-blocks by those places (`skip_masked` and `block_size` are
  the XLA path's).
  Returns [B, L, N, K] in q's dtype; differentiable in q, k, v.
  """
  if kernel not in KERNELS:
    raise ValueError(f"ring attention: kernel={kernel!r}; choose one of {list(KERNELS)}.")
  if layout not in ring_splash.LAYOUTS:
    raise ValueError(f"ring attention: layout={layout!r}; choose one of {list(ring_splash.LAYOUTS)}.")
  if kernel == "splash" and (problem := ring_splash.chunk_problem(q_BxLxNxK.shape[1] // 2)):
    raise ValueError(f"ring attention: {problem}; it must be a multiple of {ring_splash.BLOCKS[-1]}.")
  if block_size < 1:
    raise ValueError(f"ring attention: block_size must be >= 1 (keys per chunk); got {block_size}.")
  if q_BxLxNxK.shape[2] % k_BxLxGxK.shape[2]:
    raise ValueError(f"query heads ({q_BxLxNxK.shape[2]}) must be a multiple of kv heads "
                     f"({k_BxLxGxK.shape[2]}).")
  ints = lambda x: jnp.asarray(x, jnp.int32)
  return _ring(axis_name, skip_masked, block_size, kernel, layout, interpret, q_BxLxNxK, k_BxLxGxK, v_BxLxGxK,
               ints(q_positions_BxL),
               ints(kv_positions_BxL), ints(q_segments_BxL), ints(kv_segments_BxL))


def ring_attention(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, positions_BxL, segments_BxL=None, *,
                   mesh: Mesh, axis_name: str = "sequence", batch_axes=None, head_axis=None,
                   skip_masked: bool = True, block_size: int = 512, kernel: str = "xla",
                   layout: str = "natural", interpret: bool = False):
  """Ring attention of global arrays: a `shard_map` of `ring_attention_shard` over `mesh`.

  Batch is split over `batch_axes` (a mesh axis name, a tuple of them, or None), length over
  `axis_name`, query and kv heads over `head_axis` (or None). `positions_BxL` are the tokens' global
  positions in the layout the arrays are in (natural, or `sharding.zigzag.to_zigzag`'s); `segments_BxL` (None: one
  document) keep documents apart; `block_size` is the key chunk, `kernel` what computes each block
  and `layout` the arrays' layout, which the splash kernel needs (see `ring_attention_shard`).
  Raises ValueError when the length does not split over the axis.
  Returns [B, L, N, K] in q's dtype, sharded like q.
  """
  length, shards = q_BxLxNxK.shape[1], mesh.shape[axis_name]
  if length % shards:
    raise ValueError(f"sequence length L={length} must be divisible by mesh.sequence={shards} "
                     f"(the '{axis_name}' axis) for ring attention.")
  split = lambda axes: int(np.prod([mesh.shape[a] for a in
                                    ((axes,) if isinstance(axes, str) else axes or ())]))
  for what, size, axes in (("batch", q_BxLxNxK.shape[0], batch_axes),
                           ("query heads", q_BxLxNxK.shape[2], head_axis),
                           ("kv heads", k_BxLxGxK.shape[2], head_axis)):
    if size % split(axes):
      raise ValueError(f"ring attention: {what} ({size}) must be divisible by the mesh axes "
                       f"{axes!r} they are split over (size {split(axes)}).")
  if segments_BxL is None:
    segments_BxL = jnp.zeros(positions_BxL.shape, jnp.int32)
  heads, tokens = P(batch_axes, axis_name, head_axis, None), P(batch_axes, axis_name)
  body = functools.partial(ring_attention_shard, axis_name=axis_name, skip_masked=skip_masked,
                           block_size=block_size, kernel=kernel, layout=layout, interpret=interpret)
  # Pallas kernels carry no varying-axes types, so the kernel path runs unchecked.
  run = jax.shard_map(lambda q, k, v, pos, seg: body(q, k, v, pos, pos, seg, seg), mesh=mesh,
                      in_specs=(heads, heads, heads, tokens, tokens), out_specs=heads,
                      check_vma=kernel == "xla")
  return run(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, positions_BxL, segments_BxL)
