"""The train step: loss numerics, memory of the logits, one compile per run, FLOPs vs XLA's count."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.bench import get_config as bench_config
from configs.smoke import get_config as smoke_config
from launch.run import programs
from launch.run import step as step_lib
from launch.run import state as ts
from launch.run import loop
from launch.measure.timing import random_batch
from launch.run.config import validate
from launch.run.plan import make_plan
from launch.measure.memory import compile_train_step
from lm import flops
from lm.loss import chunked_cross_entropy, cross_entropy


def test_cross_entropy_and_its_gradient_match_optax():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((2, 8, 50)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, (2, 8)))
  reference = lambda l: optax.softmax_cross_entropy_with_integer_labels(l, targets).sum()
  ours = lambda l: cross_entropy(l, targets)[0]
  assert float(ours(logits)) == pytest.approx(float(reference(logits)), rel=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(reference)(logits), atol=1e-6)
  weights = jnp.asarray(rng.integers(0, 2, (2, 8)), jnp.float32)
  total, count = cross_entropy(logits, targets, weights)
  assert float(count) == float(weights.sum())
  assert float(total) == pytest.approx(float((optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights).sum()), rel=1e-6)


def test_chunked_cross_entropy_equals_unchunked_value_and_gradient():
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(rng.standard_normal((2, 12, 6)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 40, (2, 12)))
  weight = jnp.asarray(rng.standard_normal((6, 40)), jnp.float32)
  full = lambda w: cross_entropy(hidden @ w, targets)[0]
  chunked = lambda w: chunked_cross_entropy(hidden, targets, lambda h: h @ w, 4)[0]
  assert float(chunked(weight)) == pytest.approx(float(full(weight)), rel=1e-6)
  np.testing.assert_allclose(jax.grad(chunked)(weight), jax.grad(full)(weight), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="not a multiple of the logits chunk size 5"):
    chunked_cross_entropy(hidden, targets, lambda h: h @ weight, 5)


def _big_vocab_config(chunk):
  c = smoke_config()
  c.model.update(dict(vocab_size=8192, max_seq_len=128, logits_chunk_size=chunk))
  c.data.seq_len = 128
  c.mesh.update(dict(num_devices=1, data=1))
  return validate(c)


def test_chunked_logits_lower_step_memory_and_keep_the_loss():
  temps, losses = [], []
  for chunk in (0, 32):
    plan = make_plan(_big_vocab_config(chunk))
    compiled, _ = compile_train_step(plan)
    temps.append(compiled.memory_analysis().temp_size_in_bytes)
    state = ts.init_train_state(plan.mdef, plan.tx, plan.shardings, seed=0)
    _, metrics = compiled(state, random_batch(plan))
    losses.append(float(metrics["loss"]))
  assert temps[1] < 0.75 * temps[0], temps
  assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_chunk_size_must_divide_sequence():
  c = smoke_config()
  c.model.logits_chunk_size = 48
  with pytest.raises(ValueError, match="not a multiple of model.logits_chunk_size=48"):
    validate(c)


def test_train_loop_compiles_the_step_exactly_once(tmp_path, monkeypatch):
  traces, jitted = [], []
  original_step, original_jit = step_lib.train_step, programs.train_step

  def counting_step(*args, **kwargs):
    traces.append(1)
    return original_step(*args, **kwargs)

  def capture(*args, **kwargs):
    jitted.append(original_jit(*args, **kwargs))
    return jitted[-1]

  monkeypatch.setattr(step_lib, "train_step", counting_step)
  monkeypatch.setattr(programs, "train_step", capture)
  c = smoke_config()
  c.data.data_dir = str(tmp_path / "data")
  c.train.update(dict(steps=5, log_every=1, eval_batches=1, tensorboard=False))
  c.checkpoint.save_every = 2
  result = loop.train(validate(c), str(tmp_path / "run"))
  assert result.final_step == 5
  assert len(traces) == 1
  assert jitted[0].jitted._cache_size() == 1


def test_flop_formula_matches_xla_cost_analysis_for_bench_preset():
  # Fully unrolled: XLA's cost analysis counts a while loop's body once, not once per layer.
  c = bench_config()
  c.model.scan_unroll = c.model.num_layers
  cfg = validate(c)
  compiled, _ = compile_train_step(make_plan(cfg))
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  formula = flops.train_flops_per_token(cfg.model, cfg.data.seq_len) * cfg.train.global_batch_size * cfg.data.seq_len
  assert analysis["flops"] == pytest.approx(formula, rel=0.10)


def test_gradient_accumulation_matches_one_big_batch():
  """Two micro-batches of 4 give the same update as one batch of 8 (the loss is a mean over tokens)."""
  results = []
  for accum in (1, 2):
    c = smoke_config()
    c.train.grad_accum_steps = accum
    c.mesh.update(dict(num_devices=1, data=1))
    plan = make_plan(validate(c))
    state = ts.init_train_state(plan.mdef, plan.tx, plan.shardings, seed=0)
    step = programs.train_step(plan)
    batch = random_batch(plan)
    for _ in range(2):
      state, metrics = step(state, batch)
    results.append((float(metrics["loss"]), jax.device_get(state.params)))
  assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
