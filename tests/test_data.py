"""Tests for lm/data: corpus split, tfds shards, tokenizers, grain loaders, unigram baseline.

The code under test imports no jax (grain itself does). ~13 s: one prepared data_dir with a
512-piece tokenizer is shared by the whole module.
"""

import json
import math
import pathlib
import pickle

import grain
import numpy as np
import pytest

from lm.data import baseline
from lm.data import corpus
from lm.data import loader
from lm.data import tfds_builder
from lm.data import tokenizer as tokenizer_lib
from lm.data import tokenizer_training

VOCAB = 512
SEQ_LEN = 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("data")
  loader.prepare(str(path), "sentencepiece", VOCAB)
  return str(path)


@pytest.fixture(scope="module")
def sp(data_dir):
  return tokenizer_lib.load_tokenizer("sentencepiece", data_dir, VOCAB)


def _stream(tok, docs):
  """The packed token stream of `docs`: each document's ids then EOS, concatenated (int32 [n])."""
  return np.concatenate([np.asarray(tok.encode(d) + [tok.eos_id], np.int32) for d in docs])


def _rows(batches):
  """Batches -> the seq_len + 1 windows they were cut from: int32 [num_rows, seq_len + 1]."""
  return np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
                         for b in batches])


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(expected, actual):
  assert len(expected) == len(actual)
  for e, a in zip(expected, actual):
    assert e.keys() == a.keys()
    for k in e:
      np.testing.assert_array_equal(e[k], a[k])


# Corpus.

def test_split_holds_out_whole_works_disjointly_and_deterministically():
  train, validation = corpus.split_works("train"), corpus.split_works("validation")
  assert not set(train) & set(validation)
  assert sorted(train + validation) == corpus.list_works()
  assert tuple(validation) == corpus.VALIDATION_WORKS
  train_docs, val_docs = corpus.documents("train"), corpus.documents("validation")
  assert {d.title for d in train_docs} == set(train)
  assert {d.title for d in val_docs} == set(validation)
  val_chars = sum(len(d.text) for d in val_docs)
  all_chars = val_chars + sum(len(d.text) for d in train_docs)
  assert 0.08 < val_chars / all_chars < 0.13
  assert corpus.documents("validation") == val_docs
  assert max(len(d.text) for d in train_docs) < 16_000 and len(train_docs) > 500


def test_chunk_text_cuts_only_at_paragraph_breaks():
  text = "A.\nOne line.\n\nB.\nTwo\nlines.\n\n\nC.\nThree."
  chunks = corpus.chunk_text(text, target_chars=10)
  assert chunks == ["A.\nOne line.", "B.\nTwo\nlines.", "C.\nThree."]
  assert corpus.chunk_text(text, target_chars=1000) == ["A.\nOne line.\n\nB.\nTwo\nlines.\n\nC.\nThree."]
  with pytest.raises(ValueError, match="split='test'"):
    corpus.split_works("test")


# tfds shards.

def test_tfds_shards_round_trip_documents(data_dir):
  for split in corpus.SPLITS:
    source = tfds_builder.data_source(data_dir, split)
    docs = corpus.documents(split)
    assert len(source) == len(docs)
    for i in (0, len(docs) // 2, len(docs) - 1):
      assert source[i]["text"].decode() == docs[i].text
      assert source[i]["title"].decode() == docs[i].title


def test_preparing_again_is_a_no_op(data_dir):
  shard_dir = pathlib.Path(str(tfds_builder.get_builder(data_dir).data_path))
  shard = next(shard_dir.glob("*train.array_record*"))
  before = shard.stat().st_mtime_ns
  loader.prepare(data_dir, "sentencepiece", VOCAB)
  assert shard.stat().st_mtime_ns == before


def test_data_source_before_prepare_names_the_fix(tmp_path):
  with pytest.raises(ValueError, match="prepare"):
    tfds_builder.data_source(str(tmp_path), "train")


# Tokenizers.

def test_sentencepiece_round_trips_shakespeare_and_any_text(sp):
  text = corpus.documents("validation")[3].text
  ids = sp.encode(text)
  assert sp.decode(ids) == text
  assert len(ids) < len(text) / 1.5  # it learned merges, not just characters
  odd = "Ünïcödé ☃, tabs\tand  double  spaces\n\n\nend "
  assert sp.decode(sp.encode(odd)) == odd
  assert all(0 <= i < VOCAB for i in ids)
  assert (sp.vocab_size, sp.pad_id, sp.bos_id, sp.eos_id) == (VOCAB, 0, 2, 3)
  assert sp.decode(ids + [sp.eos_id, sp.pad_id]) == text


def test_sentencepiece_is_cached_deterministic_and_picklable(data_dir, sp, tmp_path):
  path = tokenizer_training.sentencepiece_path(data_dir, VOCAB)
  before = path.stat().st_mtime_ns
  tokenizer_lib.load_tokenizer("sentencepiece", data_dir, VOCAB)
  assert path.stat().st_mtime_ns == before
  assert not list(path.parent.glob("*.tmp"))
  tokenizer_lib.load_tokenizer("sentencepiece", str(tmp_path), VOCAB)
  assert tokenizer_training.sentencepiece_path(tmp_path, VOCAB).read_bytes() == path.read_bytes()
  clone = pickle.loads(pickle.dumps(sp))
  assert clone.encode("To be, or not to be") == sp.encode("To be, or not to be")


def test_byte_tokenizer_round_trips():
  tok = tokenizer_lib.ByteTokenizer()
  text = "O Romeo, Romeo! ☃"
  ids = tok.encode(text)
  assert tok.decode(ids) == text and len(ids) == len(text.encode())
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
  assert min(ids) >= 3 and max(tok.encode("\xff\U0010ffff")) < 259


def test_vocab_mismatch_errors_name_the_fix(data_dir):
  with pytest.raises(ValueError, match=r"byte tokenizer has 259 tokens but model.vocab_size=512.*--config.model.vocab_size=259"):
    tokenizer_lib.load_tokenizer("byte", data_dir, VOCAB)
  assert tokenizer_lib.load_tokenizer("byte", data_dir, 259).vocab_size == 259
  with pytest.raises(ValueError, match="'wordpiece' is not one of"):
    tokenizer_lib.load_tokenizer("wordpiece", data_dir, VOCAB)
  with pytest.raises(ValueError, match="vocab_size=100"):
    tokenizer_training.train_sentencepiece(["To be, or not to be."] * 10, 100)


# Train loader.

def test_batches_have_shapes_dtypes_and_shifted_targets(data_dir, sp):
  it = loader.train_iterator(data_dir, sp, seq_len=SEQ_LEN, global_batch_size=8)
  for batch in _take(it, 3):
    assert set(batch) == {"inputs", "targets", "segment_ids"}
    for x in batch.values():
      assert x.shape == (8, SEQ_LEN) and x.dtype == np.int32
      assert x.min() >= 0 and x.max() < VOCAB
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert (batch["inputs"] != sp.pad_id).all()  # packed, never padded
    # The segment id of a token is the number of EOS before it in its row (its document's index).
    eos_before = np.cumsum(batch["inputs"] == sp.eos_id, axis=1) - (batch["inputs"] == sp.eos_id)
    np.testing.assert_array_equal(batch["segment_ids"], eos_before)


def test_packer_segment_ids_count_the_documents_of_each_row():
  # Short documents (each ends with EOS=9), packed into rows of 4 inputs + 1 target.
  docs = [[1, 2, 9], [3, 4, 5, 6, 9], [7, 9], [8, 8, 8, 8, 8, 8, 9]]
  ds = grain.MapDataset.source([{"tokens": np.asarray(d, np.int32)} for d in docs]).to_iter_dataset()
  windows = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": 5})
  batch = loader._inputs_and_targets({k: np.stack(v) for k, v in zip(
      ("tokens", "tokens_segment_ids"), zip(*[(w["tokens"], w["tokens_segment_ids"]) for w in windows]))})
  np.testing.assert_array_equal(batch["inputs"][:3], [[1, 2, 9, 3], [5, 6, 9, 7], [8, 8, 8, 8]])
  # Row 0: doc [1 2 9] then doc 3...; row 1: the rest of that doc, then [7 9]; row 2: one doc.
  np.testing.assert_array_equal(batch["segment_ids"][:3], [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]])


def test_unshuffled_stream_is_this_process_documents_packed_in_order(data_dir, sp):
  docs = [d.text for d in corpus.documents("train")]
  for process_index in (0, 1):
    it = loader.train_iterator(data_dir, sp, seq_len=SEQ_LEN, global_batch_size=8,
                               process_index=process_index, process_count=2, shuffle=False)
    rows = _rows(_take(it, 6))
    assert rows.shape == (6 * 4, SEQ_LEN + 1)
    expected = _stream(sp, docs[process_index::2][:8])[:rows.size]
    np.testing.assert_array_equal(rows.reshape(-1), expected)


def test_two_processes_read_disjoint_data(data_dir, sp):
  rows = []
  for process_index in (0, 1):
    it = loader.train_iterator(data_dir, sp, seq_len=SEQ_LEN, global_batch_size=8,
                               process_index=process_index, process_count=2, seed=3)
    rows.append({r.tobytes() for r in _rows(_take(it, 20))})
  assert len(rows[0]) == len(rows[1]) == 80
  assert not rows[0] & rows[1]


def test_global_batch_must_divide_by_process_count(data_dir, sp):
  with pytest.raises(ValueError, match="global_batch_size=6 must be a positive multiple of "
                                       "process_count=4"):
    loader.train_iterator(data_dir, sp, seq_len=SEQ_LEN, global_batch_size=6, process_count=4)


def test_every_epoch_is_a_fresh_permutation_of_the_shard(data_dir, sp):
  # 256 processes leave this one 4 or 5 documents, so a few epochs take a few hundred windows.
  process_count, process_index = 256, 7
  shard = [d.text for d in corpus.documents("train")][process_index::process_count]
  shard_ids = [tuple(sp.encode(d)) for d in shard]
  it = loader.train_iterator(data_dir, sp, seq_len=SEQ_LEN, global_batch_size=process_count,
                             process_index=process_index, process_count=process_count, seed=1)
  num_tokens = 3 * sum(len(d) + 1 for d in shard_ids)
  stream = _rows(_take(it, num_tokens // (SEQ_LEN + 1) + 2)).reshape(-1)
  docs_seen = np.split(stream, np.flatnonzero(stream == sp.eos_id) + 1)[:3 * len(shard)]
  epochs = [[tuple(d[:-1]) for d in docs_seen[e * len(shard):(e + 1) * len(shard)]]
            for e in range(3)]
  for order in epochs:
    assert sorted(order) == sorted(shard_ids)
  assert len({tuple(order) for order in epochs}) > 1


def test_resuming_from_saved_state_continues_exactly(data_dir, sp):
  def make():
    return loader.train_iterator(data_dir, sp, seq_len=SEQ_LEN, global_batch_size=4, seed=5)

  it = make()
  start_state = json.loads(json.dumps(it.get_state()))
  first = _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 3)
  resumed = make()
  resumed.set_state(state)
  _assert_same_batches(expected, _take(resumed, 3))
  # The starting position has no partial document; it must survive JSON too.
  restarted = make()
  restarted.set_state(start_state)
  _assert_same_batches(first, _take(restarted, 5))


def test_worker_processes_resume_exactly(data_dir, sp):
  def make():
    return loader.train_iterator(data_dir, sp, seq_len=SEQ_LEN, global_batch_size=4,
                                 num_workers=2)

  it = make()
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 3)
  it.close()
  resumed = make()
  resumed.set_state(state)
  _assert_same_batches(expected, _take(resumed, 3))
  resumed.close()


def test_state_from_other_settings_is_refused(data_dir, sp):
  state = loader.train_iterator(data_dir, sp, seq_len=SEQ_LEN, global_batch_size=4).get_state()
  other = loader.train_iterator(data_dir, sp, seq_len=32, global_batch_size=4)
  with pytest.raises(ValueError, match="same data settings"):
    other.set_state(state)


# Eval loader.

def test_eval_is_finite_deterministic_and_complete(data_dir, sp):
  batches = list(loader.eval_batches(data_dir, sp, seq_len=SEQ_LEN, global_batch_size=8))
  again = list(loader.eval_batches(data_dir, sp, seq_len=SEQ_LEN, global_batch_size=8))
  _assert_same_batches(batches, again)
  stream = _stream(sp, [d.text for d in corpus.documents("validation")])
  num_batches = len(stream) // (SEQ_LEN + 1) // 8
  assert len(batches) == num_batches
  np.testing.assert_array_equal(_rows(batches).reshape(-1),
                                stream[:num_batches * 8 * (SEQ_LEN + 1)])
  limited = list(loader.eval_batches(data_dir, sp, seq_len=SEQ_LEN, global_batch_size=8,
                                     max_batches=2))
  _assert_same_batches(batches[:2], limited)


def test_eval_processes_split_each_global_batch(data_dir, sp):
  whole = list(loader.eval_batches(data_dir, sp, seq_len=SEQ_LEN, global_batch_size=8,
                                   max_batches=4))
  parts = [list(loader.eval_batches(data_dir, sp, seq_len=SEQ_LEN, global_batch_size=8,
                                    process_index=p, process_count=2, max_batches=4))
           for p in (0, 1)]
  for k, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(
          batch[key], np.concatenate([parts[0][k][key], parts[1][k][key]]))


# Baseline.

def test_unigram_perplexity_is_between_one_and_vocab_size(data_dir, sp):
  ppl = baseline.unigram_perplexity(data_dir, sp, SEQ_LEN)
  assert math.isfinite(ppl) and 1 < ppl < VOCAB
