"""Tests for your own corpus (lm/data/sources.py, manifest.py, CorpusBuilder, loaded tokenizers).

The samples in tests/fixtures/corpus/ (~34 KB, made by make_fixtures.py) cover each source type.
Most tests use the byte tokenizer, so nothing is trained; one end-to-end test trains a few steps.
"""

import json
import os
import pathlib
import pickle
import shutil
import sys

import numpy as np
import pytest

from lm.data import corpus
from lm.data import loader
from lm.data import manifest
from lm.data import sources
from lm.data import tfds_builder
from lm.data import tokenizer as tokenizer_lib
from lm.data import tokenizer_training

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "corpus"
SEQ_LEN = 32
BYTE_VOCAB = 259
# Hash splits of a few dozen documents are lumpy: these hold out 5 of 12, 11 of 48 and 4 of 32.
SOURCES = {
    "text": dict(kind="text", path=str(FIXTURES / "text" / "**" / "*.txt"),
                 validation_fraction=0.2),
    "jsonl": dict(kind="jsonl", path=str(FIXTURES / "docs.jsonl"), field="text",
                  validation_fraction=0.2),
    "parquet": dict(kind="parquet", path=str(FIXTURES / "docs.parquet"), field="content",
                    validation_fraction=0.2),
}


def _source(name, **overrides):
  return sources.CorpusSource(**{**SOURCES[name], **overrides})


def _expected_documents(name):
  """Every document of a fixture, read without sources.py: list[str] in file order."""
  if name == "text":
    files = sorted(FIXTURES.glob("text/**/*.txt"))
    return [c for f in files for c in corpus.chunk_text(f.read_text())]
  if name == "jsonl":
    return [json.loads(line)["text"] for line in (FIXTURES / "docs.jsonl").read_text().splitlines()]
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  return pq.read_table(FIXTURES / "docs.parquet").column("content").to_pylist()


def _split_texts(data_dir, split):
  source = tfds_builder.data_source(data_dir, split)
  return [source[i]["text"].decode() for i in range(len(source))]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """{source name: data_dir} with each fixture prepared once (byte tokenizer)."""
  dirs = {}
  for name in SOURCES:
    if name == "parquet":
      pytest.importorskip("pyarrow")
    dirs[name] = str(tmp_path_factory.mktemp(name))
    loader.prepare(dirs[name], "byte", BYTE_VOCAB, source=_source(name))
  return dirs


@pytest.mark.parametrize("name", list(SOURCES))
def test_each_source_becomes_a_disjoint_deterministic_split(prepared, name):
  data_dir = prepared[name]
  train, validation = _split_texts(data_dir, "train"), _split_texts(data_dir, "validation")
  expected = _expected_documents(name)
  assert sorted(train + validation) == sorted(expected)
  fraction = SOURCES[name]["validation_fraction"]
  assert train == [d for d in expected if not sources.is_validation(d, fraction)]  # input order
  assert 0 < len(validation) <= len(expected) / 2
  info = manifest.read(data_dir)
  assert info["corpus"] == name and info["splits"]["train"]["documents"] == len(train)
  assert info["splits"]["validation"]["characters"] == sum(len(d) for d in validation)
  assert info["tokens"]["byte"]["train"] == sum(len(d.encode()) + 1 for d in train)


@pytest.mark.parametrize("name", list(SOURCES))
def test_each_source_feeds_the_grain_loader(prepared, name):
  tok = tokenizer_lib.ByteTokenizer()
  batch = next(loader.train_iterator(prepared[name], tok, seq_len=SEQ_LEN, global_batch_size=4))
  assert batch["inputs"].shape == batch["targets"].shape == (4, SEQ_LEN)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  evals = list(loader.eval_batches(prepared[name], tok, seq_len=SEQ_LEN, global_batch_size=4))
  assert evals and all(b["inputs"].shape == (4, SEQ_LEN) for b in evals)
  shards = [set(r.tobytes() for b in _take(loader.train_iterator(
      prepared[name], tok, seq_len=SEQ_LEN, global_batch_size=4, process_index=p,
      process_count=2, shuffle=False), 3) for r in b["inputs"]) for p in (0, 1)]
  assert not shards[0] & shards[1]  # per-process sharding as for the bundled corpus


def test_validation_path_holds_out_whole_files(tmp_path):
  source = sources.CorpusSource(kind="text", path=str(FIXTURES / "text" / "*.txt"),
                                validation_path=str(FIXTURES / "text" / "more" / "*.txt"))
  loader.prepare(str(tmp_path), "byte", BYTE_VOCAB, source=source)
  macbeth = corpus.chunk_text((FIXTURES / "text" / "more" / "macbeth.txt").read_text())
  assert _split_texts(str(tmp_path), "validation") == macbeth
  assert not set(_split_texts(str(tmp_path), "train")) & set(macbeth)
  with pytest.raises(ValueError, match="one split only"):
    sources.input_files(sources.CorpusSource(kind="text", path=source.path,
                                             validation_path=source.path))


def test_manifest_skips_preparation_and_changed_inputs_prepare_again(tmp_path, monkeypatch):
  corpus_dir = tmp_path / "corpus"
  shutil.copytree(FIXTURES / "text", corpus_dir)
  data_dir = str(tmp_path / "data")
  source = sources.CorpusSource(kind="text", path=str(corpus_dir / "**" / "*.txt"),
                                validation_fraction=0.2)
  first = tfds_builder.prepare_corpus(data_dir, source)
  shard_dir = pathlib.Path(data_dir) / first["prepared"]
  shard = next(shard_dir.rglob("*train.array_record*"))
  before = shard.stat().st_mtime_ns

  calls = []
  real_hash = sources.content_sha256
  monkeypatch.setattr(sources, "content_sha256", lambda *a: calls.append("hash") or real_hash(*a))
  monkeypatch.setattr(tfds_builder, "_count_documents",
                      lambda *a: pytest.fail("unchanged inputs must not be read again"))
  assert tfds_builder.prepare_corpus(data_dir, source) == first
  assert calls == []  # same stats: not even hashed
  hamlet = corpus_dir / "hamlet.txt"
  os.utime(hamlet, ns=(before, before + 10**9))  # touched, same bytes: hashed, not rebuilt
  touched = tfds_builder.prepare_corpus(data_dir, source)
  assert calls == ["hash"] and touched["prepared"] == first["prepared"]
  assert touched["files"] != first["files"] and shard.stat().st_mtime_ns == before

  monkeypatch.undo()
  hamlet.write_text(hamlet.read_text() + "\n\nA new paragraph, never seen before.\n")
  changed = tfds_builder.prepare_corpus(data_dir, source)
  assert changed["prepared"] != first["prepared"] and not shard_dir.exists()
  assert any("never seen before" in d for split in corpus.SPLITS
             for d in _split_texts(data_dir, split))


def test_trained_sentencepiece_lives_with_its_corpus(prepared, tmp_path):
  data_dir = str(tmp_path)
  tok = loader.prepare(data_dir, "sentencepiece", 400, source=_source("text"))
  path = tokenizer_training.sentencepiece_path(data_dir, 400)
  assert path.parent == manifest.prepared_dir(data_dir) and path.exists()
  text = _split_texts(data_dir, "validation")[0]
  assert tok.decode(tok.encode(text)) == text and len(tok.encode(text)) < len(text) / 1.5
  assert manifest.read(data_dir)["tokens"]["sentencepiece-trained-400"]["train"] > 0
  with pytest.raises(ValueError, match="holds the 'text' corpus"):
    loader.prepare(data_dir, "byte", BYTE_VOCAB)  # the bundled corpus needs its own data_dir
  del prepared


def test_resumed_iterator_continues_at_the_same_position(prepared):
  tok = tokenizer_lib.ByteTokenizer()

  def make():
    return loader.train_iterator(prepared["jsonl"], tok, seq_len=SEQ_LEN, global_batch_size=4,
                                 seed=2)

  it = make()
  _take(it, 7)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 4)
  resumed = make()
  resumed.set_state(state)
  for e, a in zip(expected, _take(resumed, 4)):
    np.testing.assert_array_equal(e["inputs"], a["inputs"])


# Tokenizers loaded from files.

def _hf_tokenizer_json(tmp_path, vocab_size=300):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_expected_documents("text"), trainer)
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  return path


def test_huggingface_tokenizer_json_loads_and_feeds_the_loader(prepared, tmp_path):
  path = _hf_tokenizer_json(tmp_path)
  tok = tokenizer_lib.load_tokenizer("huggingface", "", 300, str(path))
  text = "To be, or not to be: that is the question.\nÜnïcödé ☃"
  assert tok.decode(tok.encode(text)) == text
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 300)
  assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)
  assert tokenizer_lib.load_tokenizer("huggingface", "", 300, str(tmp_path)).eos_id == 2  # a dir
  data_dir = str(tmp_path / "data")
  tok = loader.prepare(data_dir, "huggingface", 300, source=_source("jsonl"),
                       tokenizer_path=str(path))
  it = loader.train_iterator(data_dir, tok, seq_len=SEQ_LEN, global_batch_size=4, shuffle=False)
  inputs = np.concatenate([b["inputs"] for b in _take(it, 4)])
  assert inputs.max() < 300 and (inputs == tok.eos_id).any()
  del prepared


def test_sentencepiece_model_file_loads(tmp_path):
  path = tmp_path / "my.model"
  path.write_bytes(tokenizer_training.train_sentencepiece(_expected_documents("jsonl"), 350))
  tok = tokenizer_lib.load_tokenizer("sentencepiece", str(tmp_path), 350, str(path))
  assert tok.vocab_size == 350 and tok.decode(tok.encode("Iago, thou")) == "Iago, thou"
  assert not tokenizer_training.sentencepiece_path(tmp_path, 350).exists()  # loaded, not trained


# Bad input gets a clear error.

def test_vocabulary_mismatch_names_both_sizes_and_the_key(tmp_path):
  path = _hf_tokenizer_json(tmp_path)
  with pytest.raises(ValueError, match=r"huggingface tokenizer loaded from data\.tokenizer_path="
                                       r".* has 300 tokens but model\.vocab_size=256 .*use the tokenizer "
                                       r"it was trained with.*--config\.model\.vocab_size=300"):
    tokenizer_lib.load_tokenizer("huggingface", "", 256, str(path))
  # A Hugging Face embedding may have more rows than the tokenizer has tokens (Qwen2.5 pads its vocabulary).
  assert tokenizer_lib.load_tokenizer("huggingface", "", 512, str(path)).vocab_size == 300
  sp_path = tmp_path / "my.model"
  sp_path.write_bytes(tokenizer_training.train_sentencepiece(_expected_documents("jsonl"), 350))
  with pytest.raises(ValueError, match=r"has 350 tokens but model\.vocab_size=2048"):
    loader.prepare(str(tmp_path / "d"), "sentencepiece", 2048, source=_source("jsonl"),
                   tokenizer_path=str(sp_path))
  with pytest.raises(ValueError, match="byte tokenizer has 259 tokens"):
    loader.prepare(str(tmp_path / "d"), "byte", 512, source=_source("jsonl"))
  with pytest.raises(ValueError, match="is not a file"):
    tokenizer_lib.load_tokenizer("huggingface", "", 300, str(tmp_path / "missing.json"))


def test_empty_glob_is_refused(tmp_path):
  source = sources.CorpusSource(kind="text", path=str(tmp_path / "*.txt"))
  with pytest.raises(ValueError, match=r"data\.path=.*\*\.txt' matches no files"):
    loader.prepare(str(tmp_path / "data"), "byte", BYTE_VOCAB, source=source)
  assert not (tmp_path / "data").exists()  # refused before anything was written


def test_missing_jsonl_field_names_file_line_and_keys(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "one"}\n{"text": "two"}\n{"body": "three"}\n')
  source = sources.CorpusSource(kind="jsonl", path=str(bad), field="text")
  with pytest.raises(ValueError, match=r"bad\.jsonl line 3 has no field 'text' \(it has \['body'\]\)"
                                       r"; set data\.field"):
    loader.prepare(str(tmp_path / "data"), "byte", BYTE_VOCAB, source=source)
  assert not list((tmp_path / "data").rglob("*.array_record*"))


def test_parquet_errors_name_the_column_or_the_install(monkeypatch):
  pytest.importorskip("pyarrow")
  with pytest.raises(ValueError, match=r"no column 'text' \(it has \['work', 'content'\]\)"):
    list(sources.iter_documents("parquet", "text", [str(FIXTURES / "docs.parquet")]))
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if not installed
  with pytest.raises(ValueError, match=r"pip install 'shardlm\[parquet\]'"):
    list(sources.iter_documents("parquet", "content", [str(FIXTURES / "docs.parquet")]))


def test_bad_settings_are_refused_by_the_config():
  from configs.base import base_config  # pylint: disable=g-import-not-at-top
  from launch.run.config import validate  # pylint: disable=g-import-not-at-top
  c = base_config()
  c.data.corpus, c.data.tokenizer = "jsonl", "huggingface"
  c.data.field, c.data.validation_fraction = "", 1.5
  with pytest.raises(ValueError) as error:
    validate(c)
  for key in ("data.path", "data.field", "data.validation_fraction", "data.tokenizer_path"):
    assert key in str(error.value)
  c = base_config()
  c.data.path = "*.txt"
  with pytest.raises(ValueError, match="set data.corpus"):
    validate(c)
  with pytest.raises(ValueError, match="not a file format"):
    sources.CorpusSource(kind="csv", path="*.csv")


# End to end.

def test_training_on_a_text_glob_runs(tmp_path):
  from launch.run.config import validate  # pylint: disable=g-import-not-at-top
  from launch.run.loop import train  # pylint: disable=g-import-not-at-top
  from configs.smoke import get_config  # pylint: disable=g-import-not-at-top
  c = get_config()
  c.data.corpus = "text"
  c.data.path = str(FIXTURES / "text" / "**" / "*.txt")
  c.data.validation_fraction = SOURCES["text"]["validation_fraction"]
  c.data.data_dir = str(tmp_path / "data")
  c.train.steps, c.train.log_every, c.train.eval_batches = 3, 1, 1
  c.train.tensorboard, c.checkpoint.save_every, c.checkpoint.async_save = False, 100, False
  result = train(validate(c), str(tmp_path / "run"))
  assert result.final_step == 3 and np.isfinite(result.train_loss) and np.isfinite(result.val_loss)
  assert manifest.read(c.data.data_dir)["tokens"]["sentencepiece-trained-512"]["validation"] > 0
