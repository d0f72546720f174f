"""A tensorflow_datasets builder that writes the corpus documents as array_record shards.

array_record shards are read through `builder.as_data_source()` (random access, no TensorFlow),
which is what grain consumes. The builder's `DatasetInfo` is built directly, so no metadata files
or checksums are needed. Shards land in `<data_dir>/shakespeare/<VERSION>/`.
"""

import pathlib

import tensorflow_datasets as tfds

from lm.data import corpus

NAME = "shakespeare"


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
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "title": tfds.features.Text(),
        }),
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
  builder = get_builder(data_dir)
  if builder.is_prepared():
    return builder
  tfds.disable_progress_bar()  # a sub-second job; its progress bars would only clutter the logs
  try:
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False,
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
        ),
    )
  except FileExistsError:  # another process renamed its finished shards into place first
    builder = get_builder(data_dir)
    if not builder.is_prepared():
      raise
  return builder


def data_source(data_dir: str | pathlib.Path, split: str):
  """Returns the random-access source of one prepared split; element i is {"text": bytes, "title": bytes}.

  Raises a ValueError naming the fix when the shards have not been prepared yet.
  """
  if split not in corpus.SPLITS:
    raise ValueError(f"split={split!r} is not one of {corpus.SPLITS}.")
  builder = get_builder(data_dir)
  if not builder.is_prepared():
    raise ValueError(f"No prepared {NAME} shards in data_dir={str(data_dir)!r}; call "
                     "lm.data.loader.prepare(data_dir, ...) first.")
  return builder.as_data_source(split=split)
