"""The pipeline bubble, measured: step time and per-device memory against micro-batches, per schedule.

  python -m launch.reproduce.pipeline --out docs/results/pipeline [--steps 3]

Runs a `launch.sweep` over stage x micro-batches x schedule on 8 simulated CPU devices (the demo
model with 8 layers, mesh stage=4 x data=2, batch 16), plus the same model without a pipeline
(data=8) as the reference, and writes bubble.{md,csv} and bubble.png; and draws which micro-batch
each stage runs when (timeline_{gpipe,circular}.png, docs/sharding.md; drawn, not measured). Under GSPMD a stage in its
bubble still computes (on zeros), and all 8 simulated devices share this host's cores, so the step
time over the reference should follow 1 / (1 - bubble) = iterations / rounds: the measured column
beside it says how closely it does. Memory is per device from the compiled step.
"""

import os
import shlex
import sys

from absl import flags

from launch.measure.layout import draw_pipeline_timeline
from launch.measure.sweep import run_sweep
from launch.measure.tables import write_table
from launch.run import cli
from launch.storage import paths
from sharding.pipeline import Pipeline

flags.DEFINE_string("out", "docs/results/pipeline", "Output directory (the sweep's points go to <out>/sweep).")
flags.DEFINE_integer("steps", 3, "Timed steps per point.")
FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "demo.py")
COMMON = ["--config.model.num_layers=8", "--config.train.global_batch_size=16", "--config.model.dtype=float32"]
STAGES, DATA, BATCH, LAYERS = 4, 2, 16, 8
GRIDS = [  # (label, grid)
    ("reference", "mesh=data8"),
    ("gpipe", f"mesh=stage{STAGES}.data{DATA};schedule=gpipe;micro=1,2,4,8"),
    ("circular", f"mesh=stage{STAGES}.data{DATA};schedule=circular;repeats=2;micro=4,8"),
]
MIB = 2 ** 20
# The schedules pictured in docs/sharding.md: 4 stages, 4 micro-batches, the 8-layer model.
TIMELINES = {"gpipe": Pipeline(STAGES, 4, "gpipe"), "circular": Pipeline(STAGES, 4, "circular", repeats=2)}


def bubble_rows(records: dict[str, list[dict]]) -> list[dict]:
  """One row per pipelined point: measured step time over the reference beside 1 / (1 - bubble)."""
  reference = records["reference"][0]
  rows = []
  for label in ("gpipe", "circular"):
    for r in records[label]:
      if r["status"] != "ok":
        rows.append({"schedule": label, "micro": int(r["micro"]), "status": r["status"], "reason": r["reason"][:80]})
        continue
      pipe = Pipeline(STAGES, int(r["micro"]), label, int(r.get("repeats", 1)))
      rows.append({"schedule": label, "micro": pipe.microbatches, "repeats": pipe.repeats,
                   "iterations": pipe.iterations, "bubble": pipe.bubble, "step_s": r["step_s"],
                   "time_vs_reference": r["step_s"] / reference["step_s"],
                   "formula_1/(1-bubble)": 1 / (1 - pipe.bubble),
                   # Activations a stage holds for the backward pass, by the formula: every iteration's
                   # micro-batch rows (B / (M * data)) through the layers it runs per iteration.
                   "formula_held_row_layers": pipe.iterations * BATCH // (pipe.microbatches * DATA) * LAYERS // pipe.groups,
                   "temp_MiB_per_device": r["temp_bytes"] / MIB,
                   "reference_temp_MiB": reference["temp_bytes"] / MIB, "status": "ok", "reason": ""})
  return rows


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, marker in (("gpipe", "o"), ("circular", "s")):
    ok = [r for r in rows if r["schedule"] == label and r["status"] == "ok"]
    if not ok:
      continue
    ax.plot([r["micro"] for r in ok], [r["time_vs_reference"] for r in ok], marker=marker, label=f"{label} measured")
    ax.plot([r["micro"] for r in ok], [r["formula_1/(1-bubble)"] for r in ok], linestyle="--", marker=marker,
            alpha=0.5, label=f"{label} 1/(1-bubble)")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("micro-batches M")
  ax.set_ylabel("step time / no-pipeline step time")
  ax.set_title(f"Pipeline bubble, stage={STAGES} x data={DATA} (8 simulated CPU devices)", fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  cli.quiet_logs()
  records = {}
  for label, grid in GRIDS:
    print(f"== {label}: {grid}", flush=True)
    records[label] = run_sweep(CONFIG, grid, paths.join(FLAGS.out, "sweep", label), COMMON, steps=FLAGS.steps,
                               warmup=1)
  rows = bubble_rows(records)
  command = "python -m launch.reproduce.pipeline " + shlex.join(sys.argv[1:])
  print(write_table(rows, FLAGS.out, "bubble", "Pipeline bubble: step time and memory vs micro-batches", command,
                    "Measured on 8 simulated CPU devices sharing one 2-core host: a stage in its bubble "
                    "computes on zeros, so time over the no-pipeline reference should follow 1/(1-bubble). "
                    "temp_MiB_per_device: the compiled step's temporaries (activations held for the "
                    "in-flight micro-batches, gradients) from memory_analysis(). formula_held_row_layers: "
                    "iterations x B / (M x data) rows x the layers a stage runs per iteration (L/P, or L/(R P) circular), "
                    "the activations a stage keeps for the backward pass (the reference, no pipeline, keeps B/8 x 8 = 16)."))
  plot(rows, paths.join(FLAGS.out, "bubble.png"))
  for name, pipe in TIMELINES.items():
    draw_pipeline_timeline(pipe, LAYERS, paths.join(FLAGS.out, f"timeline_{name}.png"))


if __name__ == "__main__":
  cli.run(main)
