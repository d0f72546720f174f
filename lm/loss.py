"""Next-token cross-entropy in float32, whole or in chunks of the sequence.

For a large vocabulary the [B, L, V] float32 logits and their gradient dominate the step's memory.
`chunked_cross_entropy` projects and scores the sequence a chunk at a time, recomputing each
chunk's logits in the backward pass, so only [B, chunk, V] logits ever exist. (A hand-written
gradient that keeps only the logits and the log-normalizer was measured too: XLA already fuses the
autodiff version as well, and the custom one was 16% slower; see docs/speed.md.)
"""

from typing import Callable

import jax
import jax.numpy as jnp


def _token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Per-token -log softmax(logits)[target], [B, L] float32."""
  logits = logits_BxLxV.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  return log_z_BxL - target_logit_BxL


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                  weights_BxL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Returns (sum of per-token negative log-likelihoods, number of weighted tokens), float32 scalars.

  Sums, not means, so that gradient accumulation and multi-host averaging divide once by the true
  token count.
  """
  nll_BxL = _token_nll(logits_BxLxV, targets_BxL)
  if weights_BxL is None:
    return jnp.sum(nll_BxL), jnp.float32(nll_BxL.size)
  weights_BxL = weights_BxL.astype(jnp.float32)
  return jnp.sum(nll_BxL * weights_BxL), jnp.sum(weights_BxL)


def chunked_cross_entropy(hidden_BxLxD: jax.Array, targets_BxL: jax.Array,
                          project: Callable[[jax.Array], jax.Array], chunk_size: int,
                          weights_BxL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy of `project(hidden)` computed `chunk_size` positions at a time.

  `project` maps hidden [B, C, D] to logits [B, C, V]. Chunks run in a `lax.scan` under
  `jax.checkpoint`, so the backward pass recomputes one chunk's logits instead of storing all of
  them (memory [B, chunk, V] instead of [B, L, V], for one extra output-projection matmul).
  `weights_BxL` (e.g. 0 on an instruction's prompt tokens) weighs each target as in `cross_entropy`.
  Returns (loss sum, token count) like `cross_entropy`.
  """
  batch, length, _ = hidden_BxLxD.shape
  if chunk_size <= 0 or chunk_size >= length:
    return cross_entropy(project(hidden_BxLxD), targets_BxL, weights_BxL)
  if length % chunk_size:
    raise ValueError(f"sequence length {length} is not a multiple of the logits chunk size {chunk_size}.")
  chunks = length // chunk_size
  # Chunk n holds positions n, n + chunks, n + 2 chunks, ... (strided, not contiguous): the loss is a
  # sum, so any split works, and this one keeps the batch's sharding and a sequence axis's split of
  # length (each device scores its own positions of every chunk, none is gathered).
  hidden_NxBxCxD = jnp.moveaxis(hidden_BxLxD.reshape(batch, chunk_size, chunks, -1), 2, 0)
  targets_NxBxC = jnp.moveaxis(targets_BxL.reshape(batch, chunk_size, chunks), 2, 0)
  if weights_BxL is None:
    weights_BxL = jnp.ones((batch, length), jnp.float32)
  weights_NxBxC = jnp.moveaxis(weights_BxL.astype(jnp.float32).reshape(batch, chunk_size, chunks), 2, 0)

  @jax.checkpoint
  def chunk_loss(total, chunk):
    hidden_BxCxD, targets_BxC, weights_BxC = chunk
    loss_sum, _ = cross_entropy(project(hidden_BxCxD), targets_BxC, weights_BxC)
    return total + loss_sum, None

  total, _ = jax.lax.scan(chunk_loss, jnp.float32(0), (hidden_NxBxCxD, targets_NxBxC, weights_NxBxC))
  return total, jnp.sum(weights_BxL.astype(jnp.float32))
