"""A run's inputs in a bucket, made local once: the libraries that read them open local files only.

SentencePiece, `tokenizers`, safetensors and the corpus readers (lm/data/sources.py) take a local
path. A config whose data.tokenizer_path, data.path or data.validation_path is a gs:// URL (or glob)
gets those objects copied into the local cache (launch/storage/paths.py: `local_copy`, under
$SHARDLM_GCS_CACHE) and the keys pointed at the copies, just before the data loader reads them; lm/
never sees a URL.
A gs:// data.data_dir is a prepared corpus published in the bucket (launch/storage/published_corpus.py):
it is prepared or downloaded into a local cache directory, and every reader gets that directory
(`local_data`). `prepare` is the one call that readies a config's data before anything reads it.
"""

import dataclasses
import os

import jax

from launch.run.config import DataConfig
from launch.storage import bucket
from launch.storage import paths
from launch.storage import published_corpus
from lm.data import loader
from lm.data import tokenizer as tokenizer_lib


def _local_glob(pattern: str, key: str) -> str:
  """The local path or glob matching the cached copies of what `pattern` (a gs:// path or glob) names."""
  matched = paths.glob(pattern)
  if not matched:
    raise ValueError(f"{key}={pattern!r} matches no object; check the bucket and the pattern.")
  root, rest = paths.split_glob(paths.normalize(pattern))
  if not rest:
    return paths.local_copy(root)
  for url in matched:
    paths.local_copy(url)
  return os.path.join(paths.cache_path(root), rest)


def localize(data: DataConfig) -> DataConfig:
  """`data` with every gs:// input (tokenizer_path, path, validation_path) replaced by its local cached
  copy, and a gs:// data_dir by its local cache directory (see `local_data`); unchanged when none is
  a URL. Only the data loader gets the result: the run's saved config
  keeps the URLs, so it stays valid on any host.

  Raises ValueError for a glob that matches nothing or a tokenizer object that does not exist.
  """
  changes = {"data_dir": local_data(data).data_dir} if paths.is_url(data.data_dir) else {}
  if paths.is_url(data.tokenizer_path):
    if not paths.isfile(data.tokenizer_path):
      raise ValueError(f"data.tokenizer_path={data.tokenizer_path!r}: no such object.")
    changes["tokenizer_path"] = paths.local_copy(data.tokenizer_path)
  for key in ("path", "validation_path"):
    value = getattr(data, key)
    if paths.is_url(value):
      changes[key] = _local_glob(value, f"data.{key}")
  return dataclasses.replace(data, **changes) if changes else data


def local_data(data: DataConfig) -> DataConfig:
  """`data` with a gs:// data_dir replaced by the local directory that holds its copy (no I/O): what
  every reader of the prepared corpus (train_iterator_for, eval_batches, unigram_perplexity) gets
  after `prepare` ran. Unchanged for a local data_dir."""
  if not paths.is_url(data.data_dir):
    return data
  return dataclasses.replace(data, data_dir=paths.cache_path(data.data_dir))


def prepare(data: DataConfig, vocab_size: int) -> tokenizer_lib.Tokenizer:
  """Readies `data`'s prepared corpus and returns its tokenizer (loader.prepare_from_config on the
  localized config). For a gs:// data_dir, a published corpus is downloaded first and a corpus
  prepared or changed here is published after (process 0 only): see published_corpus.py.

  Raises ValueError for bad input, a missing or unwritable bucket (before preparing anything), or a
  corpus that changed in the bucket while it was downloaded.
  """
  local = localize(data)
  if not paths.is_url(data.data_dir):
    return loader.prepare_from_config(local, vocab_size)
  url, primary = paths.normalize(data.data_dir), jax.process_index() == 0
  fetched = published_corpus.fetch(url, local.data_dir)
  if fetched is None and primary:
    bucket.probe(url)  # it will be written: a missing bucket is one error line before any work
  tokenizer = loader.prepare_from_config(local, vocab_size)
  published = published_corpus.publish(url, local.data_dir) if primary else None
  for note in (fetched, published):
    if note and primary:
      print(note, flush=True)
  return tokenizer
