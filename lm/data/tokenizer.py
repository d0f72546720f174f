"""Tokenizers: SentencePiece (trained on the train split, or loaded), bytes, Hugging Face files.

The trained SentencePiece model and the byte tokenizer map any Unicode string to ids and back
(`decode(encode(s)) == s`) and reserve pad id 0, so a zero-filled buffer is padding. A tokenizer
loaded from a file (`data.tokenizer_path`) keeps that file's ids. `load_tokenizer` is the one entry
point the rest of the code uses; training the SentencePiece model is tokenizer_training.py's job.
"""

import abc
import json
import pathlib
from collections.abc import Sequence

import sentencepiece as spm

from lm.data import tokenizer_training

KINDS = ("sentencepiece", "byte", "huggingface")


class Tokenizer(abc.ABC):
  """Maps text to token ids and back; ids are in [0, vocab_size)."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Returns the ids of `text`, without BOS or EOS."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Returns the text of `ids`; pad, BOS and EOS ids are dropped."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids, specials included; the model's embedding must have exactly this many rows."""

  @property
  @abc.abstractmethod
  def pad_id(self) -> int:
    """Id of padding: 0 for the trained and byte tokenizers (a loaded file may differ)."""

  @property
  @abc.abstractmethod
  def bos_id(self) -> int:
    """Id of the beginning-of-sequence marker."""

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    """Id of the end-of-document marker the loader appends to every document."""


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as tokens: vocab_size 259 = pad 0, BOS 1, EOS 2, then byte b as id b + 3.

  No training and no files; useful as a reference and for corpora in any script. Sequences are
  ~3-4x longer than with the 2048-piece SentencePiece model on English text.
  """
  NUM_SPECIAL = 3

  def encode(self, text: str) -> list[int]:
    return [b + self.NUM_SPECIAL for b in text.encode("utf-8")]

  def decode(self, ids: Sequence[int]) -> str:
    data = bytes(int(i) - self.NUM_SPECIAL for i in ids if int(i) >= self.NUM_SPECIAL)
    return data.decode("utf-8", errors="replace")

  @property
  def vocab_size(self) -> int:
    return 256 + self.NUM_SPECIAL

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def bos_id(self) -> int:
    return 1

  @property
  def eos_id(self) -> int:
    return 2


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model: ids pad 0, unk 1, BOS 2, EOS 3, then 256 byte pieces, then merges.

  A model loaded from a file keeps its own ids; one without a pad piece (e.g. Llama 2's) reports
  EOS as pad, one without BOS reports EOS as BOS. Pickles as its serialized model, so grain worker
  processes can receive it.
  """

  def __init__(self, model_proto: bytes):
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

  @classmethod
  def from_file(cls, path: str | pathlib.Path) -> "SentencePieceTokenizer":
    """Returns the tokenizer stored in the `.model` file at `path`."""
    return cls(pathlib.Path(path).read_bytes())

  def __getstate__(self):
    return {"model_proto": self._proto}

  def __setstate__(self, state):
    self.__init__(state["model_proto"])

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id() if self._sp.bos_id() >= 0 else self.eos_id

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()


class HuggingFaceTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (the `tokenizers` package; no torch, no transformers).

  Ids are the file's. BOS / EOS / pad are the `bos_token` / `eos_token` / `pad_token` of a
  `tokenizer_config.json` beside the file when it names them, else the first special token found
  among the usual names (`</s>`, `<|end_of_text|>`, `<|endoftext|>`, ...). No EOS is an error (the
  loader ends every document with it); no BOS means BOS = EOS, no pad means pad = EOS.
  `encode` adds no special tokens; `decode` drops them. Pickles as its JSON.
  """
  _NAMES = {"bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
            "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"),
            "pad": ("<pad>", "<|pad|>", "[PAD]")}

  def __init__(self, tokenizer_json: str, specials: dict[str, str | None]):
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ValueError("data.tokenizer='huggingface' needs the tokenizers package: "
                       "pip install tokenizers.") from e
    self._json, self._specials = tokenizer_json, dict(specials)
    self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    self._ids = {}
    for role, names in self._NAMES.items():
      candidates = (specials[role],) if specials.get(role) else names
      self._ids[role] = next((self._tok.token_to_id(t) for t in candidates
                              if self._tok.token_to_id(t) is not None), None)
    if self._ids.get("eos") is None:
      raise ValueError(f"This tokenizer.json has no end-of-text token (looked for eos_token in "
                       f"tokenizer_config.json and {self._NAMES['eos']}); the loader ends every "
                       "document with one. Add it to tokenizer_config.json as eos_token.")

  @classmethod
  def from_file(cls, path: str | pathlib.Path) -> "HuggingFaceTokenizer":
    """Reads `path` (tokenizer.json) and, if present, tokenizer_config.json beside it."""
    path = pathlib.Path(path)
    config_file = path.parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    specials = {}
    for role in cls._NAMES:
      token = config.get(f"{role}_token")
      specials[role] = token.get("content") if isinstance(token, dict) else token
    return cls(path.read_text(encoding="utf-8"), specials)

  def __getstate__(self):
    return {"tokenizer_json": self._json, "specials": self._specials}

  def __setstate__(self, state):
    self.__init__(state["tokenizer_json"], state["specials"])

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._ids["pad"] if self._ids.get("pad") is not None else self.eos_id

  @property
  def bos_id(self) -> int:
    return self._ids["bos"] if self._ids.get("bos") is not None else self.eos_id

  @property
  def eos_id(self) -> int:
    return self._ids["eos"]


def _tokenizer_file(kind: str, path: str) -> pathlib.Path:
  file = pathlib.Path(path).expanduser()
  if file.is_dir() and kind == "huggingface":
    file = file / "tokenizer.json"
  if not file.is_file():
    example = "tokenizer.json" if kind == "huggingface" else "tokenizer.model"
    raise ValueError(f"data.tokenizer_path={path!r} is not a file; point it at a {kind} "
                     f"tokenizer (e.g. /models/llama/{example}), or set it to '' to train one.")
  return file


def load_tokenizer(kind: str, data_dir: str | pathlib.Path, vocab_size: int,
                   path: str = "") -> Tokenizer:
  """Returns the tokenizer `kind` ("sentencepiece", "byte" or "huggingface") of `vocab_size` ids.

  With `path` (data.tokenizer_path) the tokenizer is loaded from that file: a SentencePiece
  `.model`, or a Hugging Face `tokenizer.json` (or its directory). Without it, "sentencepiece" is
  read from `tokenizer_training.sentencepiece_path(data_dir, vocab_size)`, trained on data_dir's
  train split first if that file does not exist (~1 s). Raises ValueError for an unknown kind, a missing file, or when
  the tokenizer's vocabulary differs from `vocab_size` (model.vocab_size), naming both numbers
  and the key to change.
  """
  if kind not in KINDS:
    raise ValueError(f"data.tokenizer={kind!r} is not one of {KINDS}.")
  if kind == "byte":
    if path:
      raise ValueError(f"data.tokenizer='byte' reads no file; set data.tokenizer_path='' "
                       f"(it is {path!r}).")
    tokenizer = ByteTokenizer()
  elif kind == "huggingface" or path:
    if not path:
      raise ValueError("data.tokenizer='huggingface' needs data.tokenizer_path, a "
                       "tokenizer.json file or the directory holding it.")
    file = _tokenizer_file(kind, path)
    tokenizer = (HuggingFaceTokenizer.from_file(file) if kind == "huggingface"
                 else SentencePieceTokenizer.from_file(file))
  else:
    cached = tokenizer_training.cached_sentencepiece(data_dir, vocab_size)
    tokenizer = SentencePieceTokenizer.from_file(cached)
  # A Hugging Face model's embedding may have more rows than its tokenizer has tokens (Qwen2.5 pads
  # 151665 tokens to 151936 rows): every id the tokenizer makes has a row, so that is fine.
  fits = tokenizer.vocab_size <= vocab_size if kind == "huggingface" else tokenizer.vocab_size == vocab_size
  if not fits:
    raise ValueError(vocab_mismatch_message(kind, path, tokenizer.vocab_size, vocab_size, data_dir))
  return tokenizer


def vocab_mismatch_message(kind: str, path: str, tokenizer_size: int, vocab_size: int,
                           data_dir: str | pathlib.Path) -> str:
  """The one instruction for a tokenizer that does not fit model.vocab_size (the embedding's rows).

  The model's vocabulary is fixed by its weights whenever it comes from a checkpoint, so the fix
  offered first is the tokenizer; model.vocab_size is only for a model trained from scratch.
  """
  source = f" loaded from data.tokenizer_path={path!r}" if path else ""
  if kind == "sentencepiece" and not path:
    fix = f"delete {tokenizer_training.sentencepiece_path(data_dir, vocab_size)} so it is retrained with {vocab_size} tokens"
  else:
    fix = ("with a checkpoint (train.init_checkpoint, launch.eval/generate/quantize), use the tokenizer it "
           "was trained with: leave data.tokenizer and data.tokenizer_path unset, or point "
           "data.tokenizer_path at <checkpoint>/tokenizer/tokenizer.json; training a new model from "
           f"scratch, set --config.model.vocab_size={tokenizer_size}")
  return (f"The {kind} tokenizer{source} has {tokenizer_size} tokens but model.vocab_size={vocab_size} "
          f"(the embedding's rows); {fix}.")
