"""The training loop: restore or initialize sharded state, step, log, evaluate, checkpoint.

The run writes <workdir>/checkpoints, metrics.jsonl, tensorboard/ and loss_curve.png. A workdir
that already holds checkpoints is continued with resume=True and never overwritten without it, and
one workdir holds one run at a time (<workdir>/run.lock). A workdir may be a gs:// URL (its bucket
is probed first; metrics go there as one object per save period: docs/training.md, "Runs in a
bucket"). A NaN or inf loss or gradient norm stops the run before it is saved (train.nonfinite).
The command-line entry point is launch/train.py.
"""

import dataclasses
import functools
import math

import jax

from launch.run import checkpoint as ckpt_lib
from launch.run import inputs
from launch.run import data_state as data_states
from launch.run import throughput as throughput_lib
from launch.run import state as ts
from launch.run.config import Config
from launch.run.plan import RunPlan, make_plan, with_dtype
from launch.run.evaluation import evaluate
from launch.run.logger import MetricLogger, plot_loss_curve
from launch.run.preemption import StopRequest
from launch.run.prefetch import Prefetcher
from launch.run.restore import check_compatible, inherit_tokenizer, init_from_checkpoint, saved_config
from launch.run import programs
from launch.run.step import LossHook, batch_sharding, global_batch
from launch.run.step_metrics import MetricsReader, NonFiniteGuard, StepClock
from launch.storage import bucket
from launch.storage import paths
from launch.storage.workdir_lock import WorkdirLock
from lm.data import loader

@dataclasses.dataclass
class TrainResult:
  workdir: str
  final_step: int
  train_loss: float
  val_loss: float
  val_perplexity: float
  tokens_per_s: float
  step_time_s: float
  mfu: float
  peak_source: str
  checkpoint_dir: str
  stopped_early: bool


def _check_model(plan: RunPlan, checkpointer: ckpt_lib.Checkpointer, step: int) -> None:
  """Raises ValueError when checkpoint `step` was made with a model a resume cannot continue
  (a key of restore.FIXED["resume"] differs from plan.cfg's)."""
  saved = saved_config(checkpointer.read_meta(step), checkpointer.directory)
  check_compatible(plan.cfg, saved, "resume", f"--resume: {checkpointer.directory} step {step}")


def restore_or_init(plan: RunPlan, checkpointer: ckpt_lib.Checkpointer, resume: bool, init_state=None,
                    step: int | None = None):
  """Returns (state, data_state or None): a checkpoint when resuming, else a fresh init.

  Resuming takes checkpoint `step`, or by default the newest step; when that one is unreadable
  (corrupt, checksum mismatch) and train.resume_fallback is on, it says so and takes the newest
  readable one. Steps newer than the one resumed are moved aside (never deleted) so the run can save
  them again. `init_state(plan)`, when given, makes the fresh state (e.g. from another run's parameters).
  """
  existing = checkpointer.steps()
  if existing and not resume:
    raise ValueError(f"{checkpointer.directory} already holds checkpoints {existing}; pass --resume to "
                     "continue that run, or choose a new --workdir (nothing was overwritten).")
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)
  if step is not None and step not in existing:
    checkpointer.read_meta(step)  # raises CheckpointError naming the steps there are
  if not existing:
    if resume:
      say(f"--resume: no checkpoint in {checkpointer.directory} yet; starting from step 0.")
    if init_state is not None:
      return init_state(plan), None
    return ts.init_train_state(plan.mdef, plan.tx, plan.shardings, plan.cfg.seed), None
  abstract = ts.abstract_state(plan.mdef, plan.tx, plan.shardings)
  candidates = [step] if step is not None else existing[::-1]
  unreadable = []
  for candidate in candidates:
    try:
      _check_model(plan, checkpointer, candidate)
      state, meta = checkpointer.restore_state(abstract, candidate)
    except ckpt_lib.CheckpointError as e:
      if step is not None or not plan.cfg.train.resume_fallback:
        raise
      say(f"--resume: step {candidate} is unreadable, trying an older one: {e}", flush=True)
      unreadable.append(candidate)
      continue
    newer = [s for s in checkpointer.steps() + unreadable if s > candidate]
    if newer:
      where = checkpointer.set_aside(sorted(set(newer)))
      say(f"--resume: continuing from step {candidate}; the newer steps {sorted(set(newer))} were moved "
          f"to {where} (nothing was deleted).", flush=True)
    return state, meta.get("data_state")
  raise ckpt_lib.CheckpointError(
      f"No readable checkpoint in {checkpointer.directory}: steps {unreadable} all failed to restore (see "
      "above); nothing was changed. Start a new run in another --workdir.")


def train(cfg: Config, workdir: str, *, resume: bool = False, resume_step: int | None = None,
          stop: StopRequest | None = None, on_step=None, plan: RunPlan | None = None, init_state=None,
          loss_hook: LossHook | None = None) -> TrainResult:
  """Runs training to cfg.train.steps (or until `stop` is requested) and returns its summary.

  `resume_step` resumes from that checkpoint step (implies resume). `on_step(step)` is called after
  each step is dispatched (tests use it to simulate preemption). compress/ reuses this loop through
  three hooks: `plan` (a prebuilt RunPlan, e.g. with a pruning optimizer), `init_state(plan)` (the
  fresh state when no checkpoint exists) and `loss_hook` (a training loss with extra inputs, e.g. a
  teacher). Evaluation is always the plain cross-entropy.

  `workdir` may be a gs:// URL (docs/training.md, "Runs in a bucket"); its bucket is probed first.
  Raises ValueError for bad input (a missing or unwritable bucket too) before anything is written,
  WorkdirLocked when another run holds `workdir`, NonFiniteError when the loss diverges
  (train.nonfinite) and SaveError when the disk refuses a checkpoint.
  """
  bucket.probe(workdir)  # a missing bucket or permission: one error line now, not a hang at the first save
  if cfg.model.quant != "none":
    raise ValueError(f"model.quant={cfg.model.quant!r} is for inference: int8 weights have no gradient. "
                     "Train (or fine-tune) the float model, then run python -m launch.quantize.")
  cfg = inherit_tokenizer(cfg)  # issue 14: a converted checkpoint's tokenizer, unless cfg names one
  plan = plan or make_plan(cfg)  # mesh and batch checks first: a bad plan writes nothing
  cfg = with_dtype(cfg, plan.cfg.model.dtype)  # model.dtype as the plan settled it for the devices
  with WorkdirLock(workdir):
    return _train_locked(cfg, workdir, resume=resume or resume_step is not None, resume_step=resume_step,
                         stop=stop or StopRequest(), on_step=on_step, plan=plan, init_state=init_state,
                         loss_hook=loss_hook)


def _train_locked(cfg: Config, workdir: str, *, resume: bool, resume_step: int | None, stop: StopRequest,
                  on_step, plan: RunPlan, init_state, loss_hook: LossHook | None) -> TrainResult:
  """The body of `train`, run while this process holds the workdir's lock."""
  primary = jax.process_index() == 0
  tokenizer = inputs.prepare(cfg.data, cfg.model.vocab_size)
  checkpointer = ckpt_lib.Checkpointer(paths.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep,
                                       async_save=cfg.checkpoint.async_save)
  try:
    if init_state is None and cfg.train.init_checkpoint:
      init_state = lambda c: init_from_checkpoint(c, cfg.train.init_checkpoint)
    state, data_state = restore_or_init(plan, checkpointer, resume, init_state, resume_step)
    return _loop(cfg, workdir, checkpointer, state, data_state, tokenizer, stop=stop, on_step=on_step,
                 plan=plan, loss_hook=loss_hook, primary=primary)
  except BaseException:
    try:  # lets an in-flight save of a good step finish; the first error is the one reported
      checkpointer.close()
    except Exception:  # noqa: BLE001
      pass
    raise


def _log_eval(logger: MetricLogger, step: int, val_loss: float) -> float:
  """Logs a validation loss (and its perplexity) at `step`; returns it."""
  logger.log(step, {"val_loss": val_loss, "val_perplexity": math.exp(val_loss)})
  return val_loss


def _loop(cfg: Config, workdir: str, checkpointer: ckpt_lib.Checkpointer, state, data_state, tokenizer, *,
          stop: StopRequest, on_step, plan: RunPlan, loss_hook, primary: bool) -> TrainResult:
  """Steps from the state's step to cfg.train.steps; closes the checkpointer when done."""
  start_step = int(jax.device_get(state.step))

  train_iter = loader.train_iterator_for(
      inputs.local_data(cfg.data), tokenizer, global_batch_size=cfg.train.global_batch_size, seed=cfg.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  data_state = data_states.local_state(data_state)
  if data_state is not None:
    train_iter.set_state(data_state)
  batches = Prefetcher(train_iter)
  step_fn = programs.train_step(plan, loss_hook)
  eval_fn = programs.eval_step(plan)
  data_sharding = batch_sharding(plan.mesh, plan.rules)

  peak, peak_source = throughput_lib.plan_peak(plan)

  logger = MetricLogger(workdir, total_steps=cfg.train.steps, start_step=start_step,
                        tensorboard=cfg.train.tensorboard, primary=primary)
  if primary:
    logger.log(start_step, {"params": cfg.model.num_params(), "devices": plan.num_devices,
                            "peak_tflops": peak / 1e12}, echo=False)
    logger.bar.write(f"model: {cfg.model.num_params() / 1e6:.2f}M params | mesh {dict(plan.mesh.shape)} "
                     f"rules={cfg.mesh.rules} | peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    for line in plan.describe():  # what the plan decided: kernels per place, layout, pipeline
      logger.bar.write(line)

  held_out_loss = functools.partial(evaluate, eval_fn, cfg=cfg, tokenizer=tokenizer,
                                    data_sharding=data_sharding)
  clock = StepClock()
  guard = NonFiniteGuard(cfg.train, checkpointer.last_good,
                         say=logger.bar.write if logger.bar is not None else None)
  reader = MetricsReader(plan, logger, clock, guard, log_every=cfg.train.log_every, start_step=start_step)
  last_data_state, step = data_state, start_step

  try:
    for step in range(start_step + 1, cfg.train.steps + 1):
      local, last_data_state = next(batches)
      state, metrics = step_fn(state, global_batch(local, data_sharding))
      if on_step is not None:
        on_step(step)
      reader.add(step, metrics)
      logger.advance()

      evaluate_now = cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps
      save_now = step % cfg.checkpoint.save_every == 0 or step == cfg.train.steps or stop.requested
      if evaluate_now or save_now:  # read this step's metrics first: a non-finite step is never saved
        reader.read_held(final=step == cfg.train.steps or stop.requested)
      if evaluate_now:
        _log_eval(logger, step, held_out_loss(state.params))
        clock.reset()  # evaluation time is not step time
      if save_now:
        checkpointer.save(step, state, {"data_state": data_states.gather_states(last_data_state),
                                        "config": cfg.to_dict(),
                                        "plan": plan.meta()})
        logger.flush()  # a bucket's metrics: one object per save period
        clock.reset()
      if stop.requested:
        if logger.bar is not None:
          logger.bar.write(f"{stop.signal_name}: saved step {step}; exiting.")
        break

    reader.read_held(final=True)
  except BaseException:
    batches.close()
    logger.close()
    raise
  batches.close()
  stopped = stop.requested and step < cfg.train.steps
  val_loss = float("nan") if stopped else _log_eval(logger, step, held_out_loss(state.params))
  checkpointer.close()
  logger.close()
  if primary:
    plot_loss_curve(workdir)
  step_time = clock.median()
  speed = throughput_lib.throughput(plan, step_time)
  return TrainResult(workdir=workdir, final_step=step, train_loss=reader.last_loss, val_loss=val_loss,
                     val_perplexity=math.exp(val_loss) if not math.isnan(val_loss) else float("nan"),
                     tokens_per_s=speed["tokens_per_s"], step_time_s=step_time,
                     mfu=speed["mfu"], peak_source=peak_source,
                     checkpoint_dir=checkpointer.directory, stopped_early=stopped)
