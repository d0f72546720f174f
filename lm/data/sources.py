"""Your own corpus: which files, how each becomes documents, and which documents are validation.

A `CorpusSource` names local files in one of three formats:
  * "text":    plain UTF-8 files (a glob; `.gz` is read too). Each file is cut into ~4 KB documents
               at blank lines, as the bundled corpus is (corpus.chunk_text).
  * "jsonl":   one JSON object per line; the string under `field` is one document, verbatim.
  * "parquet": the string column `field`; each row is one document, verbatim (needs pyarrow).
Empty and whitespace-only documents are skipped; nothing else is changed.

Instruction data (JSONL or Parquet) names a second field, `prompt_field`: each record is then a prompt
and a response (`field`), kept apart so that training scores the response only (lm/data/loader.py
gives prompt tokens loss weight 0). The prompt is used verbatim: put any template into it.

Validation is either a separate set of files (`validation_path`, same format) or a deterministic
fraction of the documents: a document is held out iff the first 8 bytes of sha256(text), read as a
fraction of 2**64, are below `validation_fraction`. That depends on the document alone, so adding
files never moves a document between splits, and duplicate documents land in the same split.

No module here imports tfds or jax; tfds_builder.py writes these documents into shards.
"""

import dataclasses
import glob
import gzip
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from lm.data import corpus

KINDS = ("text", "jsonl", "parquet")


class Document(NamedTuple):
  """One document: where it came from ("b.jsonl:17"), its text, and its prompt ("" for plain text).

  With a prompt, the document is prompt + text and only the text (the response) is scored.
  """
  title: str
  text: str
  prompt: str
SPLITS = corpus.SPLITS
_HASH_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class CorpusSource:
  """Where a corpus comes from (the `data.*` keys of the same names).

  kind: "text" | "jsonl" | "parquet". path: a glob of input files (`**` recurses), matched in sorted
  order. field: the JSONL key or Parquet column that holds the text (unused for "text").
  validation_path: a glob of held-out files in the same format; "" splits off
  `validation_fraction` (in (0, 1)) of the documents instead. prompt_field: "" (plain documents),
  or the JSONL key / Parquet column of each record's prompt, whose tokens are not scored.
  """
  kind: str
  path: str
  field: str = "text"
  validation_path: str = ""
  validation_fraction: float = 0.05
  prompt_field: str = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"data.corpus={self.kind!r} is not a file format; choose one of {KINDS} "
                       "(or 'shakespeare' for the bundled corpus).")
    if not self.path:
      raise ValueError(f"data.corpus={self.kind!r} needs data.path, a glob of input files "
                       "(e.g. '/data/books/*.txt').")
    if self.kind != "text" and not self.field:
      raise ValueError(f"data.corpus={self.kind!r} needs data.field, the "
                       f"{'JSON key' if self.kind == 'jsonl' else 'column'} holding the text.")
    if not self.validation_path and not 0 < self.validation_fraction < 1:
      raise ValueError(f"data.validation_fraction={self.validation_fraction} must be in (0, 1) "
                       "when data.validation_path is empty (e.g. 0.05), or set data.validation_path.")
    if self.prompt_field and self.kind == "text":
      raise ValueError(f"data.prompt_field={self.prompt_field!r} needs records with named fields; "
                       "use data.corpus='jsonl' or 'parquet', or clear data.prompt_field.")
    if self.prompt_field and self.prompt_field == self.field:
      raise ValueError(f"data.prompt_field and data.field are both {self.field!r}; the prompt and "
                       "the response must be different fields.")

  def spec(self) -> dict[str, Any]:
    """The settings as plain JSON types (what the manifest records)."""
    spec = dataclasses.asdict(self)
    if not self.prompt_field:
      del spec["prompt_field"]  # plain corpora keep the manifest (and shard name) they had
    if self.validation_path:
      spec["validation_fraction"] = None  # ignored: a separate validation source is given
    return spec


def from_config(data) -> CorpusSource | None:
  """Returns the source named by a DataConfig (`launch.run.config`), or None for the bundled corpus.

  Reads the attributes corpus, path, field, prompt_field, validation_path and validation_fraction.
  """
  if data.corpus == "shakespeare":
    return None
  return CorpusSource(kind=data.corpus, path=data.path, field=data.field,
                      validation_path=data.validation_path,
                      validation_fraction=data.validation_fraction,
                      prompt_field=data.prompt_field)


def list_files(pattern: str, key: str = "data.path") -> list[str]:
  """Returns the files `pattern` matches, as sorted absolute paths; ValueError when there are none."""
  paths = sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    hint = (" It is a directory: add a file pattern such as '/*.txt'."
            if os.path.isdir(os.path.expanduser(pattern)) else "")
    raise ValueError(f"{key}={pattern!r} matches no files (relative paths start at "
                     f"{os.getcwd()!r}).{hint} Point {key} at your corpus files.")
  return paths


def input_files(source: CorpusSource) -> dict[str, list[str]]:
  """Returns {"train": [...], "validation": [...]} files; a fraction split has no validation files
  (both splits are read from the train files)."""
  train = list_files(source.path, "data.path")
  if not source.validation_path:
    return {"train": train, "validation": []}
  validation = list_files(source.validation_path, "data.validation_path")
  shared = sorted(set(train) & set(validation))
  if shared:
    raise ValueError(f"data.path and data.validation_path both match {shared[:3]}; a file must be "
                     "in one split only.")
  return {"train": train, "validation": validation}


def is_validation(text: str, fraction: float) -> bool:
  """Whether a document belongs to the validation split of a `fraction` split (see module doc)."""
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") < fraction * 2.0**64


def _open_text(path: str) -> str:
  with open(path, "rb") as f:
    data = f.read()
  if path.endswith(".gz"):
    data = gzip.decompress(data)
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not UTF-8 text ({e}); convert it or leave it out of data.path.") from e


def _text_documents(path: str) -> Iterator[tuple[str, str]]:
  text = _open_text(path).replace("\r\n", "\n")
  name = os.path.basename(path)
  for i, chunk in enumerate(corpus.chunk_text(text)):
    yield f"{name}#{i}", chunk


def _jsonl_documents(path: str, field: str, prompt_field: str) -> Iterator[Document]:
  name = os.path.basename(path)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:  # streamed: a JSONL file may be larger than memory
    for number, raw in enumerate(f, start=1):
      yield from _jsonl_record(path, name, number, raw, field, prompt_field)


def _record_string(record: dict, key: str, setting: str, path: str, number: int) -> str | None:
  """record[key] as a string (None for a null), or a ValueError naming the line and the setting."""
  what = "prompt" if setting == "data.prompt_field" else "text"
  if key not in record:
    raise ValueError(f"{path} line {number} has no field {key!r} (it has {sorted(record)}); set "
                     f"{setting} to the key that holds the {what}.")
  value = record[key]
  if value is not None and not isinstance(value, str):
    raise ValueError(f"{path} line {number}: field {key!r} is a {type(value).__name__}, not a "
                     f"string; set {setting} to the key that holds the {what}.")
  return value


def _jsonl_record(path: str, name: str, number: int, raw: bytes, field: str,
                  prompt_field: str = "") -> Iterator[Document]:
  """The document of line `number` of a JSONL file (none for a blank line or a null value)."""
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} line {number} is not UTF-8 ({e}); convert the file.") from e
  if line.strip():
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} line {number} is not JSON ({e}); data.corpus='jsonl' expects one "
                       "object per line.") from e
    if not isinstance(record, dict):
      raise ValueError(f"{path} line {number} is a JSON {type(record).__name__}, not an object; "
                       f"data.corpus='jsonl' expects one object per line with the key {field!r}.")
    text = _record_string(record, field, "data.field", path, number)
    prompt = _record_string(record, prompt_field, "data.prompt_field", path, number) if prompt_field else ""
    if text is not None:
      yield Document(f"{name}:{number}", text, prompt or "")


def _import_pyarrow_parquet():
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError("data.corpus='parquet' needs pyarrow: pip install 'shardlm[parquet]' "
                     "(or pip install pyarrow).") from e
  return pq


def _parquet_documents(path: str, field: str, prompt_field: str) -> Iterator[Document]:
  pq = _import_pyarrow_parquet()
  file = pq.ParquetFile(path)
  names = file.schema_arrow.names
  columns = [(field, "data.field")] + ([(prompt_field, "data.prompt_field")] if prompt_field else [])
  for column, setting in columns:
    if column not in names:
      raise ValueError(f"{path} has no column {column!r} (it has {names}); set {setting} to the "
                       "column that holds it.")
    column_type = file.schema_arrow.field(column).type
    if str(column_type) not in ("string", "large_string", "string_view"):
      raise ValueError(f"{path}: column {column!r} has type {column_type}, not string; set "
                       f"{setting} to a string column.")
  name, row = os.path.basename(path), 0
  for batch in file.iter_batches(columns=[c for c, _ in columns], batch_size=1024):
    texts = batch.column(0).to_pylist()
    prompts = batch.column(1).to_pylist() if prompt_field else [""] * len(texts)
    for text, prompt in zip(texts, prompts):
      if text is not None:
        yield Document(f"{name}:{row}", text, prompt or "")
      row += 1


def iter_documents(kind: str, field: str, paths: list[str],
                   on_file_done: Callable[[str], None] | None = None,
                   prompt_field: str = "") -> Iterator[Document]:
  """Yields a Document (title, text, prompt) for every non-empty document of `paths`, in file order.

  Titles name the file and the position in it ("a.txt#3", "b.jsonl:17", "c.parquet:0"); `prompt` is
  "" unless `prompt_field` names the records' prompt (JSONL / Parquet). A record whose text
  (response) is empty is skipped. `on_file_done(path)` is called after each file (progress bars).
  """
  for path in paths:
    if kind == "text":
      docs = (Document(title, text, "") for title, text in _text_documents(path))
    elif kind == "jsonl":
      docs = _jsonl_documents(path, field, prompt_field)
    elif kind == "parquet":
      docs = _parquet_documents(path, field, prompt_field)
    else:
      raise ValueError(f"data.corpus={kind!r} is not one of {KINDS}.")
    for doc in docs:
      if doc.text.strip():
        yield doc
    if on_file_done is not None:
      on_file_done(path)


def split_documents(source: CorpusSource, files: dict[str, list[str]], split: str,
                    on_file_done: Callable[[str], None] | None = None) -> Iterator[Document]:
  """Yields the Documents of `split` ("train" or "validation") in input order."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}.")
  paths = files[split] if source.validation_path else files["train"]
  docs = iter_documents(source.kind, source.field, paths, on_file_done, source.prompt_field)
  if source.validation_path:
    yield from docs
    return
  held_out = split == "validation"
  for doc in docs:
    if is_validation(doc.prompt + doc.text, source.validation_fraction) == held_out:
      yield doc


def file_stats(paths: list[str]) -> list[list]:
  """[[path, size in bytes, mtime in ns], ...]: a cheap fingerprint; equal stats skip re-hashing."""
  return [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]


def content_sha256(paths: list[str], on_bytes: Callable[[int], None] | None = None) -> str:
  """Returns sha256 over the files' sizes and bytes in order; names do not count, so a moved corpus
  keeps its hash. `on_bytes(n)` reports progress."""
  digest = hashlib.sha256()
  for path in paths:
    digest.update(f"{os.path.getsize(path)}\n".encode())
    with open(path, "rb") as f:
      while chunk := f.read(_HASH_CHUNK):
        digest.update(chunk)
        if on_bytes is not None:
          on_bytes(len(chunk))
  return digest.hexdigest()
