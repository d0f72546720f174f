"""Sharding benchmark: per-device memory, step time and tokens/s for every parallelism preset and remat
policy on 8 simulated CPU devices, and activation memory against Korthikanti et al. (2022).

  python -m launch.reproduce.sharding --out docs/results/sharding
  python -m launch.reproduce.sharding --out docs/results/sharding --tables activations

Writes presets.{md,csv} and sharding.png (--tables presets), activations.{md,csv} (--tables
activations) into --out.
"""

import os

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
from absl import flags

from configs.demo import get_config
from launch.measure.tables import write_table
from launch.measure.timing import time_train_step
from launch.run import cli
from launch.run.devices import simulate_cpu_devices
from launch.run.config import validate, with_overrides
from launch.run.plan import make_plan
from launch.storage import paths
from lm.loss import cross_entropy

flags.DEFINE_string("out", "docs/results/sharding", "Output directory.")
flags.DEFINE_integer("steps", 3, "Timed steps per configuration.")
flags.DEFINE_list("tables", ["presets", "activations"], "Which tables to regenerate.")
FLAGS = flags.FLAGS

PRESETS = [
    ("single device", "dp", dict(data=1), "none"),
    ("dp", "dp", dict(data=8), "none"),
    ("fsdp", "fsdp", dict(fsdp=8), "none"),
    ("fsdp", "fsdp", dict(data=2, fsdp=4), "none"),
    ("tp", "tp", dict(data=2, tensor=4), "none"),
    ("tp", "tp", dict(data=4, tensor=2), "none"),
    ("fsdp_tp", "fsdp_tp", dict(fsdp=2, tensor=4), "none"),
    ("fsdp_tp", "fsdp_tp", dict(fsdp=4, tensor=2), "none"),
    ("dp_fsdp_tp", "dp_fsdp_tp", dict(data=2, fsdp=2, tensor=2), "none"),
    ("fsdp", "fsdp", dict(fsdp=8), "full"),
    ("fsdp", "fsdp", dict(fsdp=8), "dots"),
    ("fsdp", "fsdp", dict(fsdp=8), "dots_no_batch"),
    ("fsdp", "fsdp", dict(fsdp=8), "save_qkv_mlp"),
    ("fsdp", "fsdp", dict(fsdp=8), "offload_qkv_mlp"),
]
MIB = 2 ** 20


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def preset_overrides(rules, axes, remat) -> dict:
  mesh = {**dict(data=1, fsdp=1, tensor=1, num_devices=1 if axes == dict(data=1) else 8, rules=rules), **axes}
  return {**{f"mesh.{k}": v for k, v in mesh.items()}, "model.remat": remat, "model.dtype": "float32"}


def preset_config(overrides: dict):
  return validate(with_overrides(get_config(), overrides))


def memory_of(overrides: dict, config_file: str = "configs/demo.py") -> dict:
  """Per-device memory of the compiled step from `python -m launch.memory --json` in a subprocess.

  Raises ValueError with the command's last error line if the config is refused.
  """
  devices = overrides.get("mesh.num_devices") or 8
  cmd = [sys.executable, "-m", "launch.memory", "--config", os.path.join(REPO, config_file),
         "--devices", str(devices), "--json", *[f"--config.{k}={v}" for k, v in overrides.items()]]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(cmd, cwd=REPO, env={**env, "PYTHONPATH": REPO}, capture_output=True, text=True)
  if out.returncode:
    lines = [l for l in out.stderr.splitlines() if "Error" in l or "error" in l]
    raise ValueError(lines[-1] if lines else out.stderr[-300:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def preset_rows(steps: int) -> list[dict]:
  rows = []
  for label, rules, axes, remat in PRESETS:
    overrides = preset_overrides(rules, axes, remat)
    cfg = preset_config(overrides)
    mesh_text = "x".join(f"{k}{v}" for k, v in axes.items())
    row = {"preset": label, "mesh": mesh_text, "remat": remat}
    try:
      plan = make_plan(cfg)
      memory = memory_of(overrides)
    except ValueError as e:  # e.g. host offload on CPU: recorded, not fatal
      rows.append({**row, "params_MiB": "", "optimizer_MiB": "", "temp_MiB": "", "step_s": "",
                   "tokens_per_s": "", "note": str(e).split(";")[0]})
      print(f"{label:12s} {mesh_text:18s} {remat:14s} skipped: {str(e)[:80]}")
      continue
    timing = time_train_step(plan, steps=steps, warmup=1)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    row.update(params_MiB=memory["params_bytes"] / MIB, optimizer_MiB=memory["optimizer_bytes"] / MIB,
               temp_MiB=memory["temp_bytes"] / MIB, step_s=timing.median_s,
               tokens_per_s=tokens / timing.median_s, note="")
    rows.append(row)
    print(f"{label:12s} {mesh_text:18s} {remat:14s} params {row['params_MiB']:7.2f} MiB  temp "
          f"{row['temp_MiB']:8.1f} MiB  step {timing.median_s:.3f}s  {row['tokens_per_s']:8.0f} tok/s")
  return rows


# Korthikanti et al. 2022, eq. 2: activations per layer in 16-bit without recomputation.
def korthikanti_bytes(s, b, h, a, remat):
  return 2 * s * b * h if remat == "full" else s * b * h * (34 + 5 * a * s / h)


def saved_activation_bytes(layers, remat, b, s, h, a):
  """Bytes autodiff keeps for the backward pass whose shape holds the batch and sequence dims."""
  c = get_config()
  c.model.update(dict(vocab_size=512, d_model=h, num_layers=layers, num_heads=a, num_kv_heads=a,
                      head_dim=h // a, mlp_dim=4 * h, max_seq_len=s, dtype="bfloat16", remat=remat))
  c.data.seq_len = s
  c.mesh.update(dict(num_devices=1, data=1))
  mdef = make_plan(validate(c), jax.devices()[:1]).mdef  # the kernels the run would use
  tokens = jax.ShapeDtypeStruct((b, s), jnp.int32)

  def loss(params, t):
    total, count = cross_entropy(mdef.bind(params)(t), t)
    return total / count

  residuals = jax.eval_shape(lambda p, t: jax.vjp(functools.partial(loss, t=t), p)[1],
                             mdef.abstract_params, tokens)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals) if b in x.shape and s in x.shape)


def compiled_temp_bytes(layers, remat, b, s, h, a):
  model = dict(vocab_size=512, d_model=h, num_layers=layers, num_heads=a, num_kv_heads=a, head_dim=h // a,
               mlp_dim=4 * h, max_seq_len=s, dtype="bfloat16", remat=remat)
  overrides = {**{f"model.{k}": v for k, v in model.items()}, "data.seq_len": s,
               "train.global_batch_size": b, "mesh.num_devices": 1, "mesh.data": 1}
  return memory_of(overrides)["temp_bytes"]


def activation_rows() -> list[dict]:
  b, s, h, a = 3, 192, 256, 4  # batch and sequence sizes no weight shape has, so residuals are found by shape
  rows = []
  for remat in ("none", "full", "dots"):
    per_layer = (saved_activation_bytes(4, remat, b, s, h, a) - saved_activation_bytes(2, remat, b, s, h, a)) / 2
    temp = (compiled_temp_bytes(4, remat, b, s, h, a) - compiled_temp_bytes(2, remat, b, s, h, a)) / 2
    formula = korthikanti_bytes(s, b, h, a, "full" if remat == "full" else "none")
    rows.append({"remat": remat, "saved_per_layer_MiB": per_layer / MIB,
                 "compiled_temp_per_layer_MiB": temp / MIB,
                 "korthikanti_per_layer_MiB": formula / MIB,
                 "formula": "2sbh" if remat == "full" else "sbh(34+5as/h)",
                 "saved_over_formula": per_layer / formula})
    print(rows[-1])
  return rows


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in rows if r["step_s"] != ""]
  labels = [f"{r['preset']}\n{r['mesh']}\n{r['remat']}" for r in rows]
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(13, 7), sharex=True)
  x = range(len(rows))
  params = [r["params_MiB"] + r["optimizer_MiB"] for r in rows]
  top.bar(x, params, label="params + optimizer")
  top.bar(x, [r["temp_MiB"] for r in rows], bottom=params, label="step temporaries")
  top.set_ylabel("MiB per device")
  top.legend()
  bottom.bar(x, [r["tokens_per_s"] for r in rows], color="tab:green")
  bottom.set_ylabel("tokens/s (8 simulated devices, 2 cores)")
  bottom.set_xticks(list(x), labels, fontsize=7)
  fig.suptitle("demo model (4.2M params, 4k vocab), batch 16 x 128, float32")
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  cli.quiet_logs()
  # Memory comes from `launch.memory` subprocesses, which set the CPU schedule that makes
  # memory_analysis honour remat; that schedule can deadlock collectives when steps run, so the
  # steps timed here run without it.
  simulate_cpu_devices(8)
  command = "python -m launch.reproduce.sharding --out " + FLAGS.out
  if "presets" in FLAGS.tables:
    rows = preset_rows(FLAGS.steps)
    print(write_table(rows, FLAGS.out, "presets", "Parallelism presets and remat policies (8 simulated CPU devices)",
                      command, "Memory is per device from the compiled step's memory_analysis(); step time is "
                      "the median of timed steps after compile and warm-up. All 8 simulated devices share "
                      "2 CPU cores, so tokens/s compares communication/layout overheads, not scaling."))
    plot(rows, paths.join(FLAGS.out, "sharding.png"))
  if "activations" not in FLAGS.tables:
    return
  print(write_table(activation_rows(), FLAGS.out, "activations",
                    "Activation memory per layer vs Korthikanti et al. 2022 (bf16, s=192, b=3, h=256, a=4)",
                    command, "saved_per_layer: bytes autodiff keeps for the backward pass (residuals with "
                    "batch and sequence dims), slope between 4 and 2 layers. compiled_temp: slope of XLA's "
                    "temp_size_in_bytes for the whole train step (includes gradient buffers)."))


if __name__ == "__main__":
  cli.run(main)
