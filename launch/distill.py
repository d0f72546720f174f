"""Distill a trained teacher into a smaller student, with the ordinary training loop.

  python -m launch.distill --config configs/demo.py --workdir runs/student \
      --config.model.num_layers=2 --config.model.d_model=128 --config.model.mlp_dim=384 \
      --config.model.num_heads=4 --config.model.num_kv_heads=2 \
      --config.distill.teacher_checkpoint=runs/demo/checkpoints [--resume]

The config describes the student (model, data, schedule, mesh) and `distill.*`; the teacher's shapes
come from its checkpoint. Both are placed on the student's mesh by the student's rule table. The
result is an ordinary checkpoint: `launch.eval` and `launch.generate` read it as they read any run.
"""

import dataclasses
import functools
import json

import jax
from absl import app, flags

from compress import distill as kd
from launch import checkpoint as ckpt_lib
from launch import train_state as ts
from launch.cli import FLAGS, load_config, quiet_logs
from launch.config import Config
from launch.context import RunContext, build_context
from launch.preemption import StopRequest
from launch.step import LossHook
from launch.trainer import TrainResult, train
from lm.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Teacher:
  mdef: ts.ModelDef
  params: dict       # placed with the teacher's own shardings on the student's mesh
  step: int


def read_teacher_config(checkpoint_dir: str, step: int | None = None) -> tuple[dict, int]:
  """Returns (the teacher run's saved config as a dict, its step); CheckpointError if unreadable."""
  checkpointer = ckpt_lib.Checkpointer(checkpoint_dir, read_only=True)
  meta = checkpointer.read_meta(step)
  checkpointer.close()
  if "model" not in meta.get("config", {}):
    raise ckpt_lib.CheckpointError(f"{checkpoint_dir} step {meta.get('step')} has no saved model config; "
                                   "the teacher must be a checkpoint written by launch.train.")
  return meta["config"], int(meta["step"])


def load_teacher(cfg: Config, ctx: RunContext, step: int | None = None) -> Teacher:
  """Checks the teacher against the student, then restores its parameters onto ctx's mesh and rules.

  Raises ValueError (vocabulary or tokenizer mismatch, hidden matching across widths) before
  anything is read from the arrays or compiled.
  """
  saved, step = read_teacher_config(cfg.distill.teacher_checkpoint, step)
  teacher_cfg = ModelConfig(**{**saved["model"], "remat": "none"})  # no backward pass: no remat
  kd.check_teacher_fits(cfg.model, teacher_cfg, cfg.distill)
  teacher_tokenizer = saved.get("data", {}).get("tokenizer", cfg.data.tokenizer)
  if teacher_tokenizer != cfg.data.tokenizer:
    raise ValueError(f"The teacher was trained with data.tokenizer={teacher_tokenizer!r} but the student "
                     f"uses {cfg.data.tokenizer!r}; set --config.data.tokenizer={teacher_tokenizer}.")
  mdef = ts.model_def(teacher_cfg)
  shardings = ts.param_shardings(mdef, ctx.mesh, ctx.rules)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          mdef.abstract_params, shardings)
  checkpointer = ckpt_lib.Checkpointer(cfg.distill.teacher_checkpoint, read_only=True)
  params, _ = checkpointer.restore_params(abstract, step)
  checkpointer.close()
  return Teacher(mdef, params, step)


def distill_hook(cfg: Config, ctx: RunContext, teacher: Teacher) -> LossHook:
  """The training loss of a distillation run: the student's KD loss against `teacher`."""
  d = cfg.distill
  fn = functools.partial(kd.distill_loss, student=ctx.mdef, teacher=teacher.mdef, alpha=d.alpha,
                         temperature=d.temperature, hidden_weight=d.hidden_weight)
  shardings = jax.tree.map(lambda x: x.sharding, teacher.params)
  return LossHook(fn=fn, extra=teacher.params, extra_shardings=shardings)


def distill(cfg: Config, workdir: str, *, resume: bool = False, stop: StopRequest | None = None,
            ctx: RunContext | None = None) -> TrainResult:
  """Trains the student of `cfg` against cfg.distill.teacher_checkpoint; returns the TrainResult."""
  if not cfg.distill.teacher_checkpoint:
    raise ValueError("distill.teacher_checkpoint is empty; pass the teacher run's checkpoints, e.g. "
                     "--config.distill.teacher_checkpoint=runs/demo/checkpoints.")
  ctx = ctx or build_context(cfg)
  teacher = load_teacher(cfg, ctx)
  return train(cfg, workdir, resume=resume, stop=stop, ctx=ctx, loss_hook=distill_hook(cfg, ctx, teacher))


def main(argv):
  del argv
  quiet_logs()
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required.")
  cfg = load_config()
  result = distill(cfg, FLAGS.workdir, resume=FLAGS.resume, stop=StopRequest().install())
  if jax.process_index() == 0:
    print(json.dumps({**dataclasses.asdict(result), "student_params": cfg.model.num_params()}, indent=2))


if __name__ == "__main__":
  # Flags are defined only when run as a program, so the benchmark can import this module beside others.
  flags.DEFINE_string("workdir", None, "Directory for the student's checkpoints, metrics and plots.")
  flags.DEFINE_bool("resume", False, "Continue the distillation run whose checkpoints are in --workdir.")
  app.run(main)
