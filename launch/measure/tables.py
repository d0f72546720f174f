"""Result tables: every benchmark writes its rows as CSV and Markdown, with the command that made them.

Every path may be local or gs:// (launch/storage/paths.py): a table is made in memory and written once.
"""

import csv
import io

from launch.storage import paths


def write_csv(path: str, rows: list, columns: list[str] | None = None, *, extra_columns: str = "raise") -> None:
  """Writes `rows` (dicts; lists when `columns` is given and the rows are lists) as the CSV file `path`.

  `columns`: the header (default: the first dict's keys); `extra_columns="ignore"` drops dict keys
  not in `columns` instead of raising.
  """
  text = io.StringIO(newline="")
  columns = list(rows[0]) if columns is None else list(columns)
  if rows and not isinstance(rows[0], dict):
    writer = csv.writer(text)
    writer.writerow(columns)
  else:
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction=extra_columns)
    writer.writeheader()
  writer.writerows(rows)
  paths.write_text(path, text.getvalue())


def write_table(rows: list[dict], out_dir: str, name: str, title: str, command: str,
                notes: str = "") -> str:
  """Writes rows as <out_dir>/<name>.csv and .md (with the command that made them); returns the Markdown."""
  paths.makedirs(out_dir)
  columns = list(rows[0])
  write_csv(paths.join(out_dir, f"{name}.csv"), rows, columns)
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = [f"# {title}", "", f"Command: `{command}`", "", "| " + " | ".join(columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
  markdown = "\n".join(lines) + "\n" + (f"\n{notes}\n" if notes else "")
  paths.write_text(paths.join(out_dir, f"{name}.md"), markdown)
  return markdown
