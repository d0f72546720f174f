"""Parallelism sweeps: every point of a grid in its own process, recorded even when it fails.

  python -m launch.sweep --config configs/demo.py \
      --grid "mesh=data8,fsdp8,data2.tensor4;remat=none,full;batch=16,32" --out runs/sweep-x \
      [--compile_only] [--steps 5] [--timeout 600] [--config.model.num_layers=2 ...]

The grid is `;`-separated dimensions, each `key=value,value,...`; the sweep runs their Cartesian
product (the first dimension varies slowest). Keys:
  mesh    a mesh point: axes and sizes joined by `.`, e.g. `data8`, `fsdp8`, `data2.tensor4`,
          `data2.fsdp2.tensor2`, `stage4.data2` (axes left out are 1). The rule table follows from the axes used
          (data only: dp; fsdp: fsdp; tensor: tp; fsdp and tensor: fsdp_tp, dp_fsdp_tp with data)
          unless the grid also has `rules`.
  rules   mesh.rules            remat  model.remat          batch  train.global_batch_size
  accum   train.grad_accum_steps dtype model.dtype          layers model.num_layers
  seq     data.seq_len           micro  train.microbatches   schedule train.pipeline_schedule
  repeats train.pipeline_repeats
  a.b     any config key, e.g. `model.d_model=128,256` or `mesh.custom_rules=...` (no commas inside)
`--config.a.b=value` flags after the sweep's own flags apply to every point.

  python -m launch.sweep --config configs/llama_8b.py --topology v5p:4x4x8 --out docs/results/pod_sweep/llama_8b \
      --grid "mesh=fsdp128,fsdp32.tensor4;remat=full,none;batch=256,512"

With --topology (a TPU slice, e.g. v5p:4x4x8; the `tpu` extra) every point is compiled by the TPU
compiler for that slice from this CPU host and nothing runs: per-chip memory from the compiler,
whether it fits the chip's HBM, collectives per step, and XLA's estimated step time, tokens/s and MFU
(its cost model, never a measurement), written also as estimates.md/.csv and estimates.png with the
best point marked (launch/measure/sweep_estimates.py).

Each point runs `python -m launch.sweep_point` (compile, memory_analysis, timed steps) with a
timeout; invalid, out-of-memory, failing and timed-out points get a status and reason and the sweep
goes on (a crashed point is first retried --retries times). Results: <out>/points/<point>.json
(+ .log), <out>/results.csv, results.md, and PNG plots (launch/measure/sweep_report.py); --out may be
a gs:// URL (its bucket is probed before any point runs; docs/launch.md). Rerunning
the same command skips recorded points (--retry_failed reruns error/timeout/oom ones; a
compile-only record is redone when steps are wanted).
"""

import shlex
import sys

from absl import flags

from launch.measure.sweep import run_sweep
from launch.run import cli

flags.DEFINE_string("grid", None, 'The grid, e.g. "mesh=data8,fsdp8;remat=none,full;batch=16,32".')
flags.DEFINE_string("out", None, "Results directory, local or gs:// (rerun the command to resume).")
flags.DEFINE_bool("compile_only", False, "Compile and read memory; time no steps.")
flags.DEFINE_integer("steps", 5, "Timed steps per point.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per point after compiling.")
flags.DEFINE_integer("devices", 8, "Simulated CPU devices per point (CPU only).")
flags.DEFINE_float("timeout", 600, "Seconds before a point is killed.")
flags.DEFINE_bool("retry_failed", False, "Rerun recorded error/timeout/oom points.")
flags.DEFINE_integer("retries", 1, "Extra attempts for a point that crashes.")
flags.DEFINE_string("topology", None, "Compile every point for this TPU slice, e.g. v5p:4x4x8 (compile only).")
flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined over DCN (mesh.dcn_* split them).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.require("config", "grid", "out")
  command = "python -m launch.sweep " + shlex.join(sys.argv[1:])
  run_sweep(cli.config_path(), FLAGS.grid, FLAGS.out, cli.config_overrides(sys.argv[1:]), FLAGS.compile_only,
            FLAGS.steps, FLAGS.warmup, FLAGS.devices, FLAGS.timeout, FLAGS.retry_failed, command,
            retries=FLAGS.retries, topology=FLAGS.topology, num_slices=FLAGS.num_slices)


if __name__ == "__main__":
  cli.run(main)
