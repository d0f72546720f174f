"""lm/attention.py: each kernel that runs here against a NumPy reference (XLA directly; splash in
Pallas' interpreter, on one device and under a tensor-parallel shard_map), and documents in one
packed row not seeing each other."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from launch.run.config import model_config
from launch.run.programs import per_shard_map
from lm import attention, axes
from lm.attention_plan import unplanned
from lm.transformer import Transformer
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib


def reference_attention(q, k, v, segment_ids):
  """NumPy float64 causal GQA attention within segments; q [B, L, N, K], k/v [B, L, G, K]."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  b, l, n, d = q.shape
  k = np.repeat(k, n // k.shape[2], axis=2)
  v = np.repeat(v, n // v.shape[2], axis=2)
  scores = np.einsum("blnk,bsnk->bnls", q, k) / np.sqrt(d)
  seg = np.asarray(segment_ids)
  allowed = (np.tril(np.ones((l, l), bool))[None] & (seg[:, :, None] == seg[:, None, :]))[:, None]
  scores = np.where(allowed, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnls,bsnk->blnk", probs, v)


def qkv_and_segments(length, heads=4, groups=2, head_dim=16, batch=2):
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (batch, length, heads, head_dim))
  k = jax.random.normal(ks[1], (batch, length, groups, head_dim))
  v = jax.random.normal(ks[2], (batch, length, groups, head_dim))
  rng = np.random.default_rng(0)
  segment_ids = np.cumsum(rng.random((batch, length)) < 4 / length, axis=1).astype(np.int32)
  assert segment_ids.max() > 0
  return q, k, v, jnp.asarray(segment_ids)


def test_xla_matches_reference_and_recompute_keeps_values_and_gradients():
  q, k, v, seg = qkv_and_segments(24)
  expected = reference_attention(q, k, v, seg)
  losses = {}
  for recompute in (False, True):
    fn = functools.partial(attention.attend, "xla", segment_ids_BxL=seg, recompute=recompute)
    np.testing.assert_allclose(jax.jit(fn)(q, k, v), expected, atol=2e-5)
    grad = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))), argnums=(0, 1, 2))
    losses[recompute] = jax.jit(grad)(q, k, v)
  for a, b in zip(losses[False], losses[True]):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.fixture(scope="module")
def splash_grads():
  """XLA's gradients of one loss, to compare the interpreted splash kernel's against."""
  q, k, v, seg = qkv_and_segments(128)
  loss = lambda q, k, v: jnp.sum(jnp.sin(attention.attend("xla", q, k, v, seg)))
  return (q, k, v, seg), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def test_splash_interpreted_matches_reference_and_xla_gradients(splash_grads):
  (q, k, v, seg), expected_grads = splash_grads
  fn = lambda q, k, v: attention.attend("splash", q, k, v, seg, interpret=True)
  np.testing.assert_allclose(jax.jit(fn)(q, k, v), reference_attention(q, k, v, seg), atol=2e-5)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(grads, expected_grads):
    np.testing.assert_allclose(a, b, atol=2e-4)


def test_splash_runs_per_device_under_tensor_parallel_rules():
  # data=2 x tensor=2 (heads and kv heads split, batch split): each device runs the kernel on its
  # block; the result must equal the reference, with no sequence split.
  q, k, v, seg = qkv_and_segments(128)
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
  rules = rules_lib.get_rules("tp")
  fn = jax.jit(lambda q, k, v, s: attention.attend("splash", q, k, v, s, interpret=True))
  with axes.use_per_shard(per_shard_map(mesh, rules)):
    out = fn(q, k, v, seg)
    hlo = fn.lower(q, k, v, seg).compile().as_text()
  np.testing.assert_allclose(out, reference_attention(q, k, v, seg), atol=2e-5)
  assert "all-gather" not in hlo


@pytest.fixture(scope="module")
def packed_model():
  nnx.use_eager_sharding(False)
  cfg = model_config(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=48, max_seq_len=32, tie_embeddings=False)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0), attention=unplanned(cfg.attention)))
  forward = jax.jit(lambda p, t, s: nnx.merge(graphdef, p)(t, segment_ids_BxL=s))
  return functools.partial(forward, params), cfg


def test_a_document_does_not_see_the_previous_one_in_its_row(packed_model):
  fn, cfg = packed_model
  rng = np.random.default_rng(1)
  doc = rng.integers(0, cfg.vocab_size, 12)
  logits = []
  for previous_len in (7, 7, 11):  # same length with other tokens, then another length
    previous = rng.integers(0, cfg.vocab_size, previous_len)
    tail = rng.integers(0, cfg.vocab_size, 20 - previous_len)
    tokens = np.concatenate([previous, doc, tail])[None].astype(np.int32)
    seg = np.repeat([0, 1, 2], [previous_len, len(doc), len(tail)])[None].astype(np.int32)
    logits.append(np.asarray(fn(tokens, seg))[0, previous_len:previous_len + len(doc)])
  alone = np.asarray(fn(doc[None].astype(np.int32), np.zeros((1, len(doc)), np.int32)))[0]
  for got in logits:
    # Positions restart at each document, so it also matches the same document alone in a row.
    np.testing.assert_allclose(got, alone, atol=2e-5)
  # Without segment ids the previous document is visible, and the logits do change.
  tokens = np.concatenate([rng.integers(0, cfg.vocab_size, 7), doc])[None].astype(np.int32)
  unmasked = np.asarray(fn(tokens, np.zeros_like(tokens)))[0, 7:]
  assert np.abs(unmasked - alone).max() > 1e-3


def test_positions_restart_at_each_document():
  from lm.transformer import positions_in_documents
  seg = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(positions_in_documents(seg),
                                [[0, 1, 2, 0, 1, 0, 1, 2, 3], list(range(9))])
