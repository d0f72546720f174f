"""Regenerated tables beside the committed ones: every number side by side, quality numbers judged.

  python -m launch.reproduce.summary --committed runs/reproduce/committed --regenerated docs/results

Reads every markdown table in the `.md` files under both directories, pairs rows by their text cells
(the numbers are what may change; the labels name the row) and columns by header, and prints each
number with its committed value. A column (in a `metric | value` table: a row) whose header has a
timing word (s, ms, x, time, ...) is a timing: reported, never judged (timings depend on the machine
and its load). Any other column is judged by the first rule in TOLERANCES whose pattern its header
contains: quality numbers (perplexity, loss, memory ratios, memory sizes, parameter counts and bytes)
fail when they move beyond the stated tolerance. Exits 1 when a judged number moved too far or a committed table
was not regenerated. Writes the comparison to --out as markdown too.
"""

import dataclasses
import math
import re
import sys

from absl import app, flags

from launch.storage import paths

# (header substring, kind, relative tolerance); the first match wins, case-insensitive.
# "judged" numbers fail beyond the tolerance; "timing" and unmatched numeric columns are reported.
TOLERANCES = (
    # One-shot structured pruning before any recovery amplifies small differences of the teacher:
    # two demo teachers 0.7% apart in perplexity gave 75%-pruned perplexities 10.5% apart.
    ("perplexity pruned", "judged", 0.15),
    ("perplexity", "judged", 0.03),     # CPU runs are deterministic per machine; 3% covers another CPU
    ("val loss", "judged", 0.006),      # ~0.03 nats at the demo's 5.2: the same as 3% perplexity
    ("val_loss", "judged", 0.006),
    ("validation loss", "judged", 0.006),
    ("over_formula", "judged", 0.02),   # memory vs Korthikanti et al.: the compiler's, deterministic
    ("mib", "judged", 0.05),            # per-device memory from memory_analysis()
    ("params", "judged", 0.001),        # parameter counts
    ("bytes", "judged", 0.02),          # checkpoint bytes (orbax's file layout may shift a little)
    ("change", "reported", math.inf),   # derived from perplexities already judged
    ("smaller", "reported", math.inf),
)
# A column is a timing when a *word* of its header is one of these (words, not substrings: "params"
# holds "ms" and "from scratch" holds " s", and neither is a time).
TIMING = ("s", "ms", "tok", "mfu", "tflops", "spread", "time", "speed", "×", "x")


def parse_number(cell: str) -> float | None:
  """'1,234' -> 1234, '4.20M' -> 4.2e6, '+0.03%' -> 0.03, '3.85x' -> 3.85, '0.61×' -> 0.61; text -> None."""
  s = cell.strip().replace(",", "").replace("**", "")
  match = re.fullmatch(r"([+-]?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*([KMG]?)\s*(%|x|×)?", s)
  if not match:
    return None
  scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[match.group(2)]
  return float(match.group(1)) * scale


def parse_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
  """Every markdown table in `text`: a list of (header cells, rows of cells)."""
  tables, lines = [], text.splitlines()
  i = 0
  while i < len(lines):
    if (lines[i].strip().startswith("|") and i + 1 < len(lines)
        and re.fullmatch(r"\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?", lines[i + 1].strip())):
      cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
      header, rows, i = cells(lines[i]), [], i + 2
      while i < len(lines) and lines[i].strip().startswith("|"):
        rows.append(cells(lines[i]))
        i += 1
      tables.append((header, rows))
    else:
      i += 1
  return tables


def column_rule(header: str) -> tuple[str, float]:
  """(kind, relative tolerance) of a column (or of a row of a metric | value table, by its label)."""
  h = header.lower()
  if any(word in TIMING for word in re.findall(r"[a-z0-9]+|×", h)):
    return "timing", math.inf
  for pattern, kind, tol in TOLERANCES:
    if pattern in h:
      return kind, tol
  return "reported", math.inf


def row_keys(rows: list[list[str]]) -> list[tuple[str, ...]]:
  """A key per row: its non-numeric cells, plus an occurrence count when two rows share them."""
  keys, seen = [], {}
  for row in rows:
    key = tuple(c for c in row if c and parse_number(c) is None)
    seen[key] = seen.get(key, 0) + 1
    keys.append(key + ((f"#{seen[key]}",) if seen[key] > 1 else ()))
  return keys


@dataclasses.dataclass(frozen=True)
class Cell:
  file: str
  row: str
  column: str
  committed: float | None
  regenerated: float | None
  kind: str            # judged | reported | timing
  tolerance: float

  @property
  def change(self) -> float | None:
    if self.committed is None or self.regenerated is None:
      return None
    if self.committed == 0:
      return 0.0 if self.regenerated == 0 else math.inf
    return (self.regenerated - self.committed) / abs(self.committed)

  @property
  def failed(self) -> bool:
    if self.kind != "judged":
      return False
    return self.regenerated is None or self.change is None or abs(self.change) > self.tolerance


def _pair_table(header: list[str], new_tables: list, used: set[int]) -> int | None:
  """Index of the regenerated table for a committed table with `header`: the first unused one with
  the same header, else (columns were added, removed or moved) the unused one with the same first
  column sharing the most columns, at least half of the committed ones."""
  free = [j for j in range(len(new_tables)) if j not in used]
  same = [j for j in free if new_tables[j][0] == header]
  if same:
    return same[0]
  shared = lambda j: len(set(header) & set(new_tables[j][0]))
  near = [j for j in free if new_tables[j][0][:1] == header[:1] and 2 * shared(j) >= len(header)]
  return max(near, key=shared) if near else None


def compare_text(name: str, committed: str, regenerated: str) -> list[Cell]:
  """Cells of every numeric column of `committed`'s tables, paired with `regenerated`'s (same file).

  Tables pair by position among tables with the same header, or else by their shared columns
  (`_pair_table`: a table that gained a column still compares the columns it kept); columns pair by
  header. A row, column or table that is missing from `regenerated` gives cells whose regenerated
  value is None (a failure where judged).
  """
  new_tables = parse_tables(regenerated)
  out, used = [], set()
  for header, rows in parse_tables(committed):
    match = _pair_table(header, new_tables, used)
    new_rows = {}
    if match is not None:
      used.add(match)
      new_header, new_body = new_tables[match]
      # The regenerated rows seen through the committed columns, so both sides key rows alike.
      where = [new_header.index(h) if h in new_header else None for h in header]
      projected = [[row[i] if i is not None and i < len(row) else "" for i in where] for row in new_body]
      new_rows = dict(zip(row_keys(projected), projected))
    for key, row in zip(row_keys(rows), rows):
      new_row = new_rows.get(key)
      for c, column in enumerate(header):
        old = parse_number(row[c]) if c < len(row) else None
        if old is None:
          continue
        new = parse_number(new_row[c]) if new_row is not None and c < len(new_row) else None
        # A two-column "metric | value" table names its quantity in the row, not the header.
        kind, tol = column_rule(" ".join(key) if column.lower() == "value" else column)
        out.append(Cell(name, " / ".join(key), column, old, new, kind, tol))
  return out


def compare_dirs(committed_dir: str, regenerated_dir: str) -> list[Cell]:
  """compare_text for every .md file under `committed_dir` against the same path under `regenerated_dir`
  (either may be a gs:// URL)."""
  cells = []
  for rel in paths.files_under(committed_dir):
    if not rel.endswith(".md"):
      continue
    old = paths.read_text(paths.join(committed_dir, *rel.split("/")))
    path = paths.join(regenerated_dir, *rel.split("/"))
    new = paths.read_text(path) if paths.isfile(path) else ""
    cells += compare_text(rel, old, new)
  return cells


def _fmt(x: float | None) -> str:
  return "missing" if x is None else f"{x:.6g}"


def report(cells: list[Cell]) -> str:
  """A markdown table of every cell (committed, regenerated, change, verdict) and a one-line tally."""
  lines = ["| file | row | column | committed | regenerated | change | verdict |", "|---|---|---|---:|---:|---:|---|"]
  for c in cells:
    change = "" if c.change is None else f"{100 * c.change:+.2f}%"
    verdict = ("FAIL" if c.failed else f"ok (±{100 * c.tolerance:g}%)") if c.kind == "judged" else c.kind
    lines.append(f"| {c.file} | {c.row} | {c.column} | {_fmt(c.committed)} | {_fmt(c.regenerated)} | "
                 f"{change} | {verdict} |")
  judged = [c for c in cells if c.kind == "judged"]
  failed = [c for c in judged if c.failed]
  lines.append(f"\n{len(cells)} numbers compared, {len(judged)} judged, {len(failed)} beyond tolerance.")
  return "\n".join(lines)


flags.DEFINE_string("committed", "runs/reproduce/committed", "The committed docs/results (a copy).")
flags.DEFINE_string("regenerated", "docs/results", "The freshly regenerated docs/results.")
flags.DEFINE_string("out", "runs/reproduce/summary.md", "Where the comparison is written.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not paths.isdir(FLAGS.committed):
    raise app.UsageError(f"No committed results at {FLAGS.committed}.")
  cells = compare_dirs(FLAGS.committed, FLAGS.regenerated)
  text = report(cells)
  print(text)
  paths.write_text(FLAGS.out, text + "\n")
  failed = [c for c in cells if c.failed]
  for c in failed:
    print(f"FAIL {c.file} [{c.row}] {c.column}: committed {_fmt(c.committed)}, regenerated "
          f"{_fmt(c.regenerated)} (tolerance ±{100 * c.tolerance:g}%)", file=sys.stderr)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  app.run(main)
