"""What checkpoint checksums cost: save and restore time of a full TrainState with and without them.

  python -m launch.reproduce.checkpoints --configs demo,llama_125m --repeats 3 --out docs/results

For each config, the run's fresh TrainState (parameters and AdamW moments, on one device) is saved
synchronously (the whole write, not only the part an async save blocks on) and restored, alternating
`Checkpointer(checksums=True)` and `checksums=False` in each repeat so drift in the machine's load
hits both alike. Also timed: the checksum pass alone (`launch/run/checksum.py`, one jitted
reduction per array, after compile). Writes <out>/checkpoints.md and .csv and prints the table.
"""

import os
import platform
import statistics
import tempfile

import jax
from absl import flags

from launch.measure.tables import write_table
from launch.measure.timing import call_seconds
from launch.run import checkpoint as ckpt_lib
from launch.run import checksum, cli
from launch.run import state as ts
from launch.run.config import validate, with_overrides
from launch.run.plan import make_plan
from launch.storage import paths

flags.DEFINE_list("configs", ["demo", "llama_125m"], "Config names under configs/.")
flags.DEFINE_integer("repeats", 3, "Timed save+restore pairs per mode (the median is reported).")
flags.DEFINE_string("out", "docs/results", "Directory for checkpoints.md and .csv.")
flags.DEFINE_string("work_dir", None, "Where the checkpoints are written (default: a temporary directory; "
                    "a gs:// URL times saves to the bucket).")
FLAGS = flags.FLAGS


def measure(name: str, repeats: int, work_dir: str) -> dict:
  """Times save, restore and the checksum pass for configs/<name>.py's TrainState; returns one table row."""
  raw = cli.config_from_file(os.path.join("configs", f"{name}.py"))
  cfg = validate(with_overrides(raw, {"mesh.num_devices": 1, "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}))
  plan = make_plan(cfg)
  state = ts.init_train_state(plan.mdef, plan.tx, plan.shardings, cfg.seed)
  abstract = ts.abstract_state(plan.mdef, plan.tx, plan.shardings)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  arrays = {"params": state.params, "opt_state": state.opt_state}
  for tree in (arrays, state.params, state.opt_state):  # compile the checksum of each tree save and restore use
    checksum.fingerprints(tree)
  times = {key: [] for key in ("save_plain", "save_checked", "restore_plain", "restore_checked", "checksum")}
  for repeat in range(repeats):
    for checked in (True, False) if repeat % 2 == 0 else (False, True):
      directory = paths.join(work_dir, f"{name}-{'checked' if checked else 'plain'}")
      paths.rmtree(directory)
      checkpointer = ckpt_lib.Checkpointer(directory, keep=1, async_save=False, checksums=checked)
      kind = "checked" if checked else "plain"
      times[f"save_{kind}"].append(call_seconds(lambda: checkpointer.save(1, state, {"config": cfg.to_dict()})))
      times[f"restore_{kind}"].append(call_seconds(lambda: checkpointer.restore_state(abstract, 1)[0]))
      checkpointer.close()
      paths.rmtree(directory)
    times["checksum"].append(call_seconds(lambda: checksum.fingerprints(arrays)[1]))
  median = {key: statistics.median(values) for key, values in times.items()}
  return {"config": name, "params_M": round(cfg.model.num_params() / 1e6, 1),
          "state_MB": round(state_bytes / 2**20, 1), "arrays": len(jax.tree.leaves(state)),
          "save_s": median["save_plain"], "save_checksummed_s": median["save_checked"],
          "save_ratio": median["save_checked"] / median["save_plain"],
          "restore_s": median["restore_plain"], "restore_verified_s": median["restore_checked"],
          "restore_ratio": median["restore_checked"] / median["restore_plain"],
          "checksum_pass_s": median["checksum"]}


def main(argv):
  del argv
  cli.quiet_logs()
  work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="shardlm-ckpt-bench-")
  load_before = os.getloadavg()[0]
  rows = []
  for name in FLAGS.configs:
    rows.append(measure(name, FLAGS.repeats, work_dir))
    print(rows[-1], flush=True)
  device = jax.devices()[0]
  machine = (f"{device.platform} ({device.device_kind}), {os.cpu_count()} cores, {platform.machine()}, "
             f"shared with other jobs (1-minute load average {load_before:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end: absolute times are noisy, the ratios less so)")
  command = (f"python -m launch.reproduce.checkpoints --configs {','.join(FLAGS.configs)} "
             f"--repeats {FLAGS.repeats} --out {FLAGS.out}")
  print(write_table(
      rows, FLAGS.out, "checkpoints", "Checkpoint checksums: save and restore time with and without", command,
      f"Machine: {machine}; one device; the checkpoint directory on local disk ({work_dir}). Times are "
      f"medians of {FLAGS.repeats} synchronous saves and restores of the full TrainState (float32 params "
      "and AdamW moments), alternating both modes in each repeat; ratios compare the two modes measured "
      "in the same run. 'checksum_pass_s' is the jitted checksum of every array alone (a save runs it "
      "once, a verified restore once). GPU/TPU rows were not measured."))


if __name__ == "__main__":
  cli.run(main)
