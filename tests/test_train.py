"""Training end to end on the bundled corpus: loss goes down, resume is exact, preemption is safe."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs.smoke import get_config
from launch.run import checkpoint as ckpt_lib
from launch.run.config import validate, with_overrides
from launch.run.logger import read_metrics
from launch.run.preemption import StopRequest
from launch.run.loop import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def smoke_config(data_dir, **train_overrides):
  c = get_config()
  c.data.data_dir = data_dir
  c.train.steps = 8
  c.train.log_every = 1
  c.train.eval_batches = 2
  c.train.tensorboard = False
  c.checkpoint.save_every = 2
  c.checkpoint.async_save = True
  return validate(with_overrides(c, {k.replace("__", "."): v for k, v in train_overrides.items()}))


def losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  result = train(smoke_config(data_dir), workdir)
  return workdir, result


def test_training_reduces_loss(uninterrupted):
  workdir, result = uninterrupted
  curve = losses(workdir)
  assert sorted(curve) == list(range(1, 9))
  assert curve[8] < curve[1] - 0.3
  assert np.isfinite(result.val_loss) and result.final_step == 8
  assert os.path.exists(os.path.join(workdir, "loss_curve.png"))
  assert ckpt_lib.Checkpointer(result.checkpoint_dir, read_only=True).steps() == [4, 6, 8]  # keep=3


def test_resume_equals_uninterrupted_run(uninterrupted, data_dir, tmp_path):
  full_dir, _ = uninterrupted
  cfg = smoke_config(data_dir)
  stop = StopRequest()
  first = train(cfg, str(tmp_path), stop=stop, on_step=lambda s: s == 3 and stop.request("test"))
  assert first.stopped_early and first.final_step == 3
  second = train(cfg, str(tmp_path), resume=True)
  assert second.final_step == 8
  reference, resumed = losses(full_dir), losses(str(tmp_path))
  for step in range(4, 9):
    assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), step
  assert second.val_loss == pytest.approx(losses(full_dir) and uninterrupted[1].val_loss, rel=1e-6)


def test_existing_checkpoints_are_never_overwritten_without_resume(uninterrupted, data_dir):
  workdir, _ = uninterrupted
  with pytest.raises(ValueError, match="pass --resume"):
    train(smoke_config(data_dir), workdir)


def _train_process(data_dir, workdir, *extra):
  cmd = [sys.executable, "-m", "launch.train", "--config", os.path.join(REPO, "configs/smoke.py"),
         f"--config.data.data_dir={data_dir}", f"--workdir={workdir}", "--config.train.tensorboard=False",
         "--config.train.log_every=1", "--config.train.eval_batches=1", *extra]
  env = {**os.environ, "PYTHONPATH": REPO}
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(workdir, step, proc, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if losses(workdir) and max(losses(workdir)) >= step:
      return
    if proc.poll() is not None:
      raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
    time.sleep(0.05)
  raise AssertionError(f"no step {step} within {timeout}s")


def test_sigterm_saves_and_exits_zero(data_dir, tmp_path, uninterrupted):
  del uninterrupted  # only so the tokenizer and shards exist before the subprocess starts
  workdir = str(tmp_path)
  proc = _train_process(data_dir, workdir, "--config.train.steps=100000", "--config.checkpoint.save_every=100000")
  _wait_for_step(workdir, 3, proc)
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, output
  assert "SIGTERM: saved step" in output
  saved = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).steps()
  assert len(saved) == 1 and saved[0] >= 3  # saved only because of the signal
  resumed = train(smoke_config(data_dir, train__steps=saved[0] + 2), workdir, resume=True)
  assert resumed.final_step == saved[0] + 2


def test_sigkill_during_save_resumes_from_last_good_checkpoint(data_dir, tmp_path, uninterrupted):
  del uninterrupted
  workdir = str(tmp_path)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  proc = _train_process(data_dir, workdir, "--config.train.steps=100000", "--config.checkpoint.save_every=1",
                        "--config.checkpoint.keep=2")
  _wait_for_step(workdir, 3, proc)  # step 3 is logged after save 2 began, so save 1 is complete
  deadline = time.time() + 60
  while time.time() < deadline and not glob.glob(os.path.join(ckpt_dir, "*tmp*")):
    time.sleep(0.002)
  partial = glob.glob(os.path.join(ckpt_dir, "*tmp*"))
  proc.kill()  # SIGKILL: no handler runs
  proc.communicate(timeout=30)
  assert partial, "never observed a save in progress"
  good = ckpt_lib.Checkpointer(ckpt_dir, read_only=True).steps()
  assert good, "the kill must leave the earlier complete checkpoints"
  resumed = train(smoke_config(data_dir, train__steps=good[-1] + 2, checkpoint__keep=2), workdir, resume=True)
  assert resumed.final_step == good[-1] + 2 and np.isfinite(resumed.train_loss)


def test_corrupt_checkpoint_gets_clear_error_and_keeps_older_ones(uninterrupted, tmp_path):
  _, result = uninterrupted
  ckpt_dir = str(tmp_path / "checkpoints")
  shutil.copytree(result.checkpoint_dir, ckpt_dir)
  for path in glob.glob(os.path.join(ckpt_dir, "8", "params", "**", "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "wb") as f:
        f.write(b"garbage")
  from launch.run.restore import load_checkpoint
  with pytest.raises(ckpt_lib.CheckpointError, match=r"step 8 .* corrupt or incomplete.*Other steps here: \[4, 6\]"):
    load_checkpoint(ckpt_dir)
  loaded = load_checkpoint(ckpt_dir, step=6)  # the previous good checkpoint still restores
  assert loaded.step == 6


def test_missing_checkpoint_errors(tmp_path):
  with pytest.raises(ckpt_lib.CheckpointError, match="No checkpoint directory"):
    ckpt_lib.Checkpointer(str(tmp_path / "nope"), read_only=True)
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ckpt_lib.CheckpointError, match="No complete checkpoint"):
    ckpt_lib.Checkpointer(str(tmp_path / "empty"), read_only=True).read_meta()


def test_checkpoint_is_self_describing(uninterrupted):
  _, result = uninterrupted
  meta = ckpt_lib.Checkpointer(result.checkpoint_dir, read_only=True).read_meta()
  assert meta["step"] == 8
  assert meta["config"]["model"]["vocab_size"] == 512
  json.dumps(meta["data_state"])  # the data position is plain JSON
  # Which attention ran and why (issue 12), in the run plan's record (issue 23): auto on CPU is XLA.
  assert meta["plan"]["platform"] == "cpu"
  assert meta["plan"]["attention"]["whole sequence"] == {
      "requested": "auto", "implementation": "xla", "reason": "no fused attention kernel on cpu; XLA",
      "length_multiple": 1}


def test_one_rule_for_what_a_checkpoint_fixes(uninterrupted, data_dir, tmp_path):
  # launch/run/restore.py FIXED: a resume may change how a step computes (remat), not how the weights
  # are stored; a new run started from the checkpoint restores the parameters in its own param_dtype.
  workdir, result = uninterrupted
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  with pytest.raises(ValueError, match=r"model.param_dtype='bfloat16', saved 'float32'.*"
                                       r"--config.model.param_dtype=float32"):
    train(smoke_config(data_dir, model__param_dtype="bfloat16", train__steps=10), copy, resume=True)
  resumed = train(smoke_config(data_dir, model__remat="full", train__steps=10), copy, resume=True)
  assert resumed.final_step == 10 and np.isfinite(resumed.train_loss)

  from launch.run.plan import make_plan
  from launch.run.restore import init_from_checkpoint, restore_params
  plan = make_plan(smoke_config(data_dir, model__param_dtype="bfloat16"))
  state = init_from_checkpoint(plan, result.checkpoint_dir)
  saved = make_plan(smoke_config(data_dir))
  params, _ = restore_params(result.checkpoint_dir, saved.mdef, saved.shardings.params)
  got, want = jax.tree.leaves(state.params), jax.tree.leaves(params)
  assert {x.dtype for x in got} == {np.dtype("bfloat16")} and {x.dtype for x in want} == {np.dtype("float32")}
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w.astype("bfloat16")))
  with pytest.raises(ValueError, match="model.num_layers"):
    init_from_checkpoint(make_plan(smoke_config(data_dir, model__num_layers=1)), result.checkpoint_dir)
