"""grain pipelines that turn the prepared shards into packed, batched next-token examples.

Both pipelines tokenize documents inside grain (a `map`), append EOS to each, concatenate them and cut
the stream into windows of seq_len + 1 tokens (`grain.experimental.ConcatThenSplitIterDataset`), so
nothing is padded; a window gives inputs = window[:-1] and targets = window[1:], and segment_ids, the
index of each input token's document within its row (0, 1, ...; a document ends with its EOS, so
the EOS input that predicts the next document's first token still belongs to the one it ends). The
model masks attention with them, so documents packed in one row do not see each other, and restarts
rotary positions at each document (lm/transformer.py).

Instruction data (a corpus prepared with data.prompt_field) is tokenized as prompt ids + response
ids + EOS, and its batches carry `loss_weights`: 1.0 where the target is a response token or the
EOS, 0.0 where it is a prompt token, so the loss (launch/run/step.py) scores responses only.

Per-process sharding:
  * train: documents are sharded by process (process p reads documents p, p + P, p + 2P, ... of the
    train split) and each process packs its own stream, which is infinite, so every process always
    has a next batch.
  * eval: every process packs the whole validation split in the same order and takes its own rows
    of each global batch, so all processes yield the same number of batches.
"""

import json
from typing import Any

from absl import flags
import grain
import numpy as np
import tqdm

from lm.data import manifest as manifest_lib
from lm.data import sources
from lm.data import tfds_builder
from lm.data import tokenizer as tokenizer_lib

STATE_VERSION = 1
# Documents tokenized ahead of the packer; a 4 KB document is ~1-2 k tokens, so this covers many
# batches while keeping the first batch quick.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=32)
# The manifest's token counts take one tokenizing pass; beyond this many characters it is skipped.
_MAX_COUNTED_CHARS = 200_000_000


def prepare(data_dir: str, tokenizer_kind: str, vocab_size: int, *,
            source: sources.CorpusSource | None = None,
            tokenizer_path: str = "") -> tokenizer_lib.Tokenizer:
  """Builds the tfds shards and the tokenizer in `data_dir` unless they exist; returns the tokenizer.

  The one call the trainer makes before anything compiles (~1-2 s the first time for the bundled
  corpus, ms afterwards). `source` None is the bundled corpus; a `sources.CorpusSource` is
  prepared by `tfds_builder.prepare_corpus` (skipped when its manifest is current), and the first
  time a tokenizer meets it, its token counts are added to the manifest. `tokenizer_path` loads the
  tokenizer from a file instead of training it. Raises ValueError for bad input (see
  prepare_corpus) or a tokenizer whose vocabulary is not `vocab_size` (see load_tokenizer).
  """
  if source is None:
    tfds_builder.prepare_shards(data_dir)
  else:
    tfds_builder.prepare_corpus(data_dir, source)
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_kind, data_dir, vocab_size, tokenizer_path)
  if source is not None:
    key = (f"{tokenizer_kind}:{tokenizer_path}" if tokenizer_path else
           "byte" if tokenizer_kind == "byte" else f"{tokenizer_kind}-trained-{vocab_size}")
    _record_token_counts(data_dir, tokenizer, key)
  return tokenizer


def prepare_from_config(data, vocab_size: int) -> tokenizer_lib.Tokenizer:
  """`prepare` with the settings of a DataConfig (launch.run.config): data_dir, tokenizer,
  tokenizer_path and the source keys (see sources.from_config)."""
  return prepare(data.data_dir, data.tokenizer, vocab_size, source=sources.from_config(data),
                 tokenizer_path=data.tokenizer_path)


def _record_token_counts(data_dir: str, tokenizer: tokenizer_lib.Tokenizer, key: str) -> None:
  """Counts each split's tokens (ids + one EOS per document) once per tokenizer, into the manifest.

  Skipped (recorded as None) above _MAX_COUNTED_CHARS, where the pass would take minutes.
  """
  manifest = manifest_lib.read(data_dir)
  if manifest is None or key in manifest.get("tokens", {}):
    return
  counts = {}
  for split in sources.SPLITS:
    if manifest["splits"][split]["characters"] > _MAX_COUNTED_CHARS:
      counts[split] = None
      continue
    source = tfds_builder.data_source(data_dir, split)
    counts[split] = sum(len(tokenizer.encode(source[i]["text"].decode("utf-8"))) + 1
                        + len(tokenizer.encode(source[i].get("prompt", b"").decode("utf-8")))
                        for i in tqdm.trange(len(source), desc=f"Counting {split} tokens",
                                             unit="doc", leave=False))
  manifest_lib.record_tokens(data_dir, key, counts)


class _Tokenize:
  """grain map: {"text": bytes, ...} -> {"tokens": int32 [n + 1]}, the document's ids then EOS.

  With `prompts`, the example's "prompt" is tokenized first and {"tokens": int32 [p + n + 1],
  "weights": int32 [p + n + 1]} comes out, weights 0 on the p prompt ids and 1 after.
  """

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, prompts: bool = False):
    self._tokenizer, self._prompts = tokenizer, prompts

  def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    ids = self._tokenizer.encode(example["text"].decode("utf-8"))
    ids.append(self._tokenizer.eos_id)
    if not self._prompts:
      return {"tokens": np.asarray(ids, dtype=np.int32)}
    prompt = example["prompt"].decode("utf-8")
    prompt_ids = self._tokenizer.encode(prompt) if prompt else []
    weights = np.concatenate([np.zeros(len(prompt_ids), np.int32), np.ones(len(ids), np.int32)])
    return {"tokens": np.asarray(prompt_ids + ids, dtype=np.int32), "weights": weights}


def has_prompts(data_dir: str) -> bool:
  """Whether the corpus prepared in `data_dir` is instruction data (prepared with data.prompt_field)."""
  prepared = manifest_lib.read(data_dir)
  return bool(prepared and prepared["source"].get("prompt_field"))


def _is_full_window(window: dict[str, np.ndarray]) -> bool:
  # The packer pads only the last window of a finite stream; padding has segment id 0.
  return bool(window["tokens_segment_ids"][-1] != 0)


def _inputs_and_targets(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{"tokens": [B, L + 1], "tokens_segment_ids": [B, L + 1], ...} -> {"inputs", "targets",
  "segment_ids"}, each int32 [B, L], and "loss_weights" float32 [B, L] when the windows carry
  "weights" (a target's weight is its own token's: 0 for a prompt token)."""
  tokens_BxL1 = batch["tokens"]
  # grain numbers the documents of a window 1, 2, ... (0 is padding, which full windows never have).
  segment_ids_BxL = batch["tokens_segment_ids"][:, :-1].astype(np.int32) - 1
  out = {"inputs": np.ascontiguousarray(tokens_BxL1[:, :-1]),
         "targets": np.ascontiguousarray(tokens_BxL1[:, 1:]),
         "segment_ids": np.ascontiguousarray(segment_ids_BxL)}
  if "weights" in batch:
    out["loss_weights"] = np.ascontiguousarray(batch["weights"][:, 1:], dtype=np.float32)
  return out


class _RowSlice:
  """grain map on a global batch: keeps rows [start, stop) of every array."""

  def __init__(self, start: int, stop: int):
    self._start, self._stop = start, stop

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v[self._start:self._stop] for k, v in batch.items()}


def _packed_windows(docs: grain.MapDataset, tokenizer: tokenizer_lib.Tokenizer,
                    seq_len: int, prompts: bool = False) -> grain.IterDataset:
  """Documents -> full windows {"tokens": int32 [seq_len + 1], ...} of the concatenated stream
  (and "weights" alike, packed in step with the tokens, when `prompts`)."""
  tokens = docs.map(_Tokenize(tokenizer, prompts)).to_iter_dataset(_READ_OPTIONS)
  lengths = {"tokens": seq_len + 1, **({"weights": seq_len + 1} if prompts else {})}
  windows = grain.experimental.ConcatThenSplitIterDataset(tokens, length_struct=lengths)
  return windows.filter(_is_full_window)


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count}; set train.global_batch_size to a multiple.")
  return global_batch_size // process_count


def _check_seq_len(seq_len: int) -> None:
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be positive (data.seq_len).")


def _json_state_to_grain(state: Any) -> Any:
  """Undoes what JSON does to grain's packer state: its slices must be tuples again.

  grain 0.2.18's ConcatThenSplit compares each slice with the tuple (-1, -1); after a JSON round trip
  it is a list, never equal, and a resumed iterator would skip to a wrong position.
  """
  if isinstance(state, dict):
    return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices"
                else _json_state_to_grain(v))
            for k, v in state.items()}
  if isinstance(state, list):
    return [_json_state_to_grain(v) for v in state]
  return state


class ResumableIterator(grain.DatasetIterator):
  """A grain iterator whose `get_state()` is JSON-serialisable and checked on `set_state`.

  State format (all JSON types):
    {"version": 1,
     "spec": {"split": "train", "seq_len": int, "local_batch": int, "process_index": int,
              "process_count": int, "seed": int, "shuffle": bool, "num_workers": int},
     "pipeline": <grain's own state of the pipeline, made JSON-safe>}
  `set_state` refuses a state whose "spec" differs from this iterator's: that position would
  mean different data.
  """

  def __init__(self, parent: grain.DatasetIterator, spec: dict[str, Any]):
    super().__init__(parent)
    self._spec = spec

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    pipeline = json.loads(json.dumps(self._parent.get_state()))
    return {"version": STATE_VERSION, "spec": dict(self._spec), "pipeline": pipeline}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"Data iterator state version {state.get('version')!r} is not "
                       f"{STATE_VERSION}; this checkpoint was written by other loader code.")
    if state["spec"] != self._spec:
      raise ValueError(f"Data iterator state was saved for {state['spec']} but this iterator is "
                       f"{self._spec}; resume with the same data settings and process layout (each process "
                       "restores the state it saved), or skip set_state to restart the data stream.")
    self._parent.set_state(_json_state_to_grain(state["pipeline"]))


def train_iterator_for(data, tokenizer: tokenizer_lib.Tokenizer, *, global_batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1) -> ResumableIterator:
  """`train_iterator` with the settings of a DataConfig (launch.run.config): data_dir, seq_len,
  shuffle_buffer_docs, num_workers and process_sharding. What every run reads its batches through,
  so that training, calibration and pruning see the same stream for the same config."""
  return train_iterator(data.data_dir, tokenizer, seq_len=data.seq_len, global_batch_size=global_batch_size,
                        process_index=process_index, process_count=process_count, seed=seed,
                        shuffle=data.shuffle_buffer_docs, num_workers=data.num_workers,
                        process_sharding=data.process_sharding)


def train_iterator(data_dir: str, tokenizer: tokenizer_lib.Tokenizer, *, seq_len: int,
                   global_batch_size: int, process_index: int = 0, process_count: int = 1,
                   seed: int = 0, shuffle: bool = True, num_workers: int = 0,
                   process_sharding: str = "documents") -> ResumableIterator:
  """Returns an endless iterator over this process's training batches.

  `process_sharding` says how processes split the data. "documents" (scales to any corpus): this
  process reads documents process_index::process_count and packs them itself, so the global batch
  depends on the process count. "rows": every process packs the whole stream and keeps its own
  rows of each global batch, so the global batches are the same for any number of processes
  (exactly reproducible multi-host runs, at process_count times the tokenization work).

  Each element is {"inputs", "targets", "segment_ids"}, each int32 [local_batch, seq_len] (and
  "loss_weights", float32, for instruction data; see the module doc), with
  local_batch = global_batch_size // process_count, targets[:, t] == inputs[:, t + 1] within a row,
  and segment_ids[:, t] the number of EOS tokens in inputs[:, :t] (the document index in the row). This process reads documents process_index::process_count of the
  train split. With `shuffle`, documents are reshuffled every epoch; epoch e uses grain's
  index_shuffle with seed (seed + e) mod 2**32; the packed stream runs on across epoch boundaries.
  `num_workers` > 0 tokenizes and packs in that many grain worker processes (the caller's script
  then needs an `if __name__ == "__main__":` guard): worker w packs every num_workers-th document
  of this process's stream and batches are taken from the workers in turn, so the batch sequence
  depends on num_workers. The position is `get_state()` / `set_state(state)`; see
  ResumableIterator for the format.
  """
  _check_seq_len(seq_len)
  local_batch = _local_batch_size(global_batch_size, process_index, process_count)
  if num_workers < 0:
    raise ValueError(f"num_workers={num_workers} must be >= 0 (data.num_workers; 0: no workers).")
  if process_sharding not in ("documents", "rows"):
    raise ValueError(f"process_sharding={process_sharding!r}: choose 'documents' or 'rows' "
                     "(data.process_sharding).")
  source = tfds_builder.data_source(data_dir, "train")
  by_rows = process_sharding == "rows"
  docs = grain.MapDataset.source(source)
  if not by_rows:
    docs = docs[process_index::process_count]
  if len(docs) == 0:
    raise ValueError(f"process_count={process_count} exceeds the {len(source)} train documents.")
  if shuffle:
    docs = docs.shuffle(seed=seed)
  windows = _packed_windows(docs.repeat(), tokenizer, seq_len, has_prompts(data_dir))
  if by_rows:
    start = process_index * local_batch
    batches = (windows.batch(global_batch_size, drop_remainder=True)
               .map(_RowSlice(start, start + local_batch)).map(_inputs_and_targets))
  else:
    batches = windows.batch(local_batch, drop_remainder=True).map(_inputs_and_targets)
  if num_workers > 0:
    # grain's workers read absl flags; without absl.app (e.g. under pytest) they are unparsed and
    # every worker fails, so fall back to the flag defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  spec = {"split": "train", "seq_len": seq_len, "local_batch": local_batch,
          "process_index": process_index, "process_count": process_count, "seed": seed,
          "shuffle": bool(shuffle), "num_workers": num_workers, "process_sharding": process_sharding}
  return ResumableIterator(iter(batches), spec)


def eval_batches(data_dir: str, tokenizer: tokenizer_lib.Tokenizer, *, seq_len: int,
                 global_batch_size: int, process_index: int = 0, process_count: int = 1,
                 max_batches: int = 0) -> grain.DatasetIterator:
  """Returns a finite iterator over this process's validation batches, the same on every call.

  Elements are as in train_iterator: {"inputs", "targets", "segment_ids"}, each int32
  [local_batch, seq_len]. The validation documents are packed in corpus order without shuffling;
  global batch k holds windows k * global_batch_size ... and this process gets rows
  [process_index * local_batch, (process_index + 1) * local_batch) of it. An incomplete last
  global batch is dropped. `max_batches` > 0 stops after that many batches; 0 gives them all.
  """
  _check_seq_len(seq_len)
  local_batch = _local_batch_size(global_batch_size, process_index, process_count)
  if max_batches < 0:
    raise ValueError(f"max_batches={max_batches} must be >= 0 (0 means the whole split).")
  docs = grain.MapDataset.source(tfds_builder.data_source(data_dir, "validation"))
  windows = _packed_windows(docs, tokenizer, seq_len, has_prompts(data_dir))
  start = process_index * local_batch
  batches = (windows.batch(global_batch_size, drop_remainder=True)
             .map(_RowSlice(start, start + local_batch))
             .map(_inputs_and_targets))
  if max_batches:
    batches = grain.experimental.LimitIterDataset(batches, count=max_batches)
  return iter(batches)
