"""The bundled Shakespeare corpus as documents, with a fixed train/validation split.

The corpus is data/shakespeare/*.txt.gz: 42 public-domain works from Project Gutenberg, one per file
(see data/shakespeare/README.md). The split holds out whole works, so validation never shares a
scene with training: the five works in `VALIDATION_WORKS` (~10.5% of the 5.06 M characters) are
validation, the other 37 are train. Each work is then cut into documents of a few KB at paragraph
(blank-line) boundaries, so that shuffling documents mixes works and scenes.
"""

import gzip
import pathlib
import re
from typing import NamedTuple

CORPUS_DIR = pathlib.Path(__file__).resolve().parents[2] / "data" / "shakespeare"
SPLITS = ("train", "validation")
# A fixed list rather than "every k-th work" so that the split survives adding or renaming files,
# and so it mixes genres: two tragedies, a comedy, a romance and the sonnets (528,686 characters).
VALIDATION_WORKS = ("julius_caesar", "macbeth", "sonnets", "tempest", "twelfth_night")
DEFAULT_TARGET_CHARS = 4096

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n+")


class Document(NamedTuple):
  """One training or validation document: `title` is the work's file stem (e.g. "hamlet")."""
  title: str
  text: str


def list_works(corpus_dir: str | pathlib.Path = CORPUS_DIR) -> list[str]:
  """Returns the sorted work names (file stems, e.g. "hamlet") found in `corpus_dir`."""
  corpus_dir = pathlib.Path(corpus_dir)
  names = sorted(p.name[: -len(".txt.gz")] for p in corpus_dir.glob("*.txt.gz"))
  if not names:
    raise ValueError(f"No *.txt.gz works in corpus_dir={str(corpus_dir)!r}; point it at "
                     "data/shakespeare of this repository.")
  return names


def read_work(name: str, corpus_dir: str | pathlib.Path = CORPUS_DIR) -> str:
  """Returns the full text of one work, with trailing spaces stripped from every line."""
  with gzip.open(pathlib.Path(corpus_dir) / f"{name}.txt.gz", "rt", encoding="utf-8") as f:
    text = f.read()
  return "\n".join(line.rstrip() for line in text.splitlines()).strip()


def split_works(split: str, corpus_dir: str | pathlib.Path = CORPUS_DIR) -> list[str]:
  """Returns the sorted work names of `split` ("train" or "validation")."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}.")
  names = list_works(corpus_dir)
  missing = sorted(set(VALIDATION_WORKS) - set(names))
  if missing:
    raise ValueError(f"Validation works {missing} are not in {str(corpus_dir)!r}; the corpus is "
                     "incomplete (restore data/shakespeare from git).")
  held_out = split == "validation"
  return [n for n in names if (n in VALIDATION_WORKS) == held_out]


def chunk_text(text: str, target_chars: int = DEFAULT_TARGET_CHARS) -> list[str]:
  """Cuts `text` into chunks at paragraph breaks.

  Paragraphs (runs separated by blank lines) are appended to the current chunk until it holds at
  least `target_chars` characters; a single paragraph longer than that stays whole. Paragraphs in a
  chunk are joined by one blank line. Returns the non-empty chunks in order.
  """
  if target_chars <= 0:
    raise ValueError(f"target_chars={target_chars} must be positive.")
  chunks, current, size = [], [], 0
  for paragraph in _PARAGRAPH_BREAK.split(text):
    if not paragraph.strip():
      continue
    current.append(paragraph)
    size += len(paragraph) + 2
    if size >= target_chars:
      chunks.append("\n\n".join(current))
      current, size = [], 0
  if current:
    chunks.append("\n\n".join(current))
  return chunks


def documents(split: str, corpus_dir: str | pathlib.Path = CORPUS_DIR,
              target_chars: int = DEFAULT_TARGET_CHARS) -> list[Document]:
  """Returns the documents of `split` in a fixed order: works sorted by name, chunks in text order.

  Deterministic: the same corpus gives the same list on every machine and call.
  """
  return [Document(name, chunk)
          for name in split_works(split, corpus_dir)
          for chunk in chunk_text(read_work(name, corpus_dir), target_chars)]
