"""A run's inputs in a bucket, made local once: the libraries that read them open local files only.

SentencePiece, `tokenizers`, safetensors and the corpus readers (lm/data/sources.py) take a local
path. A config whose data.tokenizer_path, data.path or data.validation_path is a gs:// URL (or glob)
gets those objects copied into the local cache (launch/run/paths.py: `local_copy`, under
$SHARDLM_GCS_CACHE) and the keys pointed at the copies, just before the data loader reads them; lm/
never sees a URL.
data.data_dir, where the prepared shards are written and read with random access, stays local: a
gs:// data.data_dir is refused when the config is validated (launch/run/config.py says why).
"""

import dataclasses
import os

from launch.run import paths
from launch.run.config import DataConfig


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
  return os.path.join(paths.cache_root(), paths.bucket_of(root), paths.object_name(root), rest)


def localize(data: DataConfig) -> DataConfig:
  """`data` with every gs:// input (tokenizer_path, path, validation_path) replaced by its local cached
  copy; unchanged when none is a URL. Only the data loader gets the result: the run's saved config
  keeps the URLs, so it stays valid on any host.

  Raises ValueError for a glob that matches nothing or a tokenizer object that does not exist.
  """
  changes = {}
  if paths.is_url(data.tokenizer_path):
    if not paths.isfile(data.tokenizer_path):
      raise ValueError(f"data.tokenizer_path={data.tokenizer_path!r}: no such object.")
    changes["tokenizer_path"] = paths.local_copy(data.tokenizer_path)
  for key in ("path", "validation_path"):
    value = getattr(data, key)
    if paths.is_url(value):
      changes[key] = _local_glob(value, f"data.{key}")
  return dataclasses.replace(data, **changes) if changes else data
