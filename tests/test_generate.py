"""Tests for lm/sampling.py, lm/decoding.py and lm/generate.py: cached decoding against the full forward, greedy generation against a naive
re-run-everything loop, and the sampling filters against NumPy references.

Every jitted function is compiled once per module (module-scoped fixtures); argument checks use
`jax.eval_shape`, which traces without compiling.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import decoding, sampling
from lm import generate as gen_lib
from lm import attention, kv_cache, serving
from launch.run.config import model_config
from lm.attention_plan import unplanned
from lm.model_def import define
from lm.transformer import Transformer, init_cache


def serving_graphdef(cfg):
  """The serving layout's graphdef (one Block per layer) of `cfg`'s model."""
  return define(cfg, unplanned(cfg.attention), per_layer=True).graphdef

nnx.use_eager_sharding(False)

TINY = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=64, max_seq_len=32)
VARIANTS = {
    "gqa_tied": {},
    "gqa_untied": dict(tie_embeddings=False),
    "mha_untied": dict(num_kv_heads=4, tie_embeddings=False),
}
BATCH, PROMPT_LEN, NEW_TOKENS = 3, 5, 12


def _build(**overrides):
  """Returns (cfg, graphdef, params dict) of a freshly initialized tiny model."""
  cfg = model_config(**{**TINY, **overrides})
  graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0), attention=unplanned(cfg.attention)))
  return cfg, graphdef, nnx.to_pure_dict(state)


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward(graphdef, params, tokens_BxL):
  return nnx.merge(graphdef, params)(tokens_BxL)


@functools.partial(jax.jit, static_argnames=("graphdef", "prefill_len"))
def _full_and_cached_logits(graphdef, params, tokens_BxL, prefill_len):
  """Logits [B, L, V] of the full forward, and from one prefill of `prefill_len` tokens followed by
  one cached decode step per token (one program, so one compile per model)."""
  model = nnx.merge(graphdef, params)
  batch, length = tokens_BxL.shape
  cache = init_cache(model.cfg, batch)  # longer than L: unwritten slots must stay masked
  prefill_BxPxV, cache = model.decode(tokens_BxL[:, :prefill_len], cache, 0)

  def step(cache, index):
    token_Bx1 = jax.lax.dynamic_slice_in_dim(tokens_BxL, index, 1, axis=1)
    logits_Bx1xV, cache = nnx.merge(graphdef, params).decode(token_Bx1, cache, index)
    return cache, logits_Bx1xV[:, 0]

  _, rest_NxBxV = jax.lax.scan(step, cache, jnp.arange(prefill_len, length))
  cached_BxLxV = jnp.concatenate([prefill_BxPxV, rest_NxBxV.transpose(1, 0, 2)], axis=1)
  return model(tokens_BxL), cached_BxLxV


@pytest.fixture(scope="module")
def tiny():
  return _build(tie_embeddings=False)


@pytest.fixture(scope="module")
def prompt_BxP():
  return jax.random.randint(jax.random.key(1), (BATCH, PROMPT_LEN), 0, TINY["vocab_size"], jnp.int32)


@pytest.fixture(scope="module")
def greedy_BxT(tiny, prompt_BxP):
  _, graphdef, params = tiny
  fn = decoding.make_generate_fn(graphdef, max_new_tokens=NEW_TOKENS, temperature=0.0)
  return np.asarray(fn(params, prompt_BxP, jax.random.key(0)))


# ---- KV-cache decoding ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_decode_matches_full_forward(variant):
  _, graphdef, params = _build(**VARIANTS[variant])
  tokens_BxL = jax.random.randint(jax.random.key(2), (BATCH, 20), 0, TINY["vocab_size"], jnp.int32)
  full_BxLxV, cached_BxLxV = _full_and_cached_logits(graphdef, params, tokens_BxL, prefill_len=7)
  assert cached_BxLxV.dtype == jnp.float32
  np.testing.assert_allclose(cached_BxLxV, full_BxLxV, atol=1e-5, rtol=0)


# ---- generate -------------------------------------------------------------------------------------

def test_greedy_matches_naive_full_forward_loop(tiny, prompt_BxP, greedy_BxT):
  cfg, graphdef, params = tiny
  # Right-padding to max_seq_len keeps one compiled shape; causality makes the padding invisible.
  tokens_BxS = np.zeros((BATCH, cfg.max_seq_len), np.int32)
  tokens_BxS[:, :PROMPT_LEN] = np.asarray(prompt_BxP)
  for t in range(PROMPT_LEN, PROMPT_LEN + NEW_TOKENS):
    logits_BxSxV = np.asarray(_forward(graphdef, params, jnp.asarray(tokens_BxS)))
    tokens_BxS[:, t] = logits_BxSxV[:, t - 1].argmax(-1)
  assert greedy_BxT.shape == (BATCH, PROMPT_LEN + NEW_TOKENS)
  assert greedy_BxT.dtype == np.int32
  np.testing.assert_array_equal(greedy_BxT, tokens_BxS[:, :PROMPT_LEN + NEW_TOKENS])


def test_top_k_1_generation_equals_greedy(tiny, prompt_BxP, greedy_BxT):
  _, graphdef, params = tiny
  fn = decoding.make_generate_fn(graphdef, max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=1)
  np.testing.assert_array_equal(fn(params, prompt_BxP, jax.random.key(7)), greedy_BxT)


def test_rows_emit_only_eos_after_eos(tiny, prompt_BxP, greedy_BxT):
  _, graphdef, params = tiny
  generated_BxN = greedy_BxT[:, PROMPT_LEN:]
  eos = int(np.bincount(generated_BxN.ravel()).argmax())  # the most frequent, so some row hits it
  fn = decoding.make_generate_fn(graphdef, max_new_tokens=NEW_TOKENS, temperature=0.0, eos_id=eos)
  with_eos_BxT = np.asarray(fn(params, prompt_BxP, jax.random.key(0)))
  for row in range(BATCH):
    hits = np.flatnonzero(generated_BxN[row] == eos)
    stop = PROMPT_LEN + (hits[0] if hits.size else NEW_TOKENS)
    np.testing.assert_array_equal(with_eos_BxT[row, :stop + 1], greedy_BxT[row, :stop + 1])
    assert (with_eos_BxT[row, stop:] == eos).all()
  # Non-trivial: some row would have emitted other tokens after its eos.
  assert (with_eos_BxT != greedy_BxT).any()


def _count_decode_calls(monkeypatch) -> list[int]:
  calls = []
  original = Transformer.decode
  monkeypatch.setattr(Transformer, "decode", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
  return calls


def test_decode_is_traced_twice_whatever_the_length(tiny, monkeypatch):
  cfg, graphdef, params = tiny
  calls = _count_decode_calls(monkeypatch)
  for new_tokens in (2, cfg.max_seq_len - PROMPT_LEN):  # the second fills max_seq_len exactly
    calls.clear()
    fn = decoding.make_generate_fn(graphdef, max_new_tokens=new_tokens, temperature=0.7)
    out = jax.eval_shape(fn, params, jnp.zeros((1, PROMPT_LEN), jnp.int32), jax.random.key(0))
    assert out.shape == (1, PROMPT_LEN + new_tokens)
    assert len(calls) == 2  # the prefill and the scanned step, never once per token


def test_sampling_is_seeded_and_compiles_once(tiny, prompt_BxP, monkeypatch):
  _, graphdef, params = tiny
  calls = _count_decode_calls(monkeypatch)
  fn = decoding.make_generate_fn(graphdef, max_new_tokens=NEW_TOKENS, temperature=1.5, top_p=0.95)
  first, again, other = (np.asarray(fn(params, prompt_BxP, jax.random.key(s))) for s in (3, 3, 4))
  fn(jax.tree.map(lambda p: p * 2, params), prompt_BxP + 1, jax.random.key(5))
  assert len(calls) == 2  # one trace (prefill + step) served all four calls
  np.testing.assert_array_equal(first, again)
  assert (first != other).any()
  np.testing.assert_array_equal(first[:, :PROMPT_LEN], prompt_BxP)
  assert first.min() >= 0 and first.max() < TINY["vocab_size"]


def test_zero_new_tokens_returns_the_prompt(tiny, prompt_BxP):
  _, graphdef, params = tiny
  out = decoding.generate(nnx.merge(graphdef, params), prompt_BxP, max_new_tokens=0,
                         rng=jax.random.key(0))
  np.testing.assert_array_equal(out, prompt_BxP)


def test_too_long_raises_before_compiling(tiny):
  cfg, graphdef, params = tiny
  fn = decoding.make_generate_fn(graphdef, max_new_tokens=cfg.max_seq_len - 4)
  with pytest.raises(ValueError, match="max_seq_len=32"):
    jax.eval_shape(fn, params, jnp.zeros((2, 5), jnp.int32), jax.random.key(0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2, temperature=-0.5), "temperature"),
    (dict(max_new_tokens=2, top_k=-1), "top_k"),
    (dict(max_new_tokens=2, top_p=0.0), "top_p"),
    (dict(max_new_tokens=2, top_p=1.5), "top_p"),
])
def test_make_generate_fn_validates(tiny, kwargs, match):
  with pytest.raises(ValueError, match=match):
    decoding.make_generate_fn(tiny[1], **kwargs)


@pytest.mark.parametrize("prompt, kwargs, match", [
    (jnp.zeros((4,), jnp.int32), {}, "prompt"),
    (jnp.zeros((2, 0), jnp.int32), {}, "prompt_len >= 1"),
    (jnp.zeros((2, 3), jnp.float32), {}, "integer"),
    (jnp.zeros((2, 3), jnp.int32), dict(eos_id=61), "eos_id"),
])
def test_generate_validates(tiny, prompt, kwargs, match):
  cfg, graphdef, params = tiny
  run = lambda p: decoding.generate(nnx.merge(graphdef, p), prompt, max_new_tokens=2,
                                   rng=jax.random.key(0), **kwargs)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(run, params)


# ---- serving many prompts: left padding, per-row EOS, serving dtype -------------------------------

RAGGED = [[5, 9, 2], [7, 7, 1, 4, 30, 12, 8], [11], [3, 3, 3, 3, 3]]


def _one_by_one(graphdef, params, fn_kwargs, prompts):
  fn = decoding.make_generate_fn(graphdef, **fn_kwargs)
  return [np.asarray(fn(params, np.asarray([ids], np.int32), jax.random.key(0)))[0, len(ids):]
          for ids in prompts]


def test_left_padded_batch_equals_one_by_one_greedy(tiny):
  _, graphdef, params = tiny
  kwargs = dict(max_new_tokens=NEW_TOKENS, temperature=0.0)
  tokens_BxP, lengths_B = gen_lib.left_pad(RAGGED, width=8, pad_id=0)
  assert tokens_BxP[2].tolist() == [0] * 7 + [11] and lengths_B.tolist() == [3, 7, 1, 5]
  batched_BxT = np.asarray(decoding.make_generate_fn(graphdef, **kwargs)(
      params, tokens_BxP, jax.random.key(0), lengths_B))
  np.testing.assert_array_equal(batched_BxT[:, :8], tokens_BxP)
  for row, alone_N in enumerate(_one_by_one(graphdef, params, kwargs, RAGGED)):
    np.testing.assert_array_equal(batched_BxT[row, 8:], alone_N)


def test_each_row_stops_at_its_own_eos_in_a_padded_batch(tiny):
  _, graphdef, params = tiny
  free = _one_by_one(graphdef, params, dict(max_new_tokens=NEW_TOKENS, temperature=0.0), RAGGED)
  eos = int(np.bincount(np.concatenate(free)).argmax())  # the most frequent, so some row hits it
  kwargs = dict(max_new_tokens=NEW_TOKENS, temperature=0.0, eos_id=eos)
  tokens_BxP, lengths_B = gen_lib.left_pad(RAGGED)
  batched_BxN = np.asarray(decoding.make_generate_fn(graphdef, **kwargs)(
      params, tokens_BxP, jax.random.key(0), lengths_B))[:, tokens_BxP.shape[1]:]
  alone = _one_by_one(graphdef, params, kwargs, RAGGED)
  stopped = 0
  for row in range(len(RAGGED)):
    np.testing.assert_array_equal(batched_BxN[row], alone[row])
    hits = np.flatnonzero(free[row] == eos)
    if hits.size:
      stopped += 1
      np.testing.assert_array_equal(batched_BxN[row, :hits[0]], free[row][:hits[0]])
      assert (batched_BxN[row, hits[0]:] == eos).all()
    else:
      np.testing.assert_array_equal(batched_BxN[row], free[row])
  assert 0 < stopped


def test_loop_stops_once_every_row_is_done(tiny, prompt_BxP):
  cfg, graphdef, params = tiny
  model = nnx.merge(graphdef, params)
  logits_BxV, cache = decoding.prefill(model, prompt_BxP, cfg.max_seq_len)
  calls = []

  def sample(logits_BxV, step):
    # The body is traced once; a host callback counts the steps that actually run.
    jax.debug.callback(lambda s: calls.append(int(s)), step)
    return jnp.full(logits_BxV.shape[:1], 4, jnp.int32)

  out_BxN, _ = decoding.decode_steps(model, cache, jnp.zeros((BATCH,), jnp.int32),
                                    jnp.zeros((BATCH,), bool), start=PROMPT_LEN, steps=10,
                                    sample=sample, eos_id=4)
  jax.effects_barrier()
  assert calls == [0]  # every row emitted eos at step 0, so step 1 never ran
  assert (np.asarray(out_BxN) == 4).all()


def test_left_pad_validates():
  with pytest.raises(ValueError, match="at least one token"):
    gen_lib.left_pad([[1], []])
  with pytest.raises(ValueError, match="width=2"):
    gen_lib.left_pad([[1, 2, 3]], width=2)


def test_generate_validates_prompt_lengths(tiny):
  _, graphdef, params = tiny
  with pytest.raises(ValueError, match=r"must lie in \[1, 4\]"):
    jax.eval_shape(lambda p: decoding.generate(nnx.merge(graphdef, p), jnp.zeros((2, 4), jnp.int32),
                                              max_new_tokens=2, rng=jax.random.key(0),
                                              prompt_lengths_B=np.array([0, 4])), params)


def test_serving_params_casts_weight_matrices_only(tiny):
  _, _, params = tiny
  served = serving.serving_params(params, jnp.bfloat16)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(served)}
  assert flat["['embed']['table']"].dtype == jnp.bfloat16
  assert flat["['layers'][1]['mlp']['up']['kernel']"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(flat["['layers'][1]['mlp']['up']['kernel']"],
                                params["blocks"]["mlp"]["up"]["kernel"][1].astype(jnp.bfloat16))
  assert flat["['final_norm']['scale']"].dtype == jnp.float32
  assert "blocks" not in served


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_serving_model_generates_what_the_transformer_does(variant, prompt_BxP):
  cfg, graphdef, params = _build(**VARIANTS[variant])
  kwargs = dict(max_new_tokens=NEW_TOKENS, temperature=0.0)
  tokens_BxP, lengths_B = gen_lib.left_pad(RAGGED)
  expected = decoding.make_generate_fn(graphdef, **kwargs)(params, tokens_BxP, jax.random.key(0), lengths_B)
  served = decoding.make_generate_fn(serving_graphdef(cfg), **kwargs)(serving.serving_params(params), tokens_BxP,
                                                   jax.random.key(0), lengths_B)
  np.testing.assert_array_equal(served, expected)
  # And its logits equal the full forward's (so the fast path is the same model, not a lookalike).
  model = nnx.merge(serving_graphdef(cfg), serving.serving_params(params))
  logits_BxV, _ = jax.jit(lambda: decoding.prefill(model, prompt_BxP, cfg.max_seq_len))()
  np.testing.assert_allclose(logits_BxV, _forward(graphdef, params, prompt_BxP)[:, -1], atol=1e-5, rtol=0)


def test_stream_text_batches_ragged_prompts_like_one_at_a_time(tiny):
  from lm.data.tokenizer import ByteTokenizer
  _, graphdef, params = tiny
  tok = ByteTokenizer()  # ids up to 258 exceed the tiny vocab of 61: use only low bytes
  prompts = ["\x01\x02", "\x05\x06\x07\x08\x09", "\x03"]
  kwargs = dict(max_seq_len=TINY["max_seq_len"], max_new_tokens=6)
  generator = gen_lib.local_generator(graphdef, params, max_new_tokens=6, temperature=0.0)
  streamed = list(gen_lib.stream_text(generator, tok, prompts, batch_size=2, **kwargs))
  assert [i for i, _ in streamed] == [0, 1, 2]
  alone = [gen_lib.generate_text(generator, tok, [p], batch_size=1, **kwargs)[0] for p in prompts]
  assert [text for _, text in streamed] == alone
  with pytest.raises(ValueError, match="needs 1 to 26"):
    list(gen_lib.stream_text(generator, tok, ["\x01" * 27], **kwargs))


# ---- int8 KV cache (lm/kv_cache.py) ---------------------------------------------------------------

def test_int8_cache_reads_back_within_the_rounding_bound():
  cfg = model_config(**TINY, kv_cache_dtype="int8")
  rng = np.random.default_rng(0)
  shape = (2, 3, cfg.num_kv_heads, cfg.head_dim)  # [B, L, G, K]
  # Magnitudes from 1e-3 to 1e2 per (token, head): a shared scale would flatten the small ones.
  magnitude = lambda: 10.0 ** rng.uniform(-3, 2, shape[:-1] + (1,))
  k, v = (rng.standard_normal(shape) * magnitude() for _ in range(2))
  cache = jax.jit(kv_cache.write)(kv_cache.empty(cfg, 2, 2, 8), 1, 4, k, v)  # layer 1, columns 4..6
  assert cache["k"].dtype == jnp.int8 and cache["k_scale"].dtype == jnp.float32
  for x, read in zip((k, v), kv_cache.read(cache, 1, jnp.float32)):
    read = np.asarray(read)
    # Closed form: symmetric rounding to 127 steps of max|x| / 127 errs by at most half a step.
    half_step = np.abs(x).max(-1, keepdims=True) / 127 / 2
    error = np.abs(read[:, 4:7] - x)
    assert np.all(error <= half_step * (1 + 1e-5) + 1e-6 * np.abs(x))
    assert error.max() > 0.1 * half_step.min()  # it did quantize
    assert not read[:, :4].any() and not read[:, 7:].any()  # unwritten columns read as zeros
  assert not np.asarray(kv_cache.read(cache, 0, jnp.float32)[0]).any()
  # The compute-dtype cache (float32 here) gives back exactly what it was given.
  plain = kv_cache.write(kv_cache.empty(model_config(**TINY), 2, 2, 8), 1, 4, k, v)
  np.testing.assert_array_equal(kv_cache.read(plain, 1, jnp.float32)[0][:, 4:7], k.astype(np.float32))


def test_attention_applies_the_int8_scales_like_dequantized_keys_and_values():
  # What a decode step reads (int8 values and their scales, applied to scores and probabilities)
  # against attention over the dequantized cache (`read`: int8 x scale): the same in float32.
  cfg = model_config(**TINY, kv_cache_dtype="int8")
  rng = np.random.default_rng(1)
  g, k_dim, n = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
  magnitude = lambda: 10.0 ** rng.uniform(-2, 1, (2, 6, g, 1))
  k, v = (rng.standard_normal((2, 6, g, k_dim)) * magnitude() for _ in range(2))
  cache = kv_cache.write(kv_cache.empty(cfg, 1, 2, 6), 0, 0, k, v)
  q = jnp.asarray(rng.standard_normal((2, 1, n, k_dim)), jnp.float32)
  mask = jnp.asarray([[[True] * 4 + [False] * 2], [[True] * 6]])  # [B, 1, S]: row 0 sees 4 columns
  k_int, v_int, k_scale, v_scale = kv_cache.read_unscaled(cache, 0, jnp.float32)
  assert set(np.unique(np.asarray(k_int)).astype(int)) <= set(range(-127, 128))  # unscaled int8 values
  scaled = attention.xla_attention(q, k_int, v_int, mask, k_scale_BxSxGx1=k_scale, v_scale_BxSxGx1=v_scale)
  reference = attention.xla_attention(q, *kv_cache.read(cache, 0, jnp.float32), mask)
  np.testing.assert_allclose(np.asarray(scaled), np.asarray(reference), rtol=1e-5, atol=1e-6)
  # The compute-dtype cache has no scales.
  assert kv_cache.read_unscaled(kv_cache.empty(model_config(**TINY), 1, 2, 6), 0, jnp.float32)[2:] == (None, None)


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("bfloat16", 2)])
def test_int8_cache_holds_a_quarter_or_half_the_bytes(dtype, itemsize):
  shapes = dict(TINY, head_dim=64, dtype=dtype)
  cfg, cfg8 = model_config(**shapes), model_config(**shapes, kv_cache_dtype="int8")
  plain, int8 = init_cache(cfg, 3, 16), init_cache(cfg8, 3, 16)
  nbytes = lambda cache, names: sum(x.nbytes for name in names for x in jax.tree.leaves(cache[name]))
  assert nbytes(plain, ("k", "v")) == itemsize * nbytes(int8, ("k", "v"))  # the values: 1 byte, not 2 or 4
  total = nbytes(int8, int8)  # with the float32 scale per (token, head): 4 bytes per 64 values
  assert total / nbytes(plain, plain) == pytest.approx((64 + 4) / (64 * itemsize))
  assert total == kv_cache.bytes_per_column(cfg8) * cfg.num_layers * 3 * 16
  assert nbytes(plain, plain) == kv_cache.bytes_per_column(cfg) * cfg.num_layers * 3 * 16
  served = init_cache(cfg8, 3, 16, per_layer=True)  # the serving layout's per-layer lists
  assert nbytes(served, served) == total and len(served["k_scale"]) == cfg.num_layers


def test_int8_cache_generation_stays_close_to_the_float_cache(tiny, prompt_BxP, greedy_BxT):
  cfg, graphdef, params = tiny
  _, graphdef8, params8 = _build(tie_embeddings=False, kv_cache_dtype="int8")
  tokens_BxL = jax.random.randint(jax.random.key(3), (BATCH, 24), 0, TINY["vocab_size"], jnp.int32)
  full_BxLxV, cached_BxLxV = _full_and_cached_logits(graphdef8, params8, tokens_BxL, prefill_len=5)
  # A prefill attends on the unquantized keys and values; every later step reads the int8 cache.
  np.testing.assert_allclose(cached_BxLxV[:, :5], full_BxLxV[:, :5], atol=1e-5, rtol=0)
  difference = np.abs(np.asarray(cached_BxLxV - full_BxLxV))[:, 5:]
  spread = float(np.std(np.asarray(full_BxLxV)))
  # Measured: at most 2.3% of the logits' spread (head_dim 8: few values share a scale); mean 0.3%.
  assert 0 < difference.max() < 0.05 * spread and difference.mean() < 0.01 * spread
  # Greedy generation through the serving layout: the tokens mostly agree with the float cache's.
  fn = decoding.make_generate_fn(serving_graphdef(dataclasses.replace(cfg, kv_cache_dtype="int8")),
                                max_new_tokens=NEW_TOKENS,
                                temperature=0.0)
  int8_BxT = fn(serving.serving_params(params), prompt_BxP, jax.random.key(0))
  assert np.mean(np.asarray(int8_BxT) == greedy_BxT) >= 0.9


@pytest.mark.parametrize("serve", [False, True], ids=["transformer", "serving"])
def test_cached_log_probs_equal_the_full_forward(tiny, serve):
  cfg, graphdef, params = tiny
  tokens_BxL = jax.random.randint(jax.random.key(4), (BATCH, 20), 0, TINY["vocab_size"], jnp.int32)
  build = (lambda p: nnx.merge(serving_graphdef(cfg), serving.serving_params(p))) if serve else (
      lambda p: nnx.merge(graphdef, p))
  scored_BxN = jax.jit(lambda p, t: decoding.cached_log_probs(build(p), t, 6))(params, tokens_BxL)
  log_probs_BxLxV = jax.nn.log_softmax(_forward(graphdef, params, tokens_BxL), axis=-1)
  expected_BxN = np.take_along_axis(np.asarray(log_probs_BxLxV)[:, 5:-1], np.asarray(tokens_BxL)[:, 6:, None],
                                    axis=-1)[..., 0]
  assert scored_BxN.shape == (BATCH, 14)
  np.testing.assert_allclose(scored_BxN, expected_BxN, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="prefix_len=20"):
    decoding.cached_log_probs(build(params), tokens_BxL, 20)


# ---- sampling -------------------------------------------------------------------------------------

PROBS_V = np.array([0.06, 0.4, 0.1, 0.25, 0.04, 0.15])  # masses in descending order: .4 .65 .8 .9 .96 1
LOGITS_V = np.log(PROBS_V).astype(np.float32)


def _softmax(x):
  e = np.exp(x - x[np.isfinite(x)].max())
  return e / e.sum()


def _numpy_filter(logits_V, temperature, top_k, top_p):
  """Reference: temperature, then top-k, then the smallest nucleus of renormalized mass >= top_p."""
  z_V = logits_V.astype(np.float64) / temperature
  order = np.argsort(-z_V, kind="stable")
  candidates = order[:top_k] if top_k else order
  probs = _softmax(z_V[candidates])
  keep = np.zeros(z_V.shape, bool)
  mass = 0.0
  for token, p in zip(candidates, probs):
    keep[token] = True
    mass += p
    if mass >= top_p:
      break
  return np.where(keep, z_V, -np.inf)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 0.3), (1.0, 0, 0.5), (1.0, 0, 0.7), (1.0, 0, 0.85), (1.0, 0, 0.99), (1.0, 0, 1.0),
    (1.0, 3, 1.0), (1.0, 3, 0.7), (1.0, 100, 0.5), (0.5, 0, 0.85), (2.0, 4, 0.6),
])
def test_filter_logits_matches_numpy(temperature, top_k, top_p):
  expected_V = _numpy_filter(LOGITS_V, temperature, top_k, top_p)
  got_V = np.asarray(sampling.filter_logits(jnp.asarray(LOGITS_V)[None], temperature=temperature,
                                           top_k=top_k, top_p=top_p))[0]
  np.testing.assert_array_equal(np.isfinite(got_V), np.isfinite(expected_V))
  kept = np.isfinite(expected_V)
  np.testing.assert_allclose(got_V[kept], expected_V[kept], rtol=1e-6)


def test_top_k_1_and_greedy_pick_the_lowest_id_among_ties():
  logits_BxV = jnp.array([[1.0, 3.0, 3.0, 0.0], [-2.0, -1.0, -5.0, -1.0]])
  greedy_B = sampling.sample_logits(logits_BxV, jax.random.key(0), temperature=0.0)
  top1_B = sampling.sample_logits(logits_BxV, jax.random.key(0), top_k=1)
  np.testing.assert_array_equal(greedy_B, [1, 1])
  np.testing.assert_array_equal(top1_B, [1, 1])
  assert greedy_B.dtype == jnp.int32 and top1_B.dtype == jnp.int32


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 4, 0.85)])
def test_sample_frequencies_follow_the_filtered_softmax(temperature, top_k, top_p):
  draws = 20_000
  logits_NxV = jnp.broadcast_to(jnp.asarray(LOGITS_V), (draws, LOGITS_V.size))
  tokens_N = sampling.sample_logits(logits_NxV, jax.random.key(42), temperature=temperature,
                                   top_k=top_k, top_p=top_p)
  counts_V = np.bincount(np.asarray(tokens_N), minlength=LOGITS_V.size)
  expected_V = draws * _softmax(_numpy_filter(LOGITS_V, temperature, top_k, top_p))
  assert (counts_V[expected_V == 0] == 0).all()
  kept = expected_V > 0
  chi2 = (((counts_V[kept] - expected_V[kept]) ** 2) / expected_V[kept]).sum()
  assert chi2 < 25.0, (counts_V, expected_V)  # df <= 5: p < 1e-4 for a correct sampler


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(top_p=0.0), r"top_p=0.0: must be in \(0, 1\]"),
    (dict(top_p=1.01), "top_p"),
    (dict(temperature=jnp.float32(0.5)), "Python number"),
])
def test_sample_logits_validates(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sampling.sample_logits(jnp.zeros((1, 4)), jax.random.key(0), **kwargs)


def test_filter_logits_rejects_greedy():
  with pytest.raises(ValueError, match="temperature=0"):
    sampling.filter_logits(jnp.zeros((1, 4)), temperature=0.0)
