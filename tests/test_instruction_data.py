"""Instruction data: JSONL prompt/response records, scored on the response only."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.smoke import get_config as smoke_config
from launch.run import step as step_lib
from launch.run import state as ts
from launch.run.config import validate
from launch.run.plan import make_plan
from lm.data import baseline, loader, sources, tfds_builder
from lm.loss import chunked_cross_entropy, cross_entropy

SEQ_LEN = 32
BYTE_VOCAB = 259


def _records(n=40):
  """Prompts and responses of varied lengths, some longer than a window, none empty."""
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "sigma", "omega", "rho", "tau"]
  out = []
  for i in range(n):
    prompt = f"Q{i}: " + " ".join(rng.choice(words, rng.integers(1, 12))) + "?\n"
    response = "A: " + " ".join(rng.choice(words, rng.integers(1, 9)))
    out.append({"instruction": prompt, "output": response, "id": i})
  return out


@pytest.fixture(scope="module")
def instruction_dir(tmp_path_factory):
  """(data_dir, tokenizer, records): an instruction JSONL prepared with the byte tokenizer."""
  root = tmp_path_factory.mktemp("instructions")
  records = _records()
  path = root / "sft.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  source = sources.CorpusSource(kind="jsonl", path=str(path), field="output",
                                prompt_field="instruction", validation_fraction=0.25)
  data_dir = str(root / "data")
  tokenizer = loader.prepare(data_dir, "byte", BYTE_VOCAB, source=source)
  return data_dir, tokenizer, records


def _reference_windows(records, tokenizer, seq_len):
  """The packed validation stream built by hand: (tokens [W, L + 1], scored [W, L + 1]) per window.

  A token is scored when it belongs to a response or is its EOS; windows are cut from the
  concatenation of the records in file order, and a partial last window is dropped.
  """
  tokens, scored = [], []
  for r in records:
    prompt_ids = tokenizer.encode(r["instruction"])
    response_ids = tokenizer.encode(r["output"]) + [tokenizer.eos_id]
    tokens += prompt_ids + response_ids
    scored += [0] * len(prompt_ids) + [1] * len(response_ids)
  windows = len(tokens) // (seq_len + 1)
  cut = lambda xs: np.asarray(xs[:windows * (seq_len + 1)]).reshape(windows, seq_len + 1)
  return cut(tokens), cut(scored)


def test_validation_batches_weigh_response_targets_only(instruction_dir):
  data_dir, tokenizer, records = instruction_dir
  held_out = [r for r in records
              if sources.is_validation(r["instruction"] + r["output"], 0.25)]
  assert 0 < len(held_out) < len(records)
  tokens_WxL1, scored_WxL1 = _reference_windows(held_out, tokenizer, SEQ_LEN)
  batches = list(loader.eval_batches(data_dir, tokenizer, seq_len=SEQ_LEN, global_batch_size=1))
  assert len(batches) == len(tokens_WxL1) >= 3
  for batch, tokens_L1, scored_L1 in zip(batches, tokens_WxL1, scored_WxL1):
    np.testing.assert_array_equal(batch["inputs"][0], tokens_L1[:-1])
    np.testing.assert_array_equal(batch["targets"][0], tokens_L1[1:])
    np.testing.assert_array_equal(batch["loss_weights"][0], scored_L1[1:].astype(np.float32))
  all_weights = np.concatenate([b["loss_weights"] for b in batches])
  assert 0 < all_weights.mean() < 1  # both prompt and response targets occur


def test_prompts_are_stored_beside_responses_and_train_batches_carry_weights(instruction_dir):
  data_dir, tokenizer, _ = instruction_dir
  example = tfds_builder.data_source(data_dir, "train")[0]
  assert example["prompt"].decode().startswith("Q") and example["text"].decode().startswith("A: ")
  batch = next(loader.train_iterator(data_dir, tokenizer, seq_len=SEQ_LEN, global_batch_size=4, seed=1))
  assert batch["loss_weights"].shape == batch["targets"].shape == (4, SEQ_LEN)
  # A target after an EOS starts the next record's prompt: never scored.
  after_eos = batch["inputs"] == tokenizer.eos_id
  assert after_eos.any() and not batch["loss_weights"][after_eos].any()


def test_unigram_baseline_counts_scored_targets_only(instruction_dir):
  data_dir, tokenizer, _ = instruction_dir
  counts_V = baseline.train_token_counts(data_dir, tokenizer)
  train = tfds_builder.data_source(data_dir, "train")
  responses = sum(len(tokenizer.encode(train[i]["text"].decode())) + 1 for i in range(len(train)))
  assert counts_V.sum() == responses
  assert np.isfinite(baseline.unigram_perplexity(data_dir, tokenizer, SEQ_LEN))


def test_chunked_cross_entropy_weighs_like_the_whole():
  rng = np.random.default_rng(3)
  hidden = jnp.asarray(rng.standard_normal((2, 12, 6)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 40, (2, 12)))
  weights = jnp.asarray(rng.integers(0, 2, (2, 12)), jnp.float32)
  weight = jnp.asarray(rng.standard_normal((6, 40)), jnp.float32)
  full = lambda w: cross_entropy(hidden @ w, targets, weights)
  chunked = lambda w: chunked_cross_entropy(hidden, targets, lambda h: h @ w, 4, weights)
  assert float(chunked(weight)[1]) == float(weights.sum())
  assert float(chunked(weight)[0]) == pytest.approx(float(full(weight)[0]), rel=1e-6)
  np.testing.assert_allclose(jax.grad(lambda w: chunked(w)[0])(weight),
                             jax.grad(lambda w: full(w)[0])(weight), rtol=1e-5, atol=1e-6)


def test_train_step_loss_is_the_mean_over_response_targets():
  """The step's loss against optax's per-token cross-entropy averaged over the weighted targets; the
  prompt targets can be anything without changing loss or gradient."""
  c = smoke_config()
  c.mesh.update(dict(num_devices=1, data=1))
  plan = make_plan(validate(c))
  params = ts.init_train_state(plan.mdef, plan.tx, plan.shardings, seed=0).params
  rng = np.random.default_rng(0)
  b, length, vocab = 2, c.data.seq_len, c.model.vocab_size
  inputs = rng.integers(0, vocab, (b, length)).astype(np.int32)
  weights = (np.arange(length)[None, :] >= rng.integers(1, length - 1, (b, 1))).astype(np.float32)
  batch = {"inputs": inputs, "targets": rng.integers(0, vocab, (b, length)).astype(np.int32),
           "segment_ids": np.zeros((b, length), np.int32), "loss_weights": weights}
  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda p, bt: step_lib._loss(p, bt, plan.mdef), has_aux=True))  # pylint: disable=protected-access
  (loss, (_, tokens)), grads = loss_and_grad(params, batch)

  logits = plan.mdef.bind(params)(jnp.asarray(inputs), segment_ids_BxL=jnp.asarray(batch["segment_ids"]))
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
  assert float(tokens) == weights.sum()
  assert float(loss) == pytest.approx(float((nll * weights).sum() / weights.sum()), rel=1e-5)

  other_targets = np.where(weights > 0, batch["targets"], (batch["targets"] + 7) % vocab)
  (other_loss, _), other_grads = loss_and_grad(params, {**batch, "targets": other_targets})
  assert float(other_loss) == pytest.approx(float(loss), rel=1e-6)
  for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(other_grads)):
    np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-7)


def test_training_on_instruction_jsonl_runs(instruction_dir, tmp_path):
  from launch.run.loop import train  # pylint: disable=g-import-not-at-top
  data_dir, _, _ = instruction_dir
  c = smoke_config()
  c.data.corpus, c.data.field, c.data.prompt_field = "jsonl", "output", "instruction"
  c.data.path = str(tmp_path / "sft.jsonl")
  (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
  c.data.validation_fraction, c.data.seq_len = 0.25, SEQ_LEN
  c.data.tokenizer, c.model.vocab_size = "byte", BYTE_VOCAB
  c.data.data_dir = str(tmp_path / "data")
  c.train.steps, c.train.log_every, c.train.eval_batches = 2, 1, 1
  c.train.tensorboard, c.checkpoint.save_every, c.checkpoint.async_save = False, 100, False
  result = train(validate(c), str(tmp_path / "run"))
  assert result.final_step == 2 and np.isfinite(result.train_loss) and np.isfinite(result.val_loss)
  assert loader.has_prompts(c.data.data_dir) and not loader.has_prompts(str(tmp_path))


@pytest.mark.parametrize("changes, message", [
    (dict(corpus="text", path="*.txt", prompt_field="q"), "data.prompt_field='q' is read from JSONL"),
    (dict(corpus="jsonl", path="a.jsonl", field="q", prompt_field="q"), "are both 'q'"),
])
def test_prompt_field_settings_that_cannot_work_are_refused(changes, message):
  c = smoke_config()
  c.data.update(changes)
  with pytest.raises(ValueError, match=message):
    validate(c)


def test_a_record_without_its_prompt_names_the_line_and_the_key(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"q": "x", "a": "y"}\n{"a": "z"}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl line 2 has no field 'q' .*data\.prompt_field"):
    list(sources.iter_documents("jsonl", "a", [str(path)], prompt_field="q"))
