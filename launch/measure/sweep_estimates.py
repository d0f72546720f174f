"""A TPU-topology sweep's report: per-chip memory, fit, collectives and XLA's estimates, best point marked.

Rows are the records of `launch.sweep --topology ...` (launch/measure/sweep_point.py
`measure_on_topology`): everything was compiled by the TPU compiler on a CPU host and nothing ran, so
step time, tokens/s and MFU are estimates (XLA's cost model, `optimal_seconds`, plus the splash kernels
it cannot price, launch/measure/aot.py), never measurements.
Writes estimates.md / estimates.csv (launch/measure/tables.py) and estimates.png.
"""

from launch.measure.tables import write_table
from launch.storage import paths

GIB = 2 ** 30


def is_topology_sweep(records: list[dict]) -> bool:
  """Whether the records come from a sweep compiled for a TPU topology."""
  return any(r.get("platform") == "tpu" and "hbm_bytes" in r for r in records)


def best_index(records: list[dict]) -> int | None:
  """Index of the point with the highest estimated MFU among those that compiled and fit, or None."""
  candidates = [(r["est_mfu"], i) for i, r in enumerate(records)
                if r["status"] == "ok" and r.get("fits") and r.get("est_mfu") is not None]
  return max(candidates)[1] if candidates else None


def estimate_rows(records: list[dict], keys: list[str]) -> list[dict]:
  """One table row per point: grid values, status, GiB per chip, fit, collectives, XLA's estimates."""
  best = best_index(records)
  rows = []
  for i, r in enumerate(records):
    ok = r["status"] == "ok"
    est = ok and r.get("est_mfu") is not None
    rows.append({
        **{k: str(r.get(k, "")) for k in keys}, "status": r["status"],
        "state GiB/chip": f"{(r['params_bytes'] + r['optimizer_bytes']) / GIB:.2f}" if ok else "",
        "temp GiB/chip": f"{r['temp_bytes'] / GIB:.2f}" if ok else "",
        "peak GiB/chip": f"{r['peak_bytes'] / GIB:.2f}" if ok else "",
        "fits HBM": ("yes" if r.get("fits") else "no") if ok else ("no" if r["status"] == "oom" else ""),
        "collectives GiB/step": f"{r['collective_bytes'] / GIB:.2f}" if ok else "",
        "est. step s": f"{r['est_step_s']:.2f}" if est else "",
        "of it splash s": f"{r['est_attention_s']:.2f}" if est and r.get("est_attention_s") is not None else "",
        "est. tokens/s": f"{r['est_tokens_per_s']:,.0f}" if est else "",
        "est. MFU": f"{r['est_mfu']:.1%}" if est else "",
        "best": "**best**" if i == best else "",
        "note": _short(r.get("reason", "")) if not ok else ""})
  return rows


def _short(reason: str, limit: int = 160) -> str:
  reason = reason.replace("|", "/")
  return reason if len(reason) <= limit else reason[:limit - 3] + "..."


def write_estimates(records: list[dict], keys: list[str], out: str, command: str = "") -> str:
  """Writes estimates.md/.csv and estimates.png for a topology sweep; returns the Markdown."""
  ok = [r for r in records if r["status"] == "ok"]
  first = ok[0] if ok else {}
  chip = first.get("chip", "the chip")
  hbm = first.get("hbm_bytes", 0) / GIB
  notes = (f"Every point was compiled by the TPU compiler (libtpu) for {first.get('devices', '?')} x {chip} "
           f"({hbm:.0f} GiB HBM each) on a 2-core CPU host; nothing ran. Memory is per chip from the "
           "compiled step's `memory_analysis()` (state = parameters + optimizer state from the shardings; "
           "peak = arguments + temporaries); `fits HBM` compares the peak with the chip's HBM "
           "(launch/run/chips.py); an `oom` point is one the TPU compiler refused (CompileTimeHbmOom). "
           "Collectives are bytes one chip sends per step, read from the compiled HLO with loops "
           "unrolled. Step time, tokens/s and MFU are **estimates, not measurements**: XLA's cost model "
           "(`cost_analysis()` `optimal_seconds`: every op at the chip's peak FLOP/s or HBM bandwidth, "
           "extrapolated over the layer loop) plus the splash attention kernels, which XLA prices at "
           "nothing, at the chip's peak (`of it splash s`, a closed form over the kernels the compiled "
           "step runs). Being a roofline, the estimate is a ceiling no run reaches (docs/tpu.md sets it "
           "beside MaxText's measurements). MFU uses the chip's spec-sheet bf16 peak and counts causal "
           "attention whole (lm/flops.py). `best` marks the highest estimated MFU among points that fit.")
  markdown = write_table(estimate_rows(records, keys), out, "estimates",
                         f"Pod sweep: the TPU compiler's memory and estimated speed for {chip} (compiled offline, nothing ran)", command, notes)
  write_plot(records, keys, paths.join(out, "estimates.png"))
  return markdown


def write_plot(records: list[dict], keys: list[str], path: str) -> str:
  """Two panels: peak GiB per chip against the chip's HBM, and XLA's estimated MFU; best point marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = records[::-1]  # first point on top
  labels = [" ".join(str(r.get(k, "")) for k in keys) for r in rows]
  best = best_index(records)
  best_row = None if best is None else len(records) - 1 - best
  ok = [r for r in records if r["status"] == "ok"]
  hbm = ok[0]["hbm_bytes"] / GIB if ok else None
  chip = ok[0].get("chip", "") if ok else ""
  fig, (ax_mem, ax_mfu) = plt.subplots(1, 2, figsize=(12, 1.4 + 0.34 * len(rows)), sharey=True)
  peaks = [r["peak_bytes"] / GIB if r["status"] == "ok" else 0 for r in rows]
  colors = ["tab:blue" if r["status"] == "ok" and r.get("fits") else "tab:red" for r in rows]
  ax_mem.barh(labels, peaks, color=colors)
  if hbm:
    ax_mem.axvline(hbm, color="black", linestyle="--", label=f"{chip} HBM ({hbm:.0f} GiB)")
    ax_mem.legend(loc="lower right", fontsize=8)
  for i, r in enumerate(rows):
    if r["status"] != "ok":
      ax_mem.text(0, i, f" {r['status']}" + (" (does not fit)" if r["status"] == "oom" else ""),
                  va="center", fontsize=8, color="tab:red")
  ax_mem.set_xlabel("peak GiB per chip (TPU compiler's memory_analysis)")
  ax_mem.set_ylabel(" / ".join(keys))
  mfus = [100 * r["est_mfu"] if r["status"] == "ok" and r.get("est_mfu") is not None else 0 for r in rows]
  bars = ax_mfu.barh(labels, mfus, color=["tab:green" if i == best_row else "tab:gray" for i in range(len(rows))])
  for i, (bar, r) in enumerate(zip(bars, rows)):
    if mfus[i]:
      ax_mfu.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                  f" {mfus[i]:.1f}%" + ("  <- best" if i == best_row else ""), va="center", fontsize=7)
  ax_mfu.set_xlim(0, max(mfus + [1]) * 1.3)
  ax_mfu.set_xlabel("MFU, estimated (XLA's cost model + splash at peak; a ceiling, not measured)")
  devices = ok[0].get("devices", "?") if ok else "?"
  fig.suptitle(f"{devices} x {chip}: compiled offline by the TPU compiler on a 2-core CPU host "
               "(nothing ran; times are estimates)", fontsize=10)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=110)
  plt.close(fig)
  return path
