"""The model alone: shapes, causality, logical names, and equivalences with simple references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from launch.run import state as ts
from lm import layers
from launch.run.config import model_config
from lm.attention_plan import unplanned
from lm.config import ModelConfig
from lm.transformer import Transformer

CFG = model_config(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  mlp_dim=48, max_seq_len=16, tie_embeddings=False)


@pytest.fixture(scope="module")
def model():
  nnx.use_eager_sharding(False)
  return Transformer(CFG, rngs=nnx.Rngs(0), attention=unplanned(CFG.attention))


@pytest.fixture(scope="module")
def forward(model):
  graphdef, params = nnx.split(model)
  return jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)), params


def test_logits_shape_and_dtype(forward):
  fn, params = forward
  tokens = jnp.zeros((3, 11), jnp.int32)
  logits = fn(params, tokens)
  assert logits.shape == (3, 11, CFG.vocab_size)
  assert logits.dtype == jnp.float32


def test_future_tokens_do_not_change_past_logits(forward):
  fn, params = forward
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)
  changed = tokens.copy()
  changed[:, 7:] = rng.integers(0, CFG.vocab_size, (2, 5))
  a, b = fn(params, tokens), fn(params, changed)
  np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)
  assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-3  # and the future positions do change


def test_param_logical_names_are_the_documented_table():
  mdef = ts.model_def(CFG)
  names = jax.tree_util.tree_leaves_with_path(mdef.logical_names, is_leaf=lambda x: isinstance(x, tuple))
  got = {jax.tree_util.keystr(p): n for p, n in names}
  assert got == {
      "['blocks']['attention']['key']['kernel']": ("layers", "embed", "kv_heads", "kv"),
      "['blocks']['attention']['out']['kernel']": ("layers", "heads", "kv", "embed"),
      "['blocks']['attention']['query']['kernel']": ("layers", "embed", "heads", "kv"),
      "['blocks']['attention']['value']['kernel']": ("layers", "embed", "kv_heads", "kv"),
      "['blocks']['attention_norm']['scale']": ("layers", "embed"),
      "['blocks']['mlp']['down']['kernel']": ("layers", "mlp", "embed"),
      "['blocks']['mlp']['gate']['kernel']": ("layers", "embed", "mlp"),
      "['blocks']['mlp']['up']['kernel']": ("layers", "embed", "mlp"),
      "['blocks']['mlp_norm']['scale']": ("layers", "embed"),
      "['embed']['table']": ("vocab", "embed"),
      "['final_norm']['scale']": ("embed",),
      "['unembed']['kernel']": ("embed", "vocab"),
  }


def test_a_model_built_without_an_attention_plan_is_for_its_shapes_only():
  mdef = ts.model_def(CFG)  # shapes, names and a graphdef need no plan
  assert mdef.attention is None and mdef.logical_names
  with pytest.raises(ValueError, match="built without an attention plan.*launch.run.plan.make_plan"):
    jax.eval_shape(lambda p: mdef.bind(p)(jnp.zeros((1, 4), jnp.int32)), mdef.abstract_params)


def test_param_count_matches_formula():
  mdef = ts.model_def(CFG)
  counted = sum(np.prod(x.shape) for x in jax.tree.leaves(mdef.abstract_params))
  assert counted == CFG.num_params()
  tied = ModelConfig(**{**CFG.__dict__, "tie_embeddings": True})
  counted_tied = sum(np.prod(x.shape) for x in jax.tree.leaves(ts.model_def(tied).abstract_params))
  assert counted_tied == tied.num_params() == CFG.num_params() - CFG.vocab_size * CFG.d_model


def _numpy_forward(params, tokens, cfg):
  """An independent NumPy implementation of the same decoder (explicit loops over layers/heads)."""
  p = jax.tree.map(np.asarray, params)
  x = p["embed"]["table"][tokens]
  seq = tokens.shape[1]
  pos = np.arange(seq)
  inv = cfg.rope_theta ** (-np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
  ang = pos[:, None] * inv
  sin, cos = np.sin(ang), np.cos(ang)

  def rope(v):  # [B, L, H, K]
    h = v.shape[-1] // 2
    v1, v2 = v[..., :h], v[..., h:]
    s, c = sin[None, :, None], cos[None, :, None]
    return np.concatenate([v1 * c - v2 * s, v2 * c + v1 * s], -1)

  def norm(v, scale):
    return v / np.sqrt((v ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * scale

  group = cfg.num_heads // cfg.num_kv_heads
  causal = np.tril(np.ones((seq, seq), bool))
  for i in range(cfg.num_layers):
    b = jax.tree.map(lambda a: a[i], p["blocks"])
    h = norm(x, b["attention_norm"]["scale"])
    q = rope(np.einsum("bld,dhk->blhk", h, b["attention"]["query"]["kernel"]))
    k = rope(np.einsum("bld,dhk->blhk", h, b["attention"]["key"]["kernel"]))
    v = np.einsum("bld,dhk->blhk", h, b["attention"]["value"]["kernel"])
    heads = []
    for head in range(cfg.num_heads):
      kv = head // group
      s = q[:, :, head] @ k[:, :, kv].transpose(0, 2, 1) / np.sqrt(cfg.head_dim)
      s = np.where(causal, s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      heads.append(w @ v[:, :, kv])
    attn = np.stack(heads, 2)
    x = x + np.einsum("blhk,hkd->bld", attn, b["attention"]["out"]["kernel"])
    h = norm(x, b["mlp_norm"]["scale"])
    gate = h @ b["mlp"]["gate"]["kernel"]
    x = x + ((gate / (1 + np.exp(-gate))) * (h @ b["mlp"]["up"]["kernel"])) @ b["mlp"]["down"]["kernel"]
  x = norm(x, p["final_norm"]["scale"])
  return x @ p["unembed"]["kernel"]


def test_forward_matches_numpy_reference(forward):
  fn, params = forward
  tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 9)).astype(np.int32)
  ours = fn(params, tokens)
  reference = _numpy_forward(nnx.to_pure_dict(params), tokens, CFG)
  np.testing.assert_allclose(ours, reference, atol=2e-4, rtol=2e-4)


def test_rotary_preserves_norm_and_relative_positions():
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)

  def rotated_dot(pq, pk):
    sq, cq = layers.rotary_tables(jnp.array([[pq]]), 8, 10_000.0)
    sk, ck = layers.rotary_tables(jnp.array([[pk]]), 8, 10_000.0)
    return float(jnp.sum(layers.apply_rotary(q, sq, cq) * layers.apply_rotary(k, sk, ck)))

  assert rotated_dot(3, 1) == pytest.approx(rotated_dot(10, 8), rel=1e-5)
  s, c = layers.rotary_tables(jnp.array([[5]]), 8, 10_000.0)
  assert float(jnp.linalg.norm(layers.apply_rotary(q, s, c))) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-6)


def test_bf16_compute_keeps_fp32_params_and_logits():
  cfg = ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  model = Transformer(cfg, rngs=nnx.Rngs(0), attention=unplanned(cfg.attention))
  assert model.blocks.mlp.up.kernel[...].dtype == jnp.float32
  logits = model(jnp.zeros((1, 4), jnp.int32))
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize("field,value,message", [
    ("num_kv_heads", 3, "num_kv_heads"),
    ("head_dim", 7, "even"),
    ("dtype", "float8", "dtype"),
    ("d_model", 0, "positive"),
    ("scan_unroll", 3, "scan_unroll"),
    ("kv_cache_dtype", "int4", "model.kv_cache_dtype='int4'"),
])
def test_bad_model_config_is_rejected(field, value, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**{**CFG.__dict__, field: value})
