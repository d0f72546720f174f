"""sharding/jax_internals.py: the private jax APIs resolve on the installed jax, and break clearly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharding import jax_internals


def test_every_private_api_resolves_on_the_installed_jax():
  assert jax_internals.missing() == []
  jax.devices()
  assert jax_internals.backends_started() is True


def test_a_missing_or_changed_api_names_jax_the_api_and_the_need(monkeypatch):
  with pytest.raises(jax_internals.JaxInternalsError,
                     match=rf"jax {jax.__version__}: no_such_module.f is missing .*shardlm needs it to count"):
    jax_internals._resolve("no_such_module", "f", (), "count")
  monkeypatch.setattr("math.dummy_for_test", lambda x: x, raising=False)
  with pytest.raises(jax_internals.JaxInternalsError, match=r"takes \(x\), not \(y\).*adapt sharding/jax_internals"):
    jax_internals._resolve("math", "dummy_for_test", ("y",), "count")
  with pytest.raises(jax_internals.JaxInternalsError, match="SplashAttentionKernel no longer keeps"):
    jax_internals.splash_mqa_backward(object(), *[None] * 7)


def test_splash_backward_against_its_own_residuals_equals_the_kernels_gradient():
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  heads, length, head_dim = 2, 128, 64
  q, k, v, dout = (jnp.asarray(np.random.default_rng(i).normal(size=shape), jnp.float32) for i, shape in
                   enumerate([(heads, length, head_dim), (length, head_dim), (length, head_dim),
                              (heads, length, head_dim)]))
  segments = splash.SegmentIds(jnp.zeros(length, jnp.int32), jnp.zeros(length, jnp.int32))
  sizes = splash.BlockSizes(**{name: 128 for name in ("block_q", "block_kv", "block_kv_compute", "block_q_dkv",
                                                      "block_kv_dkv", "block_kv_dkv_compute", "block_q_dq",
                                                      "block_kv_dq")})
  make = lambda residuals: splash.make_splash_mqa(
      splash.MultiHeadMask([splash.CausalMask((length, length))] * heads), block_sizes=sizes, head_shards=1,
      q_seq_shards=1, save_residuals=residuals, interpret=True)
  out, (lse,) = make(True)(q, k, v, segment_ids=segments)
  plain = make(False)
  _, vjp = jax.vjp(lambda q, k, v: plain(q, k, v, segment_ids=segments), q, k, v)
  got = jax_internals.splash_mqa_backward(plain, q, k, v, segments, out, lse, dout)
  for name, g, e in zip(("dq", "dk", "dv"), got, vjp(dout)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5, err_msg=name)
