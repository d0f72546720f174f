"""A sweep's reports: results.csv (every column), results.md (a readable table) and PNG plots.

Rows are the point records of launch/sweep.py: the grid values, `status` and `reason`, and the
columns launch/sweep_point.py measured (bytes per device, seconds, tokens/s over the mesh, MFU).
"""

from launch.measure import sweep_estimates
from launch.measure import tables
from launch.storage import paths

MIB = 1024 ** 2
MEASURED = ["devices", "mesh_shape", "rules", "params_bytes", "optimizer_bytes", "argument_bytes",
            "temp_bytes", "peak_bytes", "compile_s", "step_s", "spread", "tokens_per_s", "model_tflops",
            "mfu", "peak_tflops", "peak_source", "mfu_own_peak", "mode", "wall_s",
            # a --topology sweep's: the chip, its HBM, and XLA's estimates (not measurements)
            "chip", "hbm_bytes", "fits", "collective_count", "collective_bytes", "mosaic_kernels",
            "est_step_s", "est_attention_s", "est_tokens_per_s", "est_mfu"]


def summary(record: dict) -> str:
  """One console line for a finished point: its status and headline numbers, or its reason."""
  if record["status"] != "ok":
    return f"{record['status'].upper()}: {record['reason'][:160]}"
  text = f"ok, {record['peak_bytes'] / MIB:.1f} MiB/device, compiled in {record['compile_s']:.1f}s"
  if "hbm_bytes" in record:
    text += f", {'fits' if record['fits'] else 'does not fit'} {record.get('chip', '')} HBM"
  if record.get("est_mfu") is not None:
    text += (f", estimate (XLA's cost model + splash at peak): {record['est_step_s'] * 1e3:,.1f} ms/step, "
             f"{record['est_tokens_per_s']:,.0f} tok/s, MFU {record['est_mfu']:.1%}")
  if "tokens_per_s" in record:
    text += f", {record['step_s'] * 1e3:.0f} ms/step, {record['tokens_per_s']:,.0f} tok/s, MFU {record['mfu']:.1%}"
  return text


def label(record: dict, keys: list[str]) -> str:
  """The point's grid values, e.g. 'data2.tensor4 full 32'."""
  return " ".join(str(record[k]) for k in keys)


def write_csv(records: list[dict], keys: list[str], path: str) -> None:
  """Every column; bytes are per device, blank where a point did not get that far."""
  tables.write_csv(path, records, [*keys, "status", *MEASURED, "reason"], extra_columns="ignore")


def markdown_table(records: list[dict], keys: list[str]) -> str:
  """The headline columns as a Markdown table (MiB per device, ms per step, tokens/s, MFU)."""
  header = [*keys, "status", "rules", "state MiB/dev", "temp MiB/dev", "peak MiB/dev", "step ms",
            "tokens/s", "MFU", "note"]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  for r in records:
    ok = r["status"] == "ok"
    timed = ok and "tokens_per_s" in r
    cells = [*(str(r[k]) for k in keys), r["status"], str(r.get("rules", "")),
             f"{(r['params_bytes'] + r['optimizer_bytes']) / MIB:.2f}" if ok else "",
             f"{r['temp_bytes'] / MIB:.2f}" if ok else "", f"{r['peak_bytes'] / MIB:.2f}" if ok else "",
             f"{r['step_s'] * 1e3:.0f}" if timed else "", f"{r['tokens_per_s']:,.0f}" if timed else "",
             f"{r['mfu']:.1%}" if timed else "", _short(r.get("reason", ""))]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _short(reason: str, limit: int = 150) -> str:
  """The reason's most specific line: the first item under a heading such as 'does not fit ...:'."""
  parts = [p.strip() for p in reason.split(" | ")]
  if len(parts) > 1 and parts[0].endswith(":"):
    reason = parts[1] + (f" (+{len(parts) - 2} more)" if len(parts) > 2 else "")
  reason = reason.replace("|", "/")
  return reason if len(reason) <= limit else reason[:limit - 3] + "..."


def write_markdown(records: list[dict], keys: list[str], path: str, command: str) -> None:
  timed = [r for r in records if r["status"] == "ok" and "tokens_per_s" in r]
  lines = ["# Sweep results", ""]
  if command:
    lines += [f"Command: `{command}`", ""]
  lines += [markdown_table(records, keys)]
  lines += ["Memory is per device from the compiled step's `memory_analysis()` (state = parameters + "
            "optimizer state; peak = step arguments + temporaries). tokens/s is over the whole mesh; "
            "MFU = model FLOPs (lm/flops.py) / peak, with one peak per dtype for the whole sweep "
            "(results.csv: `peak_source`)."]
  if timed and timed[0].get("platform", "cpu") == "cpu":
    lines += ["", "Simulated CPU devices share one host, so tokens/s measures the partitioned program's "
              "overhead on this CPU, not accelerator speed; compare ratios between rows."]
  paths.write_text(path, "\n".join(lines) + "\n")


def write_plots(records: list[dict], keys: list[str], out: str) -> list[str]:
  """Writes memory.png (stacked per-device bytes) and, when timed, tokens_per_s.png; returns the paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = [label(r, keys) for r in records][::-1]  # first point on top
  rows = records[::-1]
  height = 1.2 + 0.32 * len(rows)
  written = []

  fig, ax = plt.subplots(figsize=(8, height))
  parts = [("parameters", lambda r: r["params_bytes"]), ("optimizer state", lambda r: r["optimizer_bytes"]),
           ("batch, other args", lambda r: r["argument_bytes"] - r["params_bytes"] - r["optimizer_bytes"]),
           ("temporaries", lambda r: r["temp_bytes"])]
  left = [0.0] * len(rows)
  for name, value in parts:
    widths = [max(value(r), 0) / MIB if r["status"] == "ok" else 0 for r in rows]
    ax.barh(labels, widths, left=left, label=name)
    left = [a + b for a, b in zip(left, widths)]
  _mark_failures(ax, rows)
  ax.set_xlabel("MiB per device (compiled step: arguments + temporaries)")
  ax.set_ylabel(" / ".join(keys))
  ax.set_title("Per-device memory by configuration")
  ax.legend(loc="lower right", fontsize=8)
  written.append(_save(fig, paths.join(out, "memory.png")))

  if any(r["status"] == "ok" and "tokens_per_s" in r for r in rows):
    fig, ax = plt.subplots(figsize=(8, height))
    speeds = [r.get("tokens_per_s", 0) if r["status"] == "ok" else 0 for r in rows]
    bars = ax.barh(labels, speeds, color="tab:green")
    for bar, r in zip(bars, rows):
      if r["status"] == "ok" and "mfu" in r:
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r['tokens_per_s']:,.0f} "
                f"(MFU {r['mfu']:.1%})", va="center", fontsize=7)
    _mark_failures(ax, rows)
    ax.set_xlim(0, max(speeds) * 1.35 or 1)
    ax.set_xlabel("tokens/s (whole mesh; median step)")
    ax.set_ylabel(" / ".join(keys))
    ax.set_title("Training throughput by configuration")
    written.append(_save(fig, paths.join(out, "tokens_per_s.png")))
  return written


def _mark_failures(ax, rows: list[dict]) -> None:
  for i, r in enumerate(rows):
    if r["status"] != "ok":
      ax.text(0, i, f" {r['status']}", va="center", fontsize=8, color="tab:red")


def _save(fig, path: str) -> str:
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=110)
  import matplotlib.pyplot as plt
  plt.close(fig)
  return path


def with_sweep_peak(records: list[dict]) -> list[dict]:
  """Copies of the records whose MFU uses one peak per dtype: the best matmul rate measured in the sweep.

  On CPU each point measures the host's matmul rate next to its steps, and on a shared machine one
  unlucky measurement would inflate that point's MFU; the sweep-wide best makes MFU a fixed scale
  (its ratios between rows equal the tokens/s ratios of the same model). Spec-sheet peaks stay as they are.
  """
  measured = [r for r in records if r["status"] == "ok" and r.get("mfu") and
              str(r.get("peak_source", "")).startswith("measured")]
  best: dict = {}
  for r in measured:
    peak = r["model_tflops"] / r["mfu"]
    best[r.get("dtype")] = max(best.get(r.get("dtype"), 0.0), peak)
  out = []
  for r in records:
    if r in measured:
      peak = best[r.get("dtype")]
      r = {**r, "mfu_own_peak": r["mfu"], "mfu": r["model_tflops"] / peak, "peak_tflops": peak,
           "peak_source": f"best {r.get('dtype') or ''} matmul rate measured in the sweep (on {r.get('platform', 'cpu')})"}
    out.append(r)
  return out


def write_reports(records: list[dict], keys: list[str], out: str, command: str = "") -> None:
  """results.csv, results.md and the plots for the points recorded so far."""
  records = with_sweep_peak(records)
  write_csv(records, keys, paths.join(out, "results.csv"))
  write_markdown(records, keys, paths.join(out, "results.md"), command)
  write_plots(records, keys, out)
  if sweep_estimates.is_topology_sweep(records):
    sweep_estimates.write_estimates(records, keys, out, command)
