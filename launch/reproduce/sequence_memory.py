"""Per-device activation memory against sequence length, with sequences split 1, 2, 4 and 8 ways.

  python -m launch.reproduce.sequence_memory --out docs/results/sequence_memory

Compile-only: `launch.sweep --compile_only` points (each in its own process, resumable) compile the
train step of the llama_1b shape (configs/llama_1b.py widths, 128k vocabulary, bf16, remat
dots_no_batch) with ONE layer and batch 1 on N simulated CPU devices (mesh sequence=N, nothing
else split) and read `memory_analysis()`; nothing runs. Activation bytes are the step's
temporaries minus those at 256 tokens (gradients and optimizer temporaries do not grow with length),
compared with the unsplit run's divided by N. The fit columns scale the one-layer activations to
16 layers (x16: conservative, since the embedding and loss parts do not grow with layers), join the
measured lengths by straight lines on log-log axes (a local power law: attention scores grow with
L^2, the rest with L), continued past the ends, and solve for the longest sequence whose activations
fit 16 / 80 / 139 GiB per device, leaving weights and optimizer state out (fsdp splits those). Writes sequence_memory.{md,csv}
and sequence_memory.png.
"""

import os
import shlex
import sys

import numpy as np
from absl import flags

from launch.measure.sweep import run_sweep
from launch.measure.tables import write_table
from launch.run import cli
from launch.storage import paths

flags.DEFINE_string("out", "docs/results/sequence_memory", "Output directory (sweep points under <out>/sweep).")
flags.DEFINE_string("lengths", "8192,32768,131072", "Sequence lengths to compile (comma-separated).")
flags.DEFINE_string("shards", "1,2,4,8", "Sequence-axis sizes (comma-separated).")
FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "llama_1b.py")
BASE_LENGTH, LAYERS, FULL_LAYERS = 256, 1, 16
COMMON = [f"--config.model.num_layers={LAYERS}", "--config.train.global_batch_size=1",
          "--config.model.max_seq_len=131072", "--config.model.logits_chunk_size=256",
          "--config.mesh.data=1", "--config.mesh.fsdp=1"]
CAPACITIES_GIB = (16, 80, 139)
GIB = 2 ** 30


def sweep_records(lengths: list[int], shards: list[int]) -> list[dict]:
  """Every point's record (status, temp_bytes, seq, strategy, shards), running the missing ones."""
  records = []
  seqs = ",".join(map(str, [BASE_LENGTH, *lengths]))
  for n in shards:
    strategies = "ring" if n == 1 else "ring,all_gather"  # one sequence: no attention across shards
    grid = f"mesh=sequence{n};seq={seqs};seq_attention={strategies}"
    print(f"== sequence={n}: {grid}", flush=True)
    for r in run_sweep(CONFIG, grid, paths.join(FLAGS.out, "sweep", f"sequence{n}"), COMMON,
                       compile_only=True, devices=n, timeout=1800):
      records.append({**r, "shards": n, "strategy": "none" if n == 1 else r["seq_attention"]})
  return records


def longest_fit(lengths: list[int], activation_bytes: list[float], capacity: float) -> float:
  """The L at which activations reach `capacity` bytes: straight lines between the measured points on
  log-log axes (a local power law), continued past the first and last points with their segment's."""
  log_l, log_b = np.log(np.asarray(lengths, float)), np.log(np.asarray(activation_bytes, float))
  target = np.log(capacity)
  segment = int(np.clip(np.searchsorted(log_b, target) - 1, 0, len(lengths) - 2))
  slope = (log_b[segment + 1] - log_b[segment]) / (log_l[segment + 1] - log_l[segment])
  return float(np.exp(log_l[segment] + (target - log_b[segment]) / slope))


def memory_rows(records: list[dict], lengths: list[int]) -> tuple[list[dict], list[dict]]:
  """(one row per shards x strategy x length, one fit row per shards x strategy)."""
  by = {(r["shards"], r["strategy"], int(r["seq"])): r for r in records}
  def activations(n, strategy, length):
    r, base = by.get((n, strategy, length)), by.get((n, strategy, BASE_LENGTH))
    if not r or not base or r["status"] != "ok" or base["status"] != "ok":
      return None
    return r["temp_bytes"] - base["temp_bytes"]
  rows, fits = [], []
  for n, strategy in sorted({(r["shards"], r["strategy"]) for r in records}):
    measured = []
    for length in lengths:
      act, unsplit = activations(n, strategy, length), activations(1, "none", length)
      r = by.get((n, strategy, length), {})
      if act is None:
        rows.append({"sequence": n, "strategy": strategy, "tokens": length, "activation_GiB": float("nan"),
                     "ideal_GiB (unsplit/N)": float("nan"), "vs_ideal": float("nan"),
                     "status": r.get("status", "missing"), "reason": r.get("reason", "")[:80]})
        continue
      ideal = unsplit / n if unsplit is not None else float("nan")
      measured.append((length, act))
      rows.append({"sequence": n, "strategy": strategy, "tokens": length, "activation_GiB": act / GIB,
                   "ideal_GiB (unsplit/N)": ideal / GIB, "vs_ideal": act / ideal if ideal else float("nan"),
                   "status": "ok", "reason": ""})
    if len(measured) >= 2:
      xs, ys = zip(*measured)
      fit = {"sequence": n, "strategy": strategy}
      for cap in CAPACITIES_GIB:
        fit[f"longest_fit_{cap}GiB (k tokens)"] = longest_fit(list(xs), [y * FULL_LAYERS / LAYERS for y in ys],
                                                              cap * GIB) / 1024
      fits.append(fit)
  return rows, fits


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for (n, strategy), marker in zip(sorted({(r["sequence"], r["strategy"]) for r in rows}), "osv^D<>p"):
    ok = [r for r in rows if (r["sequence"], r["strategy"]) == (n, strategy) and r["status"] == "ok"]
    if ok:
      ax.plot([r["tokens"] for r in ok], [r["activation_GiB"] for r in ok], marker=marker,
              linestyle="-" if strategy != "all_gather" else "--", label=f"sequence={n} {strategy}")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("tokens per sequence")
  ax.set_ylabel("activation GiB per device (1 layer)")
  ax.set_title("llama_1b shape, 1 layer: activation memory vs sequence split (CPU compile)", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  cli.quiet_logs()
  lengths = [int(x) for x in FLAGS.lengths.split(",")]
  records = sweep_records(lengths, [int(x) for x in FLAGS.shards.split(",")])
  rows, fits = memory_rows(records, lengths)
  command = "python -m launch.reproduce.sequence_memory " + shlex.join(sys.argv[1:])
  notes = ("Compiled (never run) on simulated CPU devices of a 2-core host; XLA's CPU schedule with the "
           "memory-honouring flag (launch/run/devices.py), so an accelerator's numbers differ by tens of "
           "percent. Model: llama_1b widths with 1 layer (activation memory per layer scales linearly "
           f"with layers), batch 1, remat dots_no_batch, logits in chunks of 256. activation_GiB: temp "
           f"bytes minus those at {BASE_LENGTH} tokens. The unsplit run (sequence=1) uses XLA attention "
           "(no flash kernel on CPU), whose [L, L] scores make its activations grow with L^2; the ring "
           "holds [L/2N, 512] score chunks (its key chunk, block_size) and all_gather [L/N, L] scores, "
           "so vs_ideal can fall below 1.")
  markdown = write_table(rows, FLAGS.out, "sequence_memory",
                         "Sequence parallelism: activation bytes per device vs the ideal 1/N", command, notes)
  if fits:
    markdown += "\n" + write_table(
        fits, FLAGS.out, "sequence_memory_fit", "Longest sequence whose activations fit one device",
        command, f"Extrapolated, not measured: the 1-layer activations x {FULL_LAYERS} layers, joined between "
        "the measured lengths by a power law (straight on log-log axes, continued past the ends) and "
        "solved for the capacity. Weights, gradients and optimizer "
        "state are left out (sequence parallelism does not split them; combine with fsdp).")
  print(markdown)
  plot(rows, paths.join(FLAGS.out, "sequence_memory.png"))


if __name__ == "__main__":
  cli.run(main)
