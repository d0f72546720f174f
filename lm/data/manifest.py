"""The manifest of a prepared corpus: what was read, what it became, and where it lies.

`<data_dir>/manifest.json` exists only for a corpus of your own (see sources.py); the bundled
corpus has none. Its fields (all JSON types):

  {"version": 1,
   "corpus": "jsonl",                           # data.corpus
   "source": {"kind", "path", "field", "validation_path", "validation_fraction"},
   "files": {"train": [[path, bytes, mtime_ns], ...], "validation": [...]},
   "content_sha256": {"train": hex, "validation": hex or null},   # null: same files as train
   "builder_version": "1.0.0",
   "prepared": "jsonl-0123456789ab",            # subdirectory of data_dir: shards + tokenizers
   "splits": {"train": {"documents": int, "characters": int}, "validation": {...}},
   "tokens": {"<tokenizer>": {"train": int, "validation": int}},   # filled in per tokenizer
   "prepared_at": "2025-01-01T00:00:00+00:00"}

A second run whose settings and file stats equal "source" and "files" reuses the shards without
reading the inputs; otherwise the inputs are hashed, and the shards are rebuilt only when the
hash (or a setting that changes the documents) differs.
"""

import json
import os
import pathlib
import tempfile
from typing import Any

NAME = "manifest.json"
VERSION = 1


def path(data_dir: str | pathlib.Path) -> pathlib.Path:
  """Returns `<data_dir>/manifest.json`."""
  return pathlib.Path(data_dir) / NAME


def read(data_dir: str | pathlib.Path) -> dict[str, Any] | None:
  """Returns the manifest in `data_dir`, or None when there is none (the bundled corpus)."""
  file = path(data_dir)
  if not file.exists():
    return None
  try:
    manifest = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{file} is not valid JSON ({e}); delete it so the corpus is prepared "
                     "again.") from e
  if manifest.get("version") != VERSION:
    raise ValueError(f"{file} has version {manifest.get('version')!r}, not {VERSION}; it was "
                     "written by other code. Delete it so the corpus is prepared again.")
  return manifest


def write(data_dir: str | pathlib.Path, manifest: dict[str, Any]) -> None:
  """Writes the manifest atomically (temp file + rename), so readers never see half a file."""
  file = path(data_dir)
  file.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=NAME + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)
      f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, file)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def prepared_dir(data_dir: str | pathlib.Path) -> pathlib.Path | None:
  """Returns the directory holding the prepared corpus's shards and tokenizers, or None."""
  manifest = read(data_dir)
  return None if manifest is None else pathlib.Path(data_dir) / manifest["prepared"]


def record_tokens(data_dir: str | pathlib.Path, tokenizer_key: str, counts: dict[str, int]) -> None:
  """Adds {split: tokens} for one tokenizer to the manifest (a no-op without a manifest)."""
  manifest = read(data_dir)
  if manifest is not None:
    manifest.setdefault("tokens", {})[tokenizer_key] = counts
    write(data_dir, manifest)
