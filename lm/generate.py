"""Autoregressive text generation: one prefill over the prompt, then a scanned loop of cached decode steps.

Shape suffixes: B batch, P prompt length, T total length (P + max_new_tokens), V vocab, C candidates
(the tokens that survive top-k). Nothing here knows about devices: call `generate` inside your own
`jit` (with sharded parameters if you like), or use `make_generate_fn` for a ready-jitted function.
"""

import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.axes import constrain
from lm.transformer import KVCache, Transformer, init_cache

Params = dict[str, Any]
_CACHE_NAMES = ("layers", "batch", "length", "kv_heads", "kv")


def _is_count(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _constrain_cache(cache: KVCache) -> KVCache:
  # Without this the cache's layout is whatever propagation guesses; with it, the rule tables place
  # the cache like the keys and values the model writes into it (by batch and kv_heads).
  return {name: constrain(x, _CACHE_NAMES) for name, x in cache.items()}


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
  """Raises ValueError unless temperature >= 0, top_k >= 0 and 0 < top_p <= 1 (all Python numbers)."""
  for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
    if isinstance(value, jax.Array):
      raise ValueError(f"{name} must be a Python number (it changes the program), got an array; "
                       "pass it as a static argument.")
  if temperature < 0:
    raise ValueError(f"temperature={temperature}: must be >= 0 (0 means greedy argmax).")
  if not _is_count(top_k) or top_k < 0:
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


def check_generate_args(prompt_shape: tuple[int, ...], max_new_tokens: int, max_seq_len: int) -> None:
  """Raises ValueError unless the prompt is [B, P] with P >= 1 and P + max_new_tokens <= max_seq_len."""
  if len(prompt_shape) != 2 or prompt_shape[1] < 1:
    raise ValueError(f"prompt must be int tokens [batch, prompt_len] with prompt_len >= 1, "
                     f"got shape {tuple(prompt_shape)}.")
  if not _is_count(max_new_tokens) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 0.")
  total = prompt_shape[1] + max_new_tokens
  if total > max_seq_len:
    raise ValueError(
        f"prompt_len={prompt_shape[1]} + max_new_tokens={max_new_tokens} = {total} exceeds "
        f"model.max_seq_len={max_seq_len}; shorten the prompt or lower max_new_tokens.")


def generate(model: Transformer, prompt_BxP: jax.Array, *, max_new_tokens: int, rng: jax.Array,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | Sequence[int] | None = None) -> jax.Array:
  """Continues int prompts [B, P] by `max_new_tokens` sampled tokens; returns int32 tokens [B, T].

  T = P + max_new_tokens, and the first P columns are the prompt. Every row shares the prompt length P
  (no padding inside prompts). The prompt is prefilled in one `decode` call, then a `lax.scan` runs
  one cached decode step per token, so tracing cost does not grow with `max_new_tokens`. Sampling
  options are as in `sample_logits`. Once a row emits `eos_id` it emits `eos_id` for the rest of the
  output (an `eos_id` inside the prompt does not count). `eos_id` may be several ids (a chat model's
  end-of-turn tokens): any of them stops the row, which then repeats the first. Traceable: call it
  inside `jit`.
  """
  prompt_BxP = jnp.asarray(prompt_BxP)
  check_sampling_args(temperature, top_k, top_p)
  check_generate_args(prompt_BxP.shape, max_new_tokens, model.cfg.max_seq_len)
  if not jnp.issubdtype(prompt_BxP.dtype, jnp.integer):
    raise ValueError(f"prompt must hold integer token ids, got dtype {prompt_BxP.dtype}.")
  eos_ids = () if eos_id is None else (eos_id,) if _is_count(eos_id) else tuple(eos_id)
  if not all(_is_count(i) and 0 <= i < model.cfg.vocab_size for i in eos_ids):
    raise ValueError(f"eos_id={eos_id!r}: must be token ids in [0, {model.cfg.vocab_size}) or None.")
  prompt_BxP = prompt_BxP.astype(jnp.int32)
  if max_new_tokens == 0:
    return prompt_BxP
  batch, prompt_len = prompt_BxP.shape
  sample = lambda logits_BxV, step: sample_logits(
      logits_BxV, jax.random.fold_in(rng, step), temperature=temperature, top_k=top_k, top_p=top_p)

  def stop_after_eos(token_B, done_B):
    if not eos_ids:
      return token_B, done_B
    token_B = jnp.where(done_B, jnp.int32(eos_ids[0]), token_B)
    return token_B, done_B | jnp.isin(token_B, jnp.asarray(eos_ids, jnp.int32))

  cache = _constrain_cache(init_cache(model.cfg, batch, prompt_len + max_new_tokens))
  logits_BxPxV, cache = model.decode(prompt_BxP, cache, 0)
  first_B, done_B = stop_after_eos(sample(logits_BxPxV[:, -1], 0), jnp.zeros((batch,), bool))

  # nnx refuses Variables from an outer trace inside the model's own nnx.scan, so the step body
  # rebuilds the module from plain arrays instead of closing over `model`.
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)

  def step(carry, index):
    cache, token_B, done_B = carry
    # `token_B` was generated at position prompt_len + index; its logits predict the next one.
    step_model = nnx.merge(graphdef, params)
    logits_Bx1xV, cache = step_model.decode(token_B[:, None], cache, prompt_len + index)
    cache = _constrain_cache(cache)
    token_B, done_B = stop_after_eos(sample(logits_Bx1xV[:, 0], index + 1), done_B)
    return (cache, token_B, done_B), token_B

  steps = jnp.arange(max_new_tokens - 1, dtype=jnp.int32)
  _, rest_NxB = jax.lax.scan(step, (cache, first_B, done_B), steps)
  return jnp.concatenate([prompt_BxP, first_B[:, None], rest_NxB.T], axis=1)


def make_generate_fn(graphdef: nnx.GraphDef, *, max_new_tokens: int, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0,
                     eos_id: int | Sequence[int] | None = None) -> Callable[[Params, jax.Array, jax.Array], jax.Array]:
  """Returns a jitted `fn(params, prompt_BxP, rng) -> tokens [B, P + max_new_tokens]`.

  `graphdef` and `params` (a nested dict, e.g. `nnx.split` + `nnx.to_pure_dict`, or a `ModelDef`'s
  `graphdef` with its params) rebuild the model inside jit. Sampling arguments are checked here,
  before anything compiles; `fn` compiles once per prompt shape and never per token.
  """
  check_sampling_args(temperature, top_k, top_p)
  if not _is_count(max_new_tokens) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 0.")

  def fn(params: Params, prompt_BxP: jax.Array, rng: jax.Array) -> jax.Array:
    return generate(nnx.merge(graphdef, params), prompt_BxP, max_new_tokens=max_new_tokens, rng=rng,
                    temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id)

  return jax.jit(fn)


def generate_text(graphdef: nnx.GraphDef, params: Params, tokenizer, prompts: list[str], *, max_seq_len: int,
                  max_new_tokens: int, temperature: float, top_k: int = 0, top_p: float = 1.0,
                  seed: int = 0, stop_ids: Sequence[int] = (), echo: bool = True) -> list[str]:
  """Returns one continuation per prompt string (prompt text included), sampled with the KV cache.

  `tokenizer` has encode / decode / eos_id (lm.data.tokenizer). Prompts run one at a time so that
  each keeps its own length (batched rows share a length). Raises ValueError for a prompt that is
  empty or leaves no room for `max_new_tokens` within `max_seq_len`. Generation stops at the
  tokenizer's EOS or any of `stop_ids` (a chat model's end-of-turn tokens); `echo=False` returns
  the continuations without their prompts.
  """
  check_sampling_args(temperature, top_k, top_p)
  stops = tuple(dict.fromkeys((tokenizer.eos_id, *stop_ids)))
  fn = make_generate_fn(graphdef, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, eos_id=stops)
  outputs = []
  for i, prompt in enumerate(prompts):
    ids = tokenizer.encode(prompt)
    limit = max_seq_len - max_new_tokens
    if not ids or len(ids) > limit:
      raise ValueError(f"prompt {prompt[:40]!r} has {len(ids)} tokens; it needs 1 to {limit} "
                       f"(model.max_seq_len={max_seq_len} minus max_new_tokens).")
    tokens_1xT = fn(params, np.asarray([ids], np.int32), jax.random.key(seed + i))
    generated = [int(t) for t in np.asarray(tokens_1xT[0, len(ids):])]
    ends = [i for i, t in enumerate(generated) if t in stops]
    generated = generated[:ends[0]] if ends else generated
    outputs.append((prompt if echo else "") + tokenizer.decode(generated))
  return outputs
