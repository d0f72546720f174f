"""The training loop: restore or initialize sharded state, step, log, evaluate, checkpoint.

The run writes <workdir>/checkpoints, metrics.jsonl, tensorboard/ and loss_curve.png. A workdir
that already holds checkpoints is continued with resume=True and never overwritten without it.
The command-line entry point is launch/train.py.
"""

import dataclasses
import math
import os
import time

import jax
import numpy as np

from launch.run import checkpoint as ckpt_lib
from launch.run import data_state as data_states
from launch.run import throughput as throughput_lib
from launch.run import state as ts
from launch.run.config import Config
from launch.run.context import RunContext, build_context
from launch.run.evaluation import evaluate
from launch.run.logger import MetricLogger, plot_loss_curve
from launch.run.preemption import StopRequest
from launch.run.prefetch import Prefetcher
from launch.run.restore import init_from_checkpoint, saved_config
from launch.run.step import LossHook, batch_sharding, global_batch, jit_eval_step, jit_train_step
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


def restore_or_init(ctx: RunContext, checkpointer: ckpt_lib.Checkpointer, resume: bool, init_state=None):
  """Returns (state, data_state or None): the latest checkpoint when resuming, else a fresh init.

  `init_state(ctx)`, when given, makes the fresh state (e.g. from another run's parameters).
  """
  existing = checkpointer.steps()
  if existing and not resume:
    raise ValueError(f"{checkpointer.directory} already holds checkpoints {existing}; pass --resume to "
                     "continue that run, or choose a new --workdir (nothing was overwritten).")
  if not existing:
    if resume:
      print(f"--resume: no checkpoint in {checkpointer.directory} yet; starting from step 0.")
    if init_state is not None:
      return init_state(ctx), None
    return ts.init_train_state(ctx.mdef, ctx.tx, ctx.shardings, ctx.cfg.seed), None
  saved_model = dataclasses.asdict(saved_config(checkpointer.read_meta(), checkpointer.directory).model)
  now_model = dataclasses.asdict(ctx.cfg.model)
  if saved_model != now_model:
    diff = {k: (saved_model[k], v) for k, v in now_model.items() if saved_model[k] != v}
    raise ValueError(f"The checkpoint in {checkpointer.directory} was made with a different model "
                     f"(key: (saved, now)) {diff}; resume with the saved model config.")
  abstract = ts.abstract_state(ctx.mdef, ctx.tx, ctx.shardings)
  state, meta = checkpointer.restore_state(abstract)
  return state, meta.get("data_state")


def train(cfg: Config, workdir: str, *, resume: bool = False, stop: StopRequest | None = None,
          on_step=None, ctx: RunContext | None = None, init_state=None,
          loss_hook: LossHook | None = None) -> TrainResult:
  """Runs training to cfg.train.steps (or until `stop` is requested) and returns its summary.

  `on_step(step)` is called after each step is dispatched (tests use it to simulate preemption).
  compress/ reuses this loop through three hooks: `ctx` (a prebuilt RunContext, e.g. with a pruning
  optimizer), `init_state(ctx)` (the fresh state when no checkpoint exists) and `loss_hook` (a
  training loss with extra inputs, e.g. a teacher). Evaluation is always the plain cross-entropy.
  """
  primary = jax.process_index() == 0
  if cfg.model.quant != "none":
    raise ValueError(f"model.quant={cfg.model.quant!r} is for inference: int8 weights have no gradient. "
                     "Train (or fine-tune) the float model, then run python -m launch.quantize.")
  stop = stop or StopRequest()
  tokenizer = loader.prepare_from_config(cfg.data, cfg.model.vocab_size)
  ctx = ctx or build_context(cfg)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep,
                                       async_save=cfg.checkpoint.async_save)
  if init_state is None and cfg.train.init_checkpoint:
    init_state = lambda c: init_from_checkpoint(c, cfg.train.init_checkpoint)
  state, data_state = restore_or_init(ctx, checkpointer, resume, init_state)
  start_step = int(jax.device_get(state.step))

  train_iter = loader.train_iterator(
      cfg.data.data_dir, tokenizer, seq_len=cfg.data.seq_len, global_batch_size=cfg.train.global_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(), seed=cfg.seed,
      shuffle=cfg.data.shuffle_buffer_docs, num_workers=cfg.data.num_workers,
      process_sharding=cfg.data.process_sharding)
  data_state = data_states.local_state(data_state)
  if data_state is not None:
    train_iter.set_state(data_state)
  batches = Prefetcher(train_iter)
  step_fn = jit_train_step(ctx.mdef, ctx.tx, ctx.schedule, cfg.train.grad_accum_steps, ctx.mesh,
                           ctx.rules, ctx.shardings, loss_hook)
  eval_fn = jit_eval_step(ctx.mdef, ctx.mesh, ctx.rules, ctx.shardings.params)
  data_sharding = batch_sharding(ctx.mesh, ctx.rules)

  devices = list(ctx.mesh.devices.flat)
  peak, peak_source = throughput_lib.run_peak_flops(cfg, devices)

  logger = MetricLogger(workdir, total_steps=cfg.train.steps, start_step=start_step,
                        tensorboard=cfg.train.tensorboard, primary=primary)
  if primary:
    logger.log(start_step, {"params": cfg.model.num_params(), "devices": ctx.num_devices,
                            "peak_tflops": peak / 1e12}, echo=False)
    logger.bar.write(f"model: {cfg.model.num_params() / 1e6:.2f}M params | mesh {dict(ctx.mesh.shape)} "
                     f"rules={cfg.mesh.rules} | peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    logger.bar.write(ctx.attention.message())  # issue 12: which attention kernel runs, and why

  def run_eval(step):
    loss = evaluate(eval_fn, state.params, cfg, tokenizer, data_sharding)
    logger.log(step, {"val_loss": loss, "val_perplexity": math.exp(loss)})
    return loss

  pending = None            # (step, device metrics) read one step late so the host never stalls
  timer = {"start": None, "steps": 0}
  step_times, last_loss, last_data_state, step = [], float("nan"), data_state, start_step

  def record(done_step, device_metrics, final=False):
    """Fetches a finished step's metrics (the device has moved on) and logs every log_every steps."""
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    now = time.perf_counter()
    if timer["start"] is None:   # the first step includes compilation (or an eval/save): not timed
      timer["start"] = now
    else:
      timer["steps"] += 1
    if done_step % cfg.train.log_every and not final and done_step != start_step + 1:
      return values["loss"]
    values["perplexity"] = math.exp(min(values["loss"], 50.0))
    if timer["steps"]:
      step_time = (now - timer["start"]) / timer["steps"]
      step_times.append(step_time)
      speed = throughput_lib.throughput(cfg, step_time, devices)
      values.update(step_time_s=step_time, tokens_per_s=speed["tokens_per_s"], mfu=speed["mfu"])
      timer["start"], timer["steps"] = now, 0
    logger.log(done_step, values)
    return values["loss"]

  for step in range(start_step + 1, cfg.train.steps + 1):
    local, last_data_state = next(batches)
    state, metrics = step_fn(state, global_batch(local, data_sharding))
    if on_step is not None:
      on_step(step)
    if pending is not None:
      last_loss = record(*pending)
    pending = (step, metrics)
    logger.advance()

    if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
      run_eval(step)
      timer["start"], timer["steps"] = None, 0  # evaluation time is not step time
    if step % cfg.checkpoint.save_every == 0 or step == cfg.train.steps or stop.requested:
      checkpointer.save(step, state, {"data_state": data_states.gather_states(last_data_state),
                                      "config": cfg.to_dict(),
                                      "attention": dataclasses.asdict(ctx.attention)})
      timer["start"], timer["steps"] = None, 0
    if stop.requested:
      if logger.bar is not None:
        logger.bar.write(f"{stop.signal_name}: saved step {step}; exiting.")
      break

  if pending is not None:
    last_loss = record(*pending, final=True)
  batches.close()
  stopped = stop.requested and step < cfg.train.steps
  val_loss = float("nan") if stopped else run_eval(step)
  checkpointer.close()
  logger.close()
  if primary:
    plot_loss_curve(workdir)
  step_time = float(np.median(step_times)) if step_times else float("nan")
  speed = throughput_lib.throughput(cfg, step_time, devices)
  return TrainResult(workdir=workdir, final_step=step, train_loss=last_loss, val_loss=val_loss,
                     val_perplexity=math.exp(val_loss) if not math.isnan(val_loss) else float("nan"),
                     tokens_per_s=speed["tokens_per_s"], step_time_s=step_time,
                     mfu=speed["mfu"], peak_source=peak_source,
                     checkpoint_dir=checkpointer.directory, stopped_early=stopped)
