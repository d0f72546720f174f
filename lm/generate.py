"""Text in and out: prompts are tokenized, left-padded into batches of few shapes, run through the
decode loop (lm/decoding.py), and their continuations decoded back to text.

Shape suffixes: B batch, P padded prompt width, T total length.
"""

from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from lm.decoding import make_generate_fn
from lm.sampling import is_count

Params = dict[str, Any]


def left_pad(prompts: list[list[int]], width: int | None = None, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists into (int32 [B, width], int32 lengths [B]); width defaults to the longest."""
  if not prompts or min(len(p) for p in prompts) < 1:
    raise ValueError("every prompt needs at least one token.")
  width = width or max(len(p) for p in prompts)
  if max(len(p) for p in prompts) > width:
    raise ValueError(f"a prompt of {max(len(p) for p in prompts)} tokens does not fit width={width}.")
  tokens_BxP = np.full((len(prompts), width), pad_id, np.int32)
  for row, ids in enumerate(prompts):
    tokens_BxP[row, width - len(ids):] = ids
  return tokens_BxP, np.asarray([len(p) for p in prompts], np.int32)


def _bucket(length: int, limit: int) -> int:
  """The padded prompt width for `length` tokens: the next power of two (>= 16), at most `limit`."""
  width = 16
  while width < length:
    width *= 2
  return min(width, limit)


# build(eos_ids) -> fn(prompt_BxP, rng, lengths_B) -> int tokens [B, P + max_new_tokens]: the
# generation programs, with every sampling choice but the stop ids already made (`local_generator`
# for one device; launch/run/programs.text_generator for a run plan's sharded programs).
GeneratorFactory = Callable[[Sequence[int]], Callable[..., Any]]


def local_generator(graphdef: nnx.GraphDef, params: Params, *, max_new_tokens: int, temperature: float,
                    top_k: int = 0, top_p: float = 1.0) -> GeneratorFactory:
  """A GeneratorFactory over `lm.decoding.make_generate_fn` (one device, or arrays already placed)."""
  def build(eos_ids):
    fn = make_generate_fn(graphdef, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, eos_id=tuple(eos_ids))
    return lambda prompt_BxP, rng, lengths_B: fn(params, prompt_BxP, rng, lengths_B)
  return build


def stream_text(generator: GeneratorFactory, tokenizer, prompts: list[str], *, max_seq_len: int,
                max_new_tokens: int, seed: int = 0, batch_size: int = 8, stop_ids: Sequence[int] = (),
                echo: bool = True) -> Iterator[tuple[int, str]]:
  """Yields (prompt index, continuation with the prompt text) as each batch of prompts finishes.

  `generator(eos_ids)` returns the function that generates a batch (GeneratorFactory: sampling is
  chosen there, for `max_new_tokens` new tokens). `tokenizer` has encode / decode / eos_id
  (lm.data.tokenizer). Prompts of different lengths share a batch: they are left-padded to a
  power-of-two width (so few shapes compile), each row continues at its own positions and stops at
  its own EOS. Every prompt is checked before anything compiles: ValueError for one that is empty or
  leaves no room for `max_new_tokens` within `max_seq_len`. A row also stops at any of `stop_ids` (a
  chat model's end-of-turn tokens); `echo=False` yields the continuations without their prompts.
  """
  if not is_count(batch_size) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1.")
  limit = max_seq_len - max_new_tokens
  encoded = [tokenizer.encode(prompt) for prompt in prompts]
  for prompt, ids in zip(prompts, encoded):
    if not ids or len(ids) > limit:
      raise ValueError(f"prompt {prompt[:40]!r} has {len(ids)} tokens; it needs 1 to {limit} "
                       f"(model.max_seq_len={max_seq_len} minus max_new_tokens).")
  stops = tuple(dict.fromkeys((tokenizer.eos_id, *stop_ids)))
  fn = generator(stops)
  for first in range(0, len(prompts), batch_size):
    rows = encoded[first:first + batch_size]
    width = _bucket(max(len(ids) for ids in rows), limit)
    tokens_BxP, lengths_B = left_pad(rows, width)
    tokens_BxT = np.asarray(fn(tokens_BxP, jax.random.key(seed + first), lengths_B))
    for row in range(len(rows)):
      generated = [int(t) for t in tokens_BxT[row, width:]]
      ends = [i for i, t in enumerate(generated) if t in stops]
      generated = generated[:ends[0]] if ends else generated
      yield first + row, (prompts[first + row] if echo else "") + tokenizer.decode(generated)


def generate_text(generator: GeneratorFactory, tokenizer, prompts: list[str], **kwargs) -> list[str]:
  """Returns one continuation per prompt string (prompt text included unless `echo=False`), in
  order; arguments as `stream_text`'s."""
  texts = [""] * len(prompts)
  for index, text in stream_text(generator, tokenizer, prompts, **kwargs):
    texts[index] = text
  return texts
