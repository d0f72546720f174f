"""Distillation and pruning against their baselines, on the trained demo model.

  python -m launch.reproduce.compression --out docs/results/compression
  # teacher: --teacher runs/demo/checkpoints (make it with
  #   python -m launch.demo --config configs/demo.py --workdir runs/demo)

Rows: the teacher; a smaller student trained from scratch and the same student distilled from the
teacher (same steps, same data order, same initialization); the teacher pruned to 50% unstructured
and to 2:4, each in one shot and with gradual pruning during fine-tuning, beside the teacher
fine-tuned as long without pruning (fine-tuning alone also changes the perplexity). Validation
perplexity is over --eval_batches of the validation split (0: all of it), sparsity is measured from
the saved checkpoints. Writes <out>.md and <out>.csv and prints the table; runs go to --workdir.
"""

import dataclasses
import math
import time

import jax
from absl import app, flags

from compress.distill_run import distill
from compress.prune_run import prune, prune_one_shot
from launch.measure.tables import write_csv
from launch.run import cli
from launch.run.config import Config, validate, with_overrides
from launch.run.devices import simulate_cpu_devices
from launch.run.evaluation import eval_checkpoint
from launch.run.loop import train
from launch.run.restore import read_saved_config
from launch.storage import paths

flags.DEFINE_string("teacher", "runs/demo/checkpoints", "The trained teacher's checkpoint directory.")
flags.DEFINE_string("out", "docs/results/compression", "Output path prefix for .md and .csv.")
flags.DEFINE_string("workdir", "runs/bench-compression", "Scratch directory for the runs (emptied first).")
flags.DEFINE_integer("cpu_devices", 8, "Simulated CPU devices when running on CPU.")
flags.DEFINE_integer("student_steps", 300, "Training steps of both students.")
flags.DEFINE_integer("finetune_steps", 60, "Fine-tuning steps of the pruned (and the control) models.")
flags.DEFINE_integer("eval_batches", 40, "Validation batches (0: the whole split of 80).")
flags.DEFINE_float("alpha", 0.5, "distill.alpha")
flags.DEFINE_float("temperature", 2.0, "distill.temperature")
FLAGS = flags.FLAGS

# Half the depth, half the width of the demo teacher: ~0.9M parameters (0.5M of them the embedding).
STUDENT = {"model.num_layers": 2, "model.d_model": 128, "model.num_heads": 4, "model.num_kv_heads": 2,
           "model.mlp_dim": 384}


def variant(raw: dict, changes: dict) -> Config:
  """Validates a copy of the raw config dict with dotted-key changes applied."""
  return validate(with_overrides(raw, changes))


@dataclasses.dataclass
class Row:
  name: str
  params: int
  nonzero: int
  steps: str
  val_loss: float
  seconds: float

  def cells(self) -> list[str]:
    return [self.name, f"{self.params / 1e6:.2f}M", f"{self.nonzero / 1e6:.2f}M", self.steps,
            f"{self.val_loss:.3f}", f"{math.exp(self.val_loss):.1f}",
            "" if math.isnan(self.seconds) else f"{self.seconds:.0f}"]


HEADER = ["model", "params", "non-zero params", "steps", "val loss", "val perplexity", "time (s)"]


def markdown(rows: list[Row]) -> str:
  lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
  return "\n".join(lines + ["| " + " | ".join(r.cells()) + " |" for r in rows])


def timed(fn, *args, **kwargs):
  start = time.perf_counter()
  out = fn(*args, **kwargs)
  return out, time.perf_counter() - start


def main(argv):
  del argv
  cli.quiet_logs()
  simulate_cpu_devices(FLAGS.cpu_devices)  # no-op on GPU/TPU
  if not paths.isdir(FLAGS.teacher):
    raise app.UsageError(f"No teacher at {FLAGS.teacher}; train one with `python -m launch.demo --config "
                         "configs/demo.py --workdir runs/demo` or pass --teacher.")
  paths.rmtree(FLAGS.workdir)  # this benchmark's own scratch runs from a previous invocation
  saved, teacher_step = read_saved_config(FLAGS.teacher)
  raw = saved.to_dict()
  common = {"train.tensorboard": False, "train.eval_every": 0, "train.eval_batches": FLAGS.eval_batches,
            "checkpoint.keep": 1, "checkpoint.async_save": False, "mesh.num_devices": 0}
  teacher_cfg = variant(raw, common)
  eval_n = {"eval_batches": FLAGS.eval_batches}
  rows = []

  teacher_eval, seconds = timed(eval_checkpoint, FLAGS.teacher, **eval_n)
  teacher_params = teacher_cfg.model.num_params()
  rows.append(Row("teacher (demo: 4 layers, d=256)", teacher_params, teacher_params, str(teacher_step),
                  teacher_eval["val_loss"], float("nan")))

  n = FLAGS.student_steps
  student = {**common, **STUDENT, "train.steps": n, "checkpoint.save_every": n}
  scratch_cfg = variant(raw, student)
  result, seconds = timed(train, scratch_cfg, paths.join(FLAGS.workdir, "student_scratch"))
  p = scratch_cfg.model.num_params()
  rows.append(Row("student from scratch (2 layers, d=128)", p, p, str(n), result.val_loss, seconds))

  kd_cfg = variant(raw, {**student, "distill.teacher_checkpoint": FLAGS.teacher,
                         "distill.alpha": FLAGS.alpha, "distill.temperature": FLAGS.temperature})
  result, seconds = timed(distill, kd_cfg, paths.join(FLAGS.workdir, "student_distilled"))
  rows.append(Row(f"student distilled (alpha={FLAGS.alpha:g}, T={FLAGS.temperature:g})", p, p, str(n),
                  result.val_loss, seconds))

  f = FLAGS.finetune_steps
  finetune = {**common, "train.steps": f, "train.learning_rate": 3e-4, "train.warmup_steps": f // 10,
              "checkpoint.save_every": f}
  prunings = [("50% unstructured", {"prune.method": "magnitude", "prune.sparsity": 0.5}),
              ("2:4", {"prune.method": "n_m", "prune.n": 2, "prune.m": 4})]
  for label, method in prunings:
    cfg = variant(raw, {**finetune, **method, "prune.init_checkpoint": FLAGS.teacher})
    name = label.replace("% ", "_").replace(":", "_")
    out, seconds = timed(prune_one_shot, cfg, paths.join(FLAGS.workdir, f"oneshot_{name}"))
    loss = eval_checkpoint(out["checkpoint_dir"], **eval_n)["val_loss"]
    nonzero = round(teacher_params - out["sparsity_all_params"] * teacher_params)
    rows.append(Row(f"teacher pruned {label}, one shot", teacher_params, nonzero, "0", loss, seconds))

    gradual = variant(raw, {**finetune, **method, "prune.init_checkpoint": FLAGS.teacher,
                            "prune.end_step": (2 * f) // 3, "prune.frequency": max(f // 10, 1)})
    out, seconds = timed(prune, gradual, paths.join(FLAGS.workdir, f"finetuned_{name}"))
    nonzero = round(teacher_params - out["sparsity_all_params"] * teacher_params)
    extra = f", n:m violations {out['n_m_violations']}" if "n_m_violations" in out else ""
    print(f"{label}: kernels {100 * out['sparsity_pruned_kernels']:.2f}% zero, whole model "
          f"{100 * out['sparsity_all_params']:.2f}% zero (measured from {out['checkpoint_dir']}){extra}")
    rows.append(Row(f"teacher pruned {label}, gradual over {f} fine-tuning steps", teacher_params, nonzero,
                    str(f), out["val_loss"], seconds))

  # Control: the same fine-tuning without pruning.
  cfg = variant(raw, {**finetune, "prune.method": "magnitude", "prune.sparsity": 0.0,
                      "prune.init_checkpoint": FLAGS.teacher})
  out, seconds = timed(prune, cfg, paths.join(FLAGS.workdir, "finetuned_dense"))
  rows.append(Row(f"teacher fine-tuned {f} steps, not pruned (control)", teacher_params, teacher_params,
                  str(f), out["val_loss"], seconds))

  table = markdown(rows)
  devices = f"{len(jax.devices())} x {jax.devices()[0].platform}"
  note = (f"Validation: {'the whole split' if not FLAGS.eval_batches else f'{FLAGS.eval_batches} batches'}"
          f" of {teacher_cfg.train.global_batch_size} x {teacher_cfg.data.seq_len} tokens; {devices} devices; "
          "params count the tied embedding once; non-zero params are measured from the saved weights.")
  print(table + "\n\n" + note)
  paths.write_text(FLAGS.out + ".md", "Made by `python -m launch.reproduce.compression --out "
                   f"docs/results/compression`.\n\n{table}\n\n{note}\n")
  write_csv(FLAGS.out + ".csv", [r.cells() for r in rows], HEADER)


if __name__ == "__main__":
  cli.run(main)
