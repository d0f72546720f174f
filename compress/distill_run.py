"""A distillation run end to end: the teacher restored onto the student's mesh, the KD loss in the
ordinary training loop (the command is `python -m launch.distill`; docs/compression.md).

The config describes the student (model, data, schedule, mesh) and `distill.*`; the teacher's shapes
come from its checkpoint. Both are placed on the student's mesh by the student's rule table. The
result is an ordinary checkpoint: `launch.eval` and `launch.generate` read it as they read any run.
"""

import dataclasses
import functools

import jax

from compress import distill as kd
from launch.run import state as ts
from launch.run.config import Config
from launch.run.plan import RunPlan, make_plan
from launch.run.preemption import StopRequest
from launch.run.step import LossHook
from launch.run.loop import TrainResult, train
from launch.run.restore import read_saved_config, restore_params


@dataclasses.dataclass(frozen=True)
class Teacher:
  mdef: ts.ModelDef
  params: dict       # placed with the teacher's own shardings on the student's mesh
  step: int


def load_teacher(cfg: Config, plan: RunPlan, step: int | None = None) -> Teacher:
  """Checks the teacher against the student, then restores its parameters onto plan's mesh and rules.

  Raises ValueError (vocabulary or tokenizer mismatch, hidden matching across widths) before
  anything is read from the arrays or compiled.
  """
  saved, step = read_saved_config(cfg.distill.teacher_checkpoint, step)
  teacher_cfg = plan.model_for(dataclasses.replace(saved.model, remat="none"))  # no backward pass: no remat
  kd.check_teacher_fits(cfg.model, teacher_cfg, cfg.distill)
  teacher_tokenizer = saved.data.tokenizer
  if teacher_tokenizer != cfg.data.tokenizer:
    raise ValueError(f"The teacher was trained with data.tokenizer={teacher_tokenizer!r} but the student "
                     f"uses {cfg.data.tokenizer!r}; set --config.data.tokenizer={teacher_tokenizer}.")
  # The teacher's kernels, planned for the student's devices (`with_teacher_kernels` put them in the
  # plan a run prints and stores; the same rule decides them here for a plan made without).
  mdef = ts.model_def(teacher_cfg, None, plan.teacher or plan.attention_for(teacher_cfg))
  params, _ = restore_params(cfg.distill.teacher_checkpoint, mdef, ts.param_shardings(mdef, plan.mesh, plan.rules),
                             step)
  return Teacher(mdef, params, step)


def with_teacher_kernels(plan: RunPlan, teacher_checkpoint: str, step: int | None = None) -> RunPlan:
  """`plan` with the teacher's kernels, planned for the student's devices from the teacher
  checkpoint's model (no backward pass: no remat); the run prints and stores them beside the student's."""
  saved, _ = read_saved_config(teacher_checkpoint, step)
  return plan.with_teacher(plan.model_for(dataclasses.replace(saved.model, remat="none")))


def distill_hook(cfg: Config, plan: RunPlan, teacher: Teacher) -> LossHook:
  """The training loss of a distillation run: the student's KD loss against `teacher`."""
  d = cfg.distill
  fn = functools.partial(kd.distill_loss, student=plan.natural_order_mdef(), teacher=teacher.mdef, alpha=d.alpha,
                         temperature=d.temperature, hidden_weight=d.hidden_weight)
  shardings = jax.tree.map(lambda x: x.sharding, teacher.params)
  return LossHook(fn=fn, extra=teacher.params, extra_shardings=shardings)


def distill(cfg: Config, workdir: str, *, resume: bool = False, stop: StopRequest | None = None,
            plan: RunPlan | None = None) -> TrainResult:
  """Trains the student of `cfg` against cfg.distill.teacher_checkpoint; returns the TrainResult."""
  if not cfg.distill.teacher_checkpoint:
    raise ValueError("distill.teacher_checkpoint is empty; pass the teacher run's checkpoints, e.g. "
                     "--config.distill.teacher_checkpoint=runs/demo/checkpoints.")
  plan = with_teacher_kernels(plan or make_plan(cfg), cfg.distill.teacher_checkpoint)
  teacher = load_teacher(cfg, plan)
  return train(cfg, workdir, resume=resume, stop=stop, plan=plan, loss_hook=distill_hook(cfg, plan, teacher))
