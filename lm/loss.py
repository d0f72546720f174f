"""Next-token cross-entropy, computed in float32."""

import jax
import jax.numpy as jnp


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                  weights_BxL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Returns (sum of per-token negative log-likelihoods, number of weighted tokens), both float32 scalars.

  Sums, not means, so that gradient accumulation and multi-host averaging divide once by the true
  token count.
  """
  logits = logits_BxLxV.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  nll_BxL = log_z_BxL - target_logit_BxL
  if weights_BxL is None:
    weights_BxL = jnp.ones_like(nll_BxL)
  weights_BxL = weights_BxL.astype(jnp.float32)
  return jnp.sum(nll_BxL * weights_BxL), jnp.sum(weights_BxL)
