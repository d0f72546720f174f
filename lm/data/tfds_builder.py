"""tensorflow_datasets builders that write corpus documents as array_record shards.

array_record shards are read through `builder.as_data_source()` (random access, no TensorFlow),
which is what grain consumes. The builders' `DatasetInfo` is built directly, so no metadata files
or checksums are needed. The bundled corpus lands in `<data_dir>/shakespeare/<VERSION>/`; a corpus
of your own (`CorpusBuilder`) in `<data_dir>/<prepared>/corpus/<VERSION>/`, where `<prepared>` is
named by the content hash and recorded in `<data_dir>/manifest.json` (see manifest.py).
"""

import datetime
import hashlib
import json
import os
import pathlib
import shutil
from typing import Any

import tensorflow_datasets as tfds
import tqdm

from lm.data import corpus
from lm.data import manifest as manifest_lib
from lm.data import sources

NAME = "shakespeare"
CORPUS_NAME = "corpus"
_DOWNLOAD_CONFIG = dict(try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP)


def _features(prompts: bool = False) -> tfds.features.FeaturesDict:
  """{"text", "title"}, plus "prompt" (unscored text before the response; "" for plain documents)."""
  features = {"text": tfds.features.Text(), "title": tfds.features.Text()}
  if prompts:
    features["prompt"] = tfds.features.Text()
  return tfds.features.FeaturesDict(features)


class ShakespeareBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The bundled Shakespeare corpus; each example is one document: {"text": str, "title": str}.

  Splits: "train" and "validation", exactly `corpus.documents(split)` in order (shuffling is off at
  write time so shard order is corpus order; the grain loader shuffles per epoch).
  """
  name = NAME
  # Bump when corpus.py changes what the documents are, so old shards are not reused.
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Works cut into ~4 KB documents at paragraph breaks."}
  # Nothing is downloaded. Without this, tfds looks for a checksums file next to this module, and
  # that lookup imports `importlib_resources`, which tensorflow-datasets does not install.
  url_infos = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=_features(),
        disable_shuffling=True,
        homepage="https://www.gutenberg.org/",
        license="Public domain (Project Gutenberg texts).",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the corpus ships with the repository; nothing is downloaded
    return {split: self._generate_examples(split) for split in corpus.SPLITS}

  def _generate_examples(self, split):
    for index, doc in enumerate(corpus.documents(split)):
      yield f"{doc.title}/{index:05d}", {"text": doc.text, "title": doc.title}


def get_builder(data_dir: str | pathlib.Path) -> ShakespeareBuilder:
  """Returns the builder that stores its array_record shards under `data_dir`."""
  return ShakespeareBuilder(data_dir=str(data_dir), file_format="array_record")


def prepare_shards(data_dir: str | pathlib.Path) -> ShakespeareBuilder:
  """Writes the shards into `data_dir` unless they already exist (then a no-op); returns the builder.

  Takes ~0.2 s. Nothing is downloaded: the GCS lookup and statistics are switched off. Safe when
  several processes share `data_dir`: tfds writes into a temporary directory and renames it; a
  process that loses that race finds the winner's shards and returns them.
  """
  held = manifest_lib.read(data_dir)
  if held is not None:
    raise ValueError(f"data.data_dir={str(data_dir)!r} holds the {held['corpus']!r} corpus prepared "
                     f"from {held['source']['path']!r}; give the bundled corpus another "
                     "data.data_dir (e.g. runs/data).")
  builder = get_builder(data_dir)
  if builder.is_prepared():
    return builder
  tfds.disable_progress_bar()  # a sub-second job; its progress bars would only clutter the logs
  try:
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(**_DOWNLOAD_CONFIG))
  except FileExistsError:  # another process renamed its finished shards into place first
    builder = get_builder(data_dir)
    if not builder.is_prepared():
      raise
  return builder


def data_source(data_dir: str | pathlib.Path, split: str):
  """Returns the random-access source of one prepared split; element i is {"text": bytes, "title":
  bytes} (and "prompt": bytes for a corpus of your own).

  Raises a ValueError naming the fix when the shards have not been prepared yet.
  """
  if split not in corpus.SPLITS:
    raise ValueError(f"split={split!r} is not one of {corpus.SPLITS}.")
  own = manifest_lib.prepared_dir(data_dir)
  builder = get_builder(data_dir) if own is None else CorpusBuilder(data_dir=str(own))
  if not builder.is_prepared():
    raise ValueError(f"No prepared {NAME} shards in data_dir={str(data_dir)!r}; call "
                     "lm.data.loader.prepare(data_dir, ...) first.")
  return builder.as_data_source(split=split)


class CorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A corpus of your own (sources.CorpusSource); each example is {"text", "title", "prompt"} (str;
  the prompt is "" unless data.prompt_field names one).

  Splits "train" and "validation" hold exactly `sources.split_documents(source, files, split)` in
  order. `source`, `files` and `counts` ({split: documents}, for the progress bar) are needed only to
  write the shards; reading them back needs just `data_dir`.
  """
  name = CORPUS_NAME
  # Bump when sources.py changes what the documents are, so old shards are not reused.
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Text files cut at blank lines; JSONL/Parquet records verbatim.",
                   "1.1.0": "A prompt beside each document (instruction data, data.prompt_field)."}
  url_infos = None  # nothing is downloaded (see ShakespeareBuilder)

  def __init__(self, *, source: sources.CorpusSource | None = None,
               files: dict[str, list[str]] | None = None, counts: dict[str, int] | None = None,
               **kwargs):
    self._source, self._files, self._counts = source, files, counts or {}
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=_features(prompts=True), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # local files; nothing is downloaded
    if self._source is None:
      raise ValueError("CorpusBuilder needs `source` and `files` to write shards; use "
                       "tfds_builder.prepare_corpus(data_dir, source).")
    return {split: self._generate_examples(split) for split in corpus.SPLITS}

  def _generate_examples(self, split):
    with tqdm.tqdm(total=self._counts.get(split), unit="doc", desc=f"Writing {split} shards") as bar:
      docs = sources.split_documents(self._source, self._files, split)
      for index, doc in enumerate(docs):
        yield index, {"text": doc.text, "title": doc.title, "prompt": doc.prompt}
        bar.update()


def _prepared_name(source: sources.CorpusSource, content: dict[str, str | None]) -> str:
  """`<kind>-<12 hex>`: a hash of the inputs' bytes and of every setting that shapes a document.

  Paths are left out, so moving the corpus keeps its shards.
  """
  spec = {k: v for k, v in source.spec().items() if k not in ("path", "validation_path")}
  key = json.dumps({"spec": spec, "content": content, "builder": str(CorpusBuilder.VERSION)},
                   sort_keys=True)
  return f"{source.kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _hash_inputs(source: sources.CorpusSource, files: dict[str, list[str]]) -> dict[str, str | None]:
  """{"train": sha256, "validation": sha256 or None (a fraction split reads the train files)}."""
  splits = ("train", "validation") if source.validation_path else ("train",)
  total = sum(os.path.getsize(p) for s in splits for p in files[s])
  with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc="Hashing corpus") as bar:
    content = {s: sources.content_sha256(files[s], bar.update) for s in splits}
  return {"train": content["train"], "validation": content.get("validation")}


def _count_documents(source: sources.CorpusSource,
                     files: dict[str, list[str]]) -> dict[str, dict[str, int]]:
  """Reads every input once: {split: {"documents", "characters"}}; raises on bad input before any
  shard is written."""
  counts = {s: {"documents": 0, "characters": 0} for s in corpus.SPLITS}
  paths = files["train"] + (files["validation"] if source.validation_path else [])
  sizes = {p: os.path.getsize(p) for p in paths}
  with tqdm.tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="Reading corpus") as bar:
    def done(path):
      bar.update(sizes[path])
    for split in (corpus.SPLITS if source.validation_path else ("train",)):
      for doc in sources.iter_documents(source.kind, source.field, files[split], done,
                                        source.prompt_field):
        text = doc.prompt + doc.text
        if source.validation_path:
          to = split
        else:
          to = "validation" if sources.is_validation(text, source.validation_fraction) else "train"
        counts[to]["documents"] += 1
        counts[to]["characters"] += len(text)
  for split, count in counts.items():
    if not count["documents"]:
      fix = ("raise data.validation_fraction or set data.validation_path"
             if split == "validation" and not source.validation_path
             else f"check data.{'validation_path' if split == 'validation' else 'path'}")
      raise ValueError(f"The {split} split of data.corpus={source.kind!r} from "
                       f"{source.path!r} has no documents; {fix}.")
  return counts


def prepare_corpus(data_dir: str | pathlib.Path, source: sources.CorpusSource) -> dict[str, Any]:
  """Prepares `source` into shards under `data_dir` unless they are current; returns the manifest.

  Unchanged settings and file stats (path, size, mtime): returns at once, reading no input. Else
  the inputs are hashed; the same hash reuses the shards (only the stats are updated), a new one
  reads and checks every document, writes new shards (progress bars on stderr), records them in
  `<data_dir>/manifest.json` and deletes the shards the old manifest named. Raises ValueError for an
  empty glob, a missing JSONL field / Parquet column, an empty split, or a data_dir that holds the
  bundled corpus.
  """
  data_dir = pathlib.Path(data_dir)
  if (data_dir / NAME).exists():
    raise ValueError(f"data.data_dir={str(data_dir)!r} holds the bundled shakespeare shards; give "
                     f"data.corpus={source.kind!r} a data.data_dir of its own "
                     "(e.g. runs/data-mycorpus).")
  files = sources.input_files(source)
  stats = {split: sources.file_stats(paths) for split, paths in files.items()}
  old = manifest_lib.read(data_dir)

  def is_built(name):
    return CorpusBuilder(data_dir=str(data_dir / name)).is_prepared()

  if old and old["source"] == source.spec() and old["files"] == stats and is_built(old["prepared"]):
    return old
  content = _hash_inputs(source, files)
  name = _prepared_name(source, content)
  if old and old["prepared"] == name and is_built(name):
    manifest = {**old, "source": source.spec(), "files": stats}
    manifest_lib.write(data_dir, manifest)
    return manifest
  counts = _count_documents(source, files)
  if not is_built(name):
    tfds.disable_progress_bar()  # ours count documents; tfds's would only repeat them
    builder = CorpusBuilder(data_dir=str(data_dir / name), source=source, files=files,
                            counts={s: c["documents"] for s, c in counts.items()})
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(**_DOWNLOAD_CONFIG))
    except FileExistsError:  # another process renamed its finished shards into place first
      if not is_built(name):
        raise
  manifest = {"version": manifest_lib.VERSION, "corpus": source.kind, "source": source.spec(),
              "files": stats, "content_sha256": content,
              "builder_version": str(CorpusBuilder.VERSION), "prepared": name, "splits": counts,
              "tokens": {},
              "prepared_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  manifest_lib.write(data_dir, manifest)
  if old and old["prepared"] != name:  # inputs changed: the old shards and tokenizers are stale
    shutil.rmtree(data_dir / old["prepared"], ignore_errors=True)
  return manifest
