"""Result tables: every benchmark writes its rows as CSV and Markdown, with the command that made them."""

import csv
import os


def write_table(rows: list[dict], out_dir: str, name: str, title: str, command: str,
                notes: str = "") -> str:
  """Writes rows as <out_dir>/<name>.csv and .md (with the command that made them); returns the Markdown."""
  os.makedirs(out_dir, exist_ok=True)
  columns = list(rows[0])
  with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = [f"# {title}", "", f"Command: `{command}`", "", "| " + " | ".join(columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
  markdown = "\n".join(lines) + "\n" + (f"\n{notes}\n" if notes else "")
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(markdown)
  return markdown
