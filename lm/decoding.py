"""The decode loop: one prefill over the prompt, then a scanned loop of cached decode steps.

Shape suffixes: B batch, P prompt length, T total length (P + max_new_tokens), V vocab. Nothing here
knows about devices: call `generate` inside your own `jit` (with sharded parameters if you like), or
use `make_generate_fn` for a ready-jitted function. Token choice is lm/sampling.py's; text in and out
(tokenizing, batching ragged prompts) is lm/generate.py's.
"""

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.axes import constrain
from lm.sampling import check_sampling_args, is_count, sample_logits
from lm.transformer import KVCache, Transformer

Params = dict[str, Any]
_CACHE_NAMES = ("layers", "batch", "length", "kv_heads", "kv")
_SCALE_NAMES = ("layers", "batch", "length", "kv_heads", None)  # an int8 cache's [.., G, 1] scales


def cache_logical_names(cache: KVCache) -> dict:
  """The logical axis names of every array of a KV cache (either layout), as a tree like `cache`."""
  return {name: jax.tree.map(lambda _, n=_SCALE_NAMES if name.endswith("_scale") else _CACHE_NAMES: n, arrays)
          for name, arrays in cache.items()}


def _constrain_cache(cache: KVCache) -> KVCache:
  # Without this the cache's layout is whatever propagation guesses; with it, the rule tables place
  # the cache like the keys and values the model writes into it (by batch and kv_heads).
  names = cache_logical_names(cache)
  return jax.tree.map(constrain, cache, names)


def _rebuilder(model) -> Callable[[], Any]:
  """A function returning `model`, to call inside a loop body that runs it.

  nnx refuses Variables from an outer trace inside the model's own nnx.scan, so for a Transformer
  it rebuilds the module from plain arrays instead of closing over `model`.
  """
  if not isinstance(model, nnx.Module):
    return lambda: model
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  return lambda: nnx.merge(graphdef, params)


def _stop_ids(eos_id: int | Sequence[int] | None) -> tuple[int, ...]:
  """`eos_id` as a tuple of stop ids (empty for None)."""
  return () if eos_id is None else (eos_id,) if is_count(eos_id) else tuple(eos_id)


def check_generate_args(prompt_shape: tuple[int, ...], max_new_tokens: int, max_seq_len: int) -> None:
  """Raises ValueError unless the prompt is [B, P] with P >= 1 and P + max_new_tokens <= max_seq_len."""
  if len(prompt_shape) != 2 or prompt_shape[1] < 1:
    raise ValueError(f"prompt must be int tokens [batch, prompt_len] with prompt_len >= 1, "
                     f"got shape {tuple(prompt_shape)}.")
  if not is_count(max_new_tokens) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 0.")
  total = prompt_shape[1] + max_new_tokens
  if total > max_seq_len:
    raise ValueError(
        f"prompt_len={prompt_shape[1]} + max_new_tokens={max_new_tokens} = {total} exceeds "
        f"model.max_seq_len={max_seq_len}; shorten the prompt or lower max_new_tokens.")


def check_prompt_lengths(prompt_lengths_B, batch: int, prompt_len: int) -> None:
  """Raises ValueError unless concrete `prompt_lengths_B` holds `batch` lengths in [1, prompt_len]."""
  lengths = np.asarray(prompt_lengths_B)
  if lengths.shape != (batch,):
    raise ValueError(f"prompt_lengths has shape {lengths.shape}; it needs one length per row, ({batch},).")
  if lengths.min() < 1 or lengths.max() > prompt_len:
    raise ValueError(f"prompt_lengths {lengths.tolist()} must lie in [1, {prompt_len}] (the padded "
                     "prompt width); a left-padded row of length n holds its tokens in the last n columns.")


def prefill(model: Transformer, prompt_BxP: jax.Array, cache_len: int,
            prompt_lengths_B: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
  """Runs the prompts [B, P] through the model in one call, filling a new KV cache of `cache_len` columns.

  With `prompt_lengths_B`, row b is left-padded: its tokens are the last prompt_lengths_B[b] columns,
  their positions start at 0, and no query ever attends to the padding. Returns (float32 logits [B, V]
  of each row's last prompt token, the cache).
  """
  batch, prompt_len = prompt_BxP.shape
  cache = _constrain_cache(model.init_cache(batch, cache_len))
  if prompt_lengths_B is None:
    logits_Bx1xV, cache = model.decode(prompt_BxP, cache, 0, last_only=True)
  else:
    pad_B = prompt_len - jnp.asarray(prompt_lengths_B, jnp.int32)
    positions_BxP = jnp.maximum(jnp.arange(prompt_len, dtype=jnp.int32)[None] - pad_B[:, None], 0)
    logits_Bx1xV, cache = model.decode(prompt_BxP, cache, 0, positions_BxP, pad_B, last_only=True)
  return logits_Bx1xV[:, -1], _constrain_cache(cache)


def decode_steps(model: Transformer, cache: KVCache, token_B: jax.Array, done_B: jax.Array, *,
                 start: int, steps: int, sample: Callable[[jax.Array, jax.Array], jax.Array],
                 eos_id: int | Sequence[int] | None = None,
                 pad_B: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
  """Feeds `token_B` (sitting at cache column `start`) back `steps` times, one cached step per token.

  `sample(logits_BxV, step)` picks the next tokens; `pad_B` are left-padded rows' padding widths (a
  token at column c has position c - pad). A row that is `done_B` (or emits `eos_id`, or any of several
  ids, e.g. a chat model's end-of-turn tokens) emits the first of them from then on, and the loop stops early once every row is done. Returns (int32 tokens [B, steps],
  the cache).
  """
  batch = token_B.shape[0]
  rebuild = _rebuilder(model)
  pad_B = jnp.zeros((batch,), jnp.int32) if pad_B is None else pad_B
  eos_ids = _stop_ids(eos_id)
  fill = eos_ids[0] if eos_ids else 0
  out_BxN = jnp.full((batch, steps), fill, jnp.int32)
  if steps == 0:
    return out_BxN, cache

  def body(carry):
    index, cache, token_B, done_B, out_BxN = carry
    column = start + index
    positions_Bx1 = (column - pad_B)[:, None]
    logits_Bx1xV, cache = rebuild().decode(token_B[:, None], cache, column, positions_Bx1, pad_B)
    token_B = sample(logits_Bx1xV[:, 0], index)
    if eos_ids:
      token_B = jnp.where(done_B, jnp.int32(eos_ids[0]), token_B)
      done_B = done_B | jnp.isin(token_B, jnp.asarray(eos_ids, jnp.int32))
    out_BxN = jax.lax.dynamic_update_slice(out_BxN, token_B[:, None], (0, index))
    return index + 1, _constrain_cache(cache), token_B, done_B, out_BxN

  def keep_going(carry):
    index, _, _, done_B, _ = carry
    return (index < steps) & ~jnp.all(done_B)

  carry = (jnp.int32(0), cache, token_B, done_B, out_BxN)
  _, cache, _, _, out_BxN = jax.lax.while_loop(keep_going, body, carry)
  return out_BxN, cache


def cached_log_probs(model: Transformer, tokens_BxL: jax.Array, prefix_len: int) -> jax.Array:
  """Teacher-forced log-probabilities read through the KV cache: float32 [B, L - prefix_len].

  Prefills tokens[:, :prefix_len], then feeds the true tokens one cached decode step at a time;
  entry [b, i] is log p(tokens[b, prefix_len + i] | the tokens before it). It equals a full
  forward pass's log-probabilities up to rounding, except that every prediction after the first
  reads the keys and values back from the cache, so an int8 cache (model.kv_cache_dtype) shows
  in it as it would in generation. Traceable: call it inside `jit`.
  """
  batch, length = tokens_BxL.shape
  if not 1 <= prefix_len < length or length > model.cfg.max_seq_len:
    raise ValueError(f"prefix_len={prefix_len} must be in [1, {length}) and the length {length} at most "
                     f"model.max_seq_len={model.cfg.max_seq_len}.")
  tokens_BxL = jnp.asarray(tokens_BxL, jnp.int32)
  log_prob = lambda logits_BxV, token_B: jnp.take_along_axis(
      jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1), token_B[:, None], axis=-1)[:, 0]
  logits_BxV, cache = prefill(model, tokens_BxL[:, :prefix_len], length)
  first_B = log_prob(logits_BxV, tokens_BxL[:, prefix_len])
  rebuild = _rebuilder(model)

  def step(cache, column):
    token_B = jax.lax.dynamic_index_in_dim(tokens_BxL, column, axis=1, keepdims=False)
    logits_Bx1xV, cache = rebuild().decode(token_B[:, None], cache, column)
    next_B = jax.lax.dynamic_index_in_dim(tokens_BxL, column + 1, axis=1, keepdims=False)
    return _constrain_cache(cache), log_prob(logits_Bx1xV[:, 0], next_B)

  _, rest_NxB = jax.lax.scan(step, cache, jnp.arange(prefix_len, length - 1, dtype=jnp.int32))
  return jnp.concatenate([first_B[:, None], rest_NxB.T], axis=1)


def generate(model: Transformer, prompt_BxP: jax.Array, *, max_new_tokens: int, rng: jax.Array,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | Sequence[int] | None = None,
             prompt_lengths_B: jax.Array | None = None) -> jax.Array:
  """Continues int prompts [B, P] by `max_new_tokens` sampled tokens; returns int32 tokens [B, T].

  T = P + max_new_tokens, and the first P columns are the prompt. Without `prompt_lengths_B` every row
  is a full-width prompt; with it, rows are left-padded (see `lm.generate.left_pad`) and each continues from its
  own last token at its own positions. The prompt is prefilled in one `decode` call, then a
  `lax.while_loop` runs one cached decode step per token, so tracing cost does not grow with
  `max_new_tokens`. Sampling options are as in `sample_logits`. Once a row emits `eos_id` it emits
  `eos_id` for the rest of the output (an `eos_id` inside the prompt does not count), and the loop
  ends when every row has. `eos_id` may be several ids (a chat model's end-of-turn tokens): any of
  them stops the row, which then repeats the first. Traceable: call it inside `jit`.
  """
  prompt_BxP = jnp.asarray(prompt_BxP)
  check_sampling_args(temperature, top_k, top_p)
  check_generate_args(prompt_BxP.shape, max_new_tokens, model.cfg.max_seq_len)
  if not jnp.issubdtype(prompt_BxP.dtype, jnp.integer):
    raise ValueError(f"prompt must hold integer token ids, got dtype {prompt_BxP.dtype}.")
  eos_ids = _stop_ids(eos_id)
  if not all(is_count(i) and 0 <= i < model.cfg.vocab_size for i in eos_ids):
    raise ValueError(f"eos_id={eos_id!r}: must be token ids in [0, {model.cfg.vocab_size}) or None.")
  batch, prompt_len = prompt_BxP.shape
  if prompt_lengths_B is not None:
    try:  # concrete lengths are checked here; traced ones (inside jit) cannot be
      concrete = np.asarray(prompt_lengths_B)
    except jax.errors.TracerArrayConversionError:
      concrete = None
    if concrete is not None:
      check_prompt_lengths(concrete, batch, prompt_len)
  prompt_BxP = prompt_BxP.astype(jnp.int32)
  if max_new_tokens == 0:
    return prompt_BxP
  sample = sampler(rng, temperature=temperature, top_k=top_k, top_p=top_p)
  logits_BxV, cache = prefill(model, prompt_BxP, prompt_len + max_new_tokens, prompt_lengths_B)
  new_BxN, _ = continue_decoding(model, cache, logits_BxV, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                                 sample=sample, eos_id=eos_id, prompt_lengths_B=prompt_lengths_B)
  return jnp.concatenate([prompt_BxP, new_BxN], axis=1)


def sampler(rng: jax.Array, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Callable:
  """`sample(logits_BxV, step) -> int32 tokens [B]`: step i draws with fold_in(rng, i)."""
  return lambda logits_BxV, step: sample_logits(
      logits_BxV, jax.random.fold_in(rng, step), temperature=temperature, top_k=top_k, top_p=top_p)


def continue_decoding(model: Transformer, cache: KVCache, logits_BxV: jax.Array, *, prompt_len: int,
                      max_new_tokens: int, sample: Callable, eos_id: int | Sequence[int] | None = None,
                      prompt_lengths_B: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
  """The tokens after a prefill: samples the first from the prefill's `logits_BxV` (step 0), then
  runs `max_new_tokens - 1` cached decode steps (`decode_steps`). Returns (int32 [B, max_new_tokens],
  the cache: returning it lets a caller that donates the input cache update it in place)."""
  batch = logits_BxV.shape[0]
  eos_ids = _stop_ids(eos_id)
  first_B = sample(logits_BxV, 0)
  done_B = jnp.zeros((batch,), bool)
  if eos_ids:
    done_B = jnp.isin(first_B, jnp.asarray(eos_ids, jnp.int32))
  pad_B = None if prompt_lengths_B is None else prompt_len - jnp.asarray(prompt_lengths_B, jnp.int32)
  # Step i of the loop samples with fold_in(rng, i + 1): the same stream as one token per step.
  rest_BxN, cache = decode_steps(model, cache, first_B, done_B, start=prompt_len, steps=max_new_tokens - 1,
                                 sample=lambda logits, i: sample(logits, i + 1), eos_id=eos_id, pad_B=pad_B)
  return jnp.concatenate([first_B[:, None], rest_BxN], axis=1), cache


def build_model(graphdef: nnx.GraphDef, params: Params) -> Transformer:
  """The model `generate` runs: `nnx.merge(graphdef, params)` for a Transformer's graphdef (which
  carries its attention plan and layout: stacked, or per layer for serving, lm/serving.py)."""
  return nnx.merge(graphdef, params)


def make_generate_fn(graphdef: nnx.GraphDef, *, max_new_tokens: int, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0,
                     eos_id: int | Sequence[int] | None = None) -> Callable[..., jax.Array]:
  """Returns a jitted `fn(params, prompt_BxP, rng, prompt_lengths_B=None) -> tokens [B, P + max_new_tokens]`
  for one device or arrays already placed (no shardings of its own; a run plan's sharded programs
  are launch/run/programs.py's).

  `graphdef` and `params` rebuild the model inside jit (`build_model`): a Transformer's graphdef with
  its nested-dict params (`nnx.split` + `nnx.to_pure_dict`, or a `ModelDef`'s), in either layout.
  `prompt_lengths_B` marks left-padded rows (`generate`). Sampling arguments are checked here,
  before anything compiles; `fn` compiles once per prompt shape and never per token.
  """
  check_sampling_args(temperature, top_k, top_p)
  if not is_count(max_new_tokens) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 0.")

  def fn(params: Params, prompt_BxP: jax.Array, rng: jax.Array,
         prompt_lengths_B: jax.Array | None = None) -> jax.Array:
    return generate(build_model(graphdef, params), prompt_BxP, max_new_tokens=max_new_tokens, rng=rng,
                    temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                    prompt_lengths_B=prompt_lengths_B)

  return jax.jit(fn)
