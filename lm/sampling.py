"""Choosing the next token from logits: temperature, top-k and nucleus (top-p) sampling, or greedy.

Shape suffixes: B batch, V vocab, C candidates (the tokens that survive top-k).
"""

import numbers

import jax
import jax.numpy as jnp


def is_count(value) -> bool:
  """True for a Python (or NumPy) integer that is not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
  """Raises ValueError unless temperature >= 0, top_k >= 0 and 0 < top_p <= 1 (all Python numbers)."""
  for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
    if isinstance(value, jax.Array):
      raise ValueError(f"{name} must be a Python number (it changes the program), got an array; "
                       "pass it as a static argument.")
  if temperature < 0:
    raise ValueError(f"temperature={temperature}: must be >= 0 (0 means greedy argmax).")
  if not is_count(top_k) or top_k < 0:
    raise ValueError(f"top_k={top_k!r}: must be an integer >= 0 (0 keeps the whole vocabulary).")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p}: must be in (0, 1] (1 disables nucleus filtering).")


def _candidates(logits_BxV: jax.Array, temperature: float, top_k: int,
                top_p: float) -> tuple[jax.Array, jax.Array | None]:
  """Returns (scaled logits [B, C] with filtered entries at -inf, their vocab ids [B, C] or None).

  The ids are None when no filter is active (C = V, in vocabulary order). Otherwise the candidates
  are sorted by decreasing logit, lowest id first among ties, so candidate 0 is the argmax.
  """
  # Float32 throughout: temperature scaling and the nucleus cumsum are too coarse in bf16.
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  vocab = logits_BxV.shape[-1]
  if top_k == 0 and top_p == 1:
    return logits_BxV, None
  num = vocab if top_k == 0 else min(top_k, vocab)
  values_BxC, ids_BxC = jax.lax.top_k(logits_BxV, num)
  if top_p < 1:
    probs_BxC = jax.nn.softmax(values_BxC, axis=-1)
    mass_before_BxC = jnp.cumsum(probs_BxC, axis=-1) - probs_BxC
    # Keeping every candidate whose preceding mass is < top_p gives the smallest prefix with
    # mass >= top_p, and always keeps candidate 0 (its preceding mass is 0).
    values_BxC = jnp.where(mass_before_BxC < top_p, values_BxC, -jnp.inf)
  return values_BxC, ids_BxC


def filter_logits(logits_BxV: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Returns the float32 logits [B, V] that `sample_logits` draws from: divided by `temperature`,
  with tokens outside the top-k / nucleus set to -inf. `temperature` must be > 0 here.
  """
  check_sampling_args(temperature, top_k, top_p)
  if temperature == 0:
    raise ValueError("temperature=0 is greedy decoding and has no distribution to filter; "
                     "use sample_logits, or a temperature > 0.")
  values_BxC, ids_BxC = _candidates(logits_BxV, temperature, top_k, top_p)
  if ids_BxC is None:
    return values_BxC
  filtered_BxV = jnp.full(logits_BxV.shape, -jnp.inf, jnp.float32)
  return jnp.put_along_axis(filtered_BxV, ids_BxC, values_BxC, axis=-1, inplace=False)


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Draws one token per row from logits [B, V]; returns int32 tokens [B].

  `temperature` 0 is greedy (argmax, lowest id among ties; `rng` is unused). Otherwise the logits are
  divided by `temperature`, then `top_k` > 0 keeps the k largest, then `top_p` < 1 keeps the smallest
  set of those whose renormalized probability mass is >= top_p (always at least the top token).
  All three are Python numbers, fixed at trace time; the math is float32.
  """
  check_sampling_args(temperature, top_k, top_p)
  if logits_BxV.ndim != 2:
    raise ValueError(f"sample_logits takes logits [B, V], got shape {logits_BxV.shape}.")
  if temperature == 0:
    return jnp.argmax(logits_BxV.astype(jnp.float32), axis=-1).astype(jnp.int32)
  values_BxC, ids_BxC = _candidates(logits_BxV, temperature, top_k, top_p)
  choice_B = jax.random.categorical(rng, values_BxC, axis=-1)
  if ids_BxC is not None:
    choice_B = jnp.take_along_axis(ids_BxC, choice_B[:, None], axis=-1)[:, 0]
  return choice_B.astype(jnp.int32)
