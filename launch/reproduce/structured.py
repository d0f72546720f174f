"""Structured pruning + distillation (Minitron) against the same shapes trained from scratch, on the
trained demo model, with step time and decode latency measured against the teacher in the same run.

  python -m launch.reproduce.structured --out docs/results/structured
  # teacher: --teacher runs/demo/checkpoints (python -m launch.demo --config configs/demo.py --workdir runs/demo)

For each target (about 50%, 75% and 90% of the parameters removed): the teacher pruned in one shot
(compress/structured.py: layers by calibration loss, KV groups, MLP neurons and embedding channels by
activations), then recovered by --steps steps of distillation from the unpruned teacher (KL only,
alpha=1, T=1 as in Minitron, from the pruned weights); beside it the same pruned weights fine-tuned
for the same steps and learning rate with the plain next-token loss (no teacher), which isolates
what the KD loss adds, and the same shape trained from scratch for the same steps (same batches,
same tokens). Validation perplexity over --eval_batches batches. Train-step time (8 simulated
devices, dp, float32) and greedy decode ms/token (one device, batch 1, KV cache) are measured in
this process, interleaved (every round runs each model once) and reported as the median over rounds
of the ratio to the teacher. Writes <out>.md and <out>.csv; the runs go to --workdir (emptied first).
"""

import math
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from compress.distill_run import distill
from compress.quantize_run import checkpoint_bytes
from compress.structured_run import prune_structured
from launch.measure.timing import median_ratio, time_interleaved, train_step_runner
from launch.measure.tables import write_csv
from launch.run import cli
from launch.run.config import Config, validate, with_overrides
from launch.run.plan import make_plan
from launch.run.devices import simulate_cpu_devices
from launch.run.evaluation import eval_checkpoint
from launch.run.loop import train
from launch.run.restore import load_checkpoint, read_saved_config
from launch.run import programs
from launch.storage import paths

flags.DEFINE_string("teacher", "runs/demo/checkpoints", "The trained teacher's checkpoint directory.")
flags.DEFINE_string("out", "docs/results/structured", "Output path prefix for .md and .csv.")
flags.DEFINE_string("workdir", "runs/reproduce-structured", "Scratch directory for the runs (emptied first).")
flags.DEFINE_integer("cpu_devices", 8, "Simulated CPU devices when running on CPU.")
flags.DEFINE_integer("steps", 150, "Distillation steps, and from-scratch training steps, per shape.")
flags.DEFINE_integer("eval_batches", 40, "Validation batches (0: the whole split).")
flags.DEFINE_float("alpha", 1.0, "distill.alpha (1: the teacher's distribution only, as Minitron)")
flags.DEFINE_float("temperature", 1.0, "distill.temperature")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate of the distillation from pruned weights.")
flags.DEFINE_integer("timed_steps", 7, "Timed rounds (one train step, one generation per model each).")
flags.DEFINE_integer("new_tokens", 48, "Greedy tokens per timed generation.")
FLAGS = flags.FLAGS

# Target shapes for the demo teacher (4 layers, d=256, 8 query / 4 KV heads, mlp 768; 4.20M params,
# 1.05M of them the tied 4096 x 256 embedding, so deep cuts must narrow d_model). 50%: width cut in
# every dimension, depth kept (Minitron: width beats depth for quality); it steps in ~0.44x the
# teacher's time, and the faster 50% shapes timed against it are in docs/compression.md.
TARGETS = (
    ("50%", dict(num_layers=4, d_model=192, num_heads=6, num_kv_heads=3, mlp_dim=384)),
    ("75%", dict(num_layers=3, d_model=128, num_heads=4, num_kv_heads=2, mlp_dim=320)),
    ("90%", dict(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=256)),
)
HEADER = ["model", "shape (layers, d, heads/kv, mlp)", "params", "removed", "checkpoint bytes",
          "val perplexity pruned", "val perplexity distilled", "val perplexity fine-tuned, no KD",
          "val perplexity from scratch", "KD part of recovery", "train step ms", "step x teacher",
          "decode ms/token", "decode x teacher"]


def variant(raw: dict, changes: dict) -> Config:
  return validate(with_overrides(raw, changes))


def shape_label(m) -> str:
  return f"{m.num_layers}, {m.d_model}, {m.num_heads}/{m.num_kv_heads}, {m.mlp_dim}"


def decode_runner(checkpoint_dir: str):
  """A zero-argument function: one greedy generation of --new_tokens tokens, batch 1 after a 16-token
  prompt, KV cache, on one device, waited for (the first call compiles)."""
  loaded = load_checkpoint(checkpoint_dir, devices=jax.devices()[:1])
  # The training layout, as this column has always timed (launch/run/programs.Generation).
  fn = programs.Generation(loaded.plan, max_new_tokens=FLAGS.new_tokens, layout="stacked")
  prompt = np.random.RandomState(0).randint(0, loaded.cfg.model.vocab_size, (1, 16)).astype(np.int32)
  return lambda: fn(loaded.params, prompt, jax.random.key(0), np.array([16], np.int32))


def ppl(loss: float) -> str:
  return f"{math.exp(loss):.1f}"


def main(argv):
  del argv
  cli.quiet_logs()
  simulate_cpu_devices(FLAGS.cpu_devices)  # no-op on GPU/TPU
  if not paths.isdir(FLAGS.teacher):
    raise app.UsageError(f"No teacher at {FLAGS.teacher}; train one with `python -m launch.demo --config "
                         "configs/demo.py --workdir runs/demo` or pass --teacher.")
  paths.rmtree(FLAGS.workdir)  # this script's own runs from a previous invocation
  saved, teacher_step = read_saved_config(FLAGS.teacher)
  raw = saved.to_dict()
  n = FLAGS.steps
  common = {"train.tensorboard": False, "train.eval_every": 0, "train.eval_batches": FLAGS.eval_batches,
            "checkpoint.keep": 1, "checkpoint.async_save": False, "checkpoint.save_every": n,
            "mesh.num_devices": 0, "model.dtype": "float32", "train.steps": n}
  teacher_cfg = variant(raw, common)
  t0 = time.perf_counter()
  log = lambda msg: print(f"[structured {time.perf_counter() - t0:6.0f}s] {msg}", flush=True)
  teacher_loss = eval_checkpoint(FLAGS.teacher, eval_batches=FLAGS.eval_batches)["val_loss"]
  log(f"teacher: perplexity {math.exp(teacher_loss):.1f}")
  models = [("teacher (demo)", teacher_cfg, FLAGS.teacher, teacher_step)]
  quality = {"teacher (demo)": (teacher_loss, None, None, None)}

  for label, shape in TARGETS:
    name = f"pruned {label}"
    prune_cfg = variant(raw, {**common, "prune.method": "structured", "prune.init_checkpoint": FLAGS.teacher,
                              **{f"prune.{k}": v for k, v in shape.items()}})
    out = prune_structured(prune_cfg, paths.join(FLAGS.workdir, f"pruned_{label[:-1]}"))
    pruned_loss = eval_checkpoint(out["checkpoint_dir"], eval_batches=FLAGS.eval_batches)["val_loss"]
    log(f"{name}: {out['params_after']:,} params (layers kept {out['layers_kept']}), "
        f"perplexity {math.exp(pruned_loss):.1f} before recovery")
    small = {**common, **{f"model.{k}": v for k, v in shape.items()}}
    kd_cfg = variant(raw, {**small, "train.init_checkpoint": out["checkpoint_dir"],
                           "train.learning_rate": FLAGS.learning_rate, "train.warmup_steps": max(n // 10, 1),
                           "distill.teacher_checkpoint": FLAGS.teacher, "distill.alpha": FLAGS.alpha,
                           "distill.temperature": FLAGS.temperature})
    distilled = distill(kd_cfg, paths.join(FLAGS.workdir, f"distilled_{label[:-1]}"))
    log(f"{name}: distilled {n} steps, perplexity {math.exp(distilled.val_loss):.1f}")
    # The control: the same init, steps, batches and schedule, the plain next-token loss, no teacher.
    tuned_cfg = variant(raw, {**small, "train.init_checkpoint": out["checkpoint_dir"],
                              "train.learning_rate": FLAGS.learning_rate, "train.warmup_steps": max(n // 10, 1)})
    tuned = train(tuned_cfg, paths.join(FLAGS.workdir, f"finetuned_{label[:-1]}"))
    log(f"{name}: fine-tuned {n} steps without the teacher, perplexity {math.exp(tuned.val_loss):.1f}")
    scratch_cfg = variant(raw, small)
    scratch = train(scratch_cfg, paths.join(FLAGS.workdir, f"scratch_{label[:-1]}"))
    log(f"{name}: from scratch {n} steps, perplexity {math.exp(scratch.val_loss):.1f}")
    models.append((name, scratch_cfg, out["checkpoint_dir"], out["step"]))
    quality[name] = (pruned_loss, distilled.val_loss, tuned.val_loss, scratch.val_loss)

  log(f"timing train steps, then decoding: {FLAGS.timed_steps} rounds, every model once per round")
  steps = time_interleaved({name: train_step_runner(make_plan(cfg)) for name, cfg, _, _ in models},
                           rounds=FLAGS.timed_steps)
  decodes = time_interleaved({name: decode_runner(ckpt) for name, _, ckpt, _ in models},
                             rounds=FLAGS.timed_steps)
  rows, teacher_params, step_ratio = [], teacher_cfg.model.num_params(), {}
  for name, cfg, ckpt, step in models:
    p = cfg.model.num_params()
    pruned, distilled, tuned, scratch = quality[name]
    step_ratio[name] = median_ratio(steps[name], steps["teacher (demo)"])
    blank = lambda loss: "" if loss is None else ppl(loss)
    # Of the loss that recovery wins back, the part fine-tuning alone does not (nats, not perplexity).
    kd_part = "" if distilled is None else f"{100 * (tuned - distilled) / (pruned - distilled):.0f}%"
    rows.append([name, shape_label(cfg.model), f"{p:,}", f"{100 * (1 - p / teacher_params):.1f}%",
                 f"{checkpoint_bytes(ckpt, step):,}", ppl(pruned), blank(distilled), blank(tuned),
                 blank(scratch), kd_part, f"{1e3 * statistics.median(steps[name]):.0f}",
                 f"{step_ratio[name]:.2f}", f"{1e3 * statistics.median(decodes[name]) / FLAGS.new_tokens:.2f}",
                 f"{median_ratio(decodes[name], decodes['teacher (demo)']):.2f}"])

  half_pruned, half_kd, half_tuned, half_scratch = quality["pruned 50%"]
  half_step = step_ratio["pruned 50%"]
  goals = [
      f"distilled perplexity within 5% of the teacher's: {math.exp(half_kd):.1f} vs "
      f"{math.exp(teacher_loss):.1f} ({100 * (math.exp(half_kd - teacher_loss) - 1):+.1f}%) -> "
      f"{'met' if math.exp(half_kd - teacher_loss) <= 1.05 else 'NOT met'}",
      f"better than from scratch: {math.exp(half_kd):.1f} vs {math.exp(half_scratch):.1f} -> "
      f"{'met' if half_kd < half_scratch else 'NOT met'} (fine-tuned without the teacher: "
      f"{math.exp(half_tuned):.1f})",
      f"train step <= 0.6x the teacher's: {half_step:.2f}x -> {'met' if half_step <= 0.6 else 'NOT met'}",
  ]
  devices = f"{len(jax.devices())} x {jax.devices()[0].platform}"
  table = "\n".join(["| " + " | ".join(HEADER) + " |", "|---|---|" + "---:|" * (len(HEADER) - 2)]
                    + ["| " + " | ".join(r) + " |" for r in rows])
  tokens = n * teacher_cfg.train.global_batch_size * teacher_cfg.data.seq_len
  note = (f"Teacher: {teacher_step} steps. Distilled, fine-tuned and from scratch: {n} steps each of "
          f"{teacher_cfg.train.global_batch_size} x {teacher_cfg.data.seq_len} tokens ({tokens:,} tokens), "
          f"the same batches. Distillation: alpha={FLAGS.alpha:g}, T={FLAGS.temperature:g}, peak lr "
          f"{FLAGS.learning_rate:g}; fine-tuned, no KD: the same pruned weights, schedule and lr, the plain "
          f"next-token loss; from scratch: the demo's lr {teacher_cfg.train.learning_rate:g}. KD part of "
          "recovery: (loss fine-tuned - loss distilled) / (loss pruned - loss distilled), the share of the "
          "recovered loss that fine-tuning alone does not win back. "
          f"Validation: {FLAGS.eval_batches or 'all'} batches. Params count the tied embedding once; checkpoint "
          f"bytes are the saved parameters on disk. Train step ({devices} devices, dp, float32) and decode "
          f"(batch 1, greedy, {FLAGS.new_tokens} tokens after a 16-token prompt, one device): "
          f"{FLAGS.timed_steps} interleaved rounds, each model once per round; ms are medians, x teacher "
          "the median over rounds of the ratio to the teacher's time in the same round. Timings are "
          "wall-clock on a shared 2-core CPU.")
  goal_text = "Goals at 50% removed (computed from the row above):\n" + "\n".join(f"- {g}" for g in goals)
  print(table + "\n\n" + note + "\n\n" + goal_text)
  paths.write_text(FLAGS.out + ".md", f"Made by `python -m launch.reproduce.structured --steps {n}` "
                   f"({time.perf_counter() - t0:.0f} s on this machine).\n\n{table}\n\n{note}\n\n{goal_text}\n")
  write_csv(FLAGS.out + ".csv", rows, HEADER)


if __name__ == "__main__":
  cli.run(main)
