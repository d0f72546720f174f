"""launch/reproduce/summary.py: committed vs regenerated tables, judged by column, on small fake tables."""

import subprocess
import sys

import pytest

from launch.reproduce import summary

COMMITTED = """# Fake

Command: `python -m something`

| model | params | val perplexity | step_s | note |
|---|---:|---:|---:|---|
| teacher | 4.20M | 177.9 | 0.80 | |
| pruned 50% | 2.10M | 190.0 | 0.45 | fast |

| remat | saved_over_formula |
|---|---|
| none | 1.922 |
| full | 1 |
"""


def regenerate(ppl="181.0", step="1.90", ratio="1", drop_row=False):
  text = COMMITTED.replace("177.9", ppl).replace("0.80", step).replace("| full | 1 |", f"| full | {ratio} |")
  return text.replace("| pruned 50% | 2.10M | 190.0 | 0.45 | fast |\n", "") if drop_row else text


def by(cells, row, column):
  (cell,) = [c for c in cells if c.row == row and c.column == column]
  return cell


def test_parse_number_units():
  assert summary.parse_number("4.20M") == 4.2e6
  assert summary.parse_number("15,547,256") == 15547256
  assert summary.parse_number("+0.03%") == 0.03
  assert summary.parse_number("3.85x") == 3.85
  assert summary.parse_number("teacher") is None and summary.parse_number("") is None


def test_quality_within_tolerance_passes_and_timings_are_only_reported():
  cells = summary.compare_text("fake.md", COMMITTED, regenerate(ppl="181.0", step="1.90"))
  ppl = by(cells, "teacher", "val perplexity")
  assert (ppl.committed, ppl.regenerated, ppl.kind) == (177.9, 181.0, "judged")
  assert ppl.change == pytest.approx(3.1 / 177.9) and not ppl.failed      # +1.7% < 3%
  step = by(cells, "teacher", "step_s")
  assert step.kind == "timing" and step.change == pytest.approx(1.375) and not step.failed
  assert by(cells, "pruned 50% / fast", "params").regenerated == 2.1e6
  assert not any(c.failed for c in cells)


def test_metric_value_tables_are_judged_by_row():
  old = "| metric | value |\n|---|---|\n| validation perplexity | 181.0 |\n| tokens/s | 447 |\n"
  cells = summary.compare_text("demo.md", old, old.replace("181.0", "191.0").replace("447", "900"))
  assert by(cells, "validation perplexity", "value").failed
  assert by(cells, "tokens/s", "value").kind == "timing"


def test_quality_beyond_tolerance_fails():
  cells = summary.compare_text("fake.md", COMMITTED, regenerate(ppl="190.0", ratio="1.05"))
  assert by(cells, "teacher", "val perplexity").failed                     # +6.8% > 3%
  assert by(cells, "full", "saved_over_formula").failed                    # +5% > 2%
  assert "2 beyond tolerance" in summary.report(cells)


def test_missing_rows_and_files_fail_when_judged(tmp_path):
  cells = summary.compare_text("fake.md", COMMITTED, regenerate(drop_row=True))
  gone = by(cells, "pruned 50% / fast", "val perplexity")
  assert gone.regenerated is None and gone.failed
  assert not by(cells, "pruned 50% / fast", "step_s").failed
  (tmp_path / "old").mkdir()
  (tmp_path / "new").mkdir()
  (tmp_path / "old" / "fake.md").write_text(COMMITTED)
  assert all(c.regenerated is None for c in summary.compare_dirs(tmp_path / "old", tmp_path / "new"))


def test_command_exit_status(tmp_path):
  for name, text, code in (("same", COMMITTED, 0), ("worse", regenerate(ppl="200.0"), 1)):
    (tmp_path / name / "old").mkdir(parents=True)
    (tmp_path / name / "new").mkdir()
    (tmp_path / name / "old" / "t.md").write_text(COMMITTED)
    (tmp_path / name / "new" / "t.md").write_text(text)
    run = subprocess.run([sys.executable, "-m", "launch.reproduce.summary",
                          f"--committed={tmp_path / name / 'old'}", f"--regenerated={tmp_path / name / 'new'}",
                          f"--out={tmp_path / name / 'summary.md'}"], capture_output=True, text=True)
    assert run.returncode == code, run.stderr
    assert "| t.md | teacher | val perplexity | 177.9 |" in run.stdout


def test_timing_is_a_word_of_the_header_not_a_substring():
  # "params" holds "ms" and "from scratch" holds " s": both are quality numbers, judged.
  judged = ["params", "non-zero params", "val perplexity from scratch", "val perplexity fine-tuned, no KD",
            "validation loss (nats/token)", "params_MiB", "checkpoint bytes"]
  timing = ["train step ms", "step x teacher", "decode ms/token", "tokens_per_s", "time (s)", "step_s",
            "generate tok/s, B=8", "mfu", "0.61×"]
  assert [summary.column_rule(h)[0] for h in judged] == ["judged"] * len(judged)
  assert [summary.column_rule(h)[0] for h in timing] == ["timing"] * len(timing)


def test_a_table_that_gained_a_column_still_compares_the_columns_it_kept():
  old = ("| model | params | val perplexity distilled | step ms |\n|---|---:|---:|---:|\n"
         "| teacher | 4.20M |  | 900 |\n| pruned 50% | 2.10M | 180.6 | 400 |\n")
  new = ("| model | params | val perplexity distilled | val perplexity fine-tuned, no KD | KD part | step ms |\n"
         "|---|---:|---:|---:|---:|---:|\n| teacher | 4.20M |  |  |  | 800 |\n"
         "| pruned 50% | 2.10M | 190.0 | 179.1 | -1% | 350 |\n")
  cells = summary.compare_text("structured.md", old, new)
  assert by(cells, "pruned 50%", "val perplexity distilled").regenerated == 190.0
  assert by(cells, "pruned 50%", "val perplexity distilled").failed           # +5.2% > 3%
  assert by(cells, "teacher", "step ms").regenerated == 800
  assert {c.column for c in cells} == {"params", "val perplexity distilled", "step ms"}
  # A column the regenerated table dropped is missing, a failure where judged.
  cells = summary.compare_text("structured.md", new, old)
  assert by(cells, "pruned 50%", "val perplexity fine-tuned, no KD").regenerated is None
  assert by(cells, "pruned 50%", "val perplexity fine-tuned, no KD").failed
  # A table sharing fewer than half the columns is not a match.
  assert summary._pair_table(["model", "a", "b", "c", "d"], [(["model", "a", "x", "y", "z"], [])], set()) is None
