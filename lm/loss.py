"""Next-token cross-entropy in float32, without extra full-size copies of the logits.

Autodiff of `logsumexp(logits) - logits[target]` keeps the logits *and* their softmax for the
backward pass: two [B, L, V] float32 arrays, which dominate memory when V is large. `_token_nll`
has a custom gradient that keeps only the logits and the per-token log-normalizer, and forms
softmax - onehot once in the backward pass. `chunked_cross_entropy` goes further for very large
vocabularies: it projects and scores the sequence in chunks, recomputing each chunk's logits in
the backward pass, so only [B, chunk, V] logits ever exist.
"""

from typing import Callable

import jax
import jax.numpy as jnp


@jax.custom_vjp
def _token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Per-token -log softmax(logits)[target], [B, L] float32."""
  return _token_nll_fwd(logits_BxLxV, targets_BxL)[0]


def _token_nll_fwd(logits_BxLxV, targets_BxL):
  logits = logits_BxLxV.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  return log_z_BxL - target_logit_BxL, (logits_BxLxV, log_z_BxL, targets_BxL)


def _token_nll_bwd(residuals, g_BxL):
  logits_BxLxV, log_z_BxL, targets_BxL = residuals
  probs = jnp.exp(logits_BxLxV.astype(jnp.float32) - log_z_BxL[..., None])
  onehot = jax.nn.one_hot(targets_BxL, logits_BxLxV.shape[-1], dtype=jnp.float32)
  grad = ((probs - onehot) * g_BxL[..., None]).astype(logits_BxLxV.dtype)
  return grad, None


_token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


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
                          project: Callable[[jax.Array], jax.Array],
                          chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy of `project(hidden)` computed `chunk_size` positions at a time.

  `project` maps hidden [B, C, D] to logits [B, C, V]. Chunks run in a `lax.scan` under
  `jax.checkpoint`, so the backward pass recomputes one chunk's logits instead of storing all of
  them (memory [B, chunk, V] instead of [B, L, V], for one extra output-projection matmul).
  Returns (loss sum, token count) like `cross_entropy`.
  """
  batch, length, _ = hidden_BxLxD.shape
  if chunk_size <= 0 or chunk_size >= length:
    return cross_entropy(project(hidden_BxLxD), targets_BxL)
  if length % chunk_size:
    raise ValueError(f"sequence length {length} is not a multiple of the logits chunk size {chunk_size}.")
  chunks = length // chunk_size
  # Chunk along the sequence so each chunk keeps the batch's sharding.
  hidden_NxBxCxD = hidden_BxLxD.reshape(batch, chunks, chunk_size, -1).swapaxes(0, 1)
  targets_NxBxC = targets_BxL.reshape(batch, chunks, chunk_size).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_loss(total, chunk):
    hidden_BxCxD, targets_BxC = chunk
    loss_sum, _ = cross_entropy(project(hidden_BxCxD), targets_BxC)
    return total + loss_sum, None

  total, _ = jax.lax.scan(chunk_loss, jnp.float32(0), (hidden_NxBxCxD, targets_NxBxC))
  return total, jnp.float32(batch * length)
