"""Nothing lost, nothing silent: the NaN guard, checksummed checkpoints, resume fallback, the workdir
lock, storage errors and one-line errors at every entry point (launch/run/{loop,checkpoint,checksum,
errors,cli}.py, launch/storage/workdir_lock.py)."""

import errno
import functools
import glob
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs.smoke import get_config
from launch.run import checkpoint as ckpt_lib
from launch.run import checksum, cli
from launch.run import state as ts
from launch.run.config import validate, with_overrides
from launch.run.errors import NonFiniteError, SaveError, WorkdirLocked
from launch.run.logger import read_metrics
from launch.run.loop import train
from launch.run.restore import load_checkpoint
from launch.run.step import train_step
from launch.storage.workdir_lock import LOCK_NAME, WorkdirLock
from launch.run.plan import make_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(data_dir, **overrides):
  c = get_config()
  c.data.data_dir = data_dir
  c.train.steps = 8
  c.train.log_every = 1
  c.train.eval_batches = 1
  c.train.tensorboard = False
  c.checkpoint.save_every = 2
  return validate(with_overrides(c, {k.replace("__", "."): v for k, v in overrides.items()}))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def good_run(data_dir, tmp_path_factory):
  """An 8-step smoke run with checkpoints 4, 6, 8 (keep=3); tests copy it before damaging anything."""
  workdir = str(tmp_path_factory.mktemp("good"))
  result = train(smoke_config(data_dir), workdir)
  return result.checkpoint_dir


def copy_checkpoints(good_run, tmp_path) -> str:
  target = str(tmp_path / "checkpoints")
  shutil.copytree(good_run, target)
  return target


def flip_byte(ckpt_dir: str, step: int, item: str = "params") -> None:
  """Flips one bit in the middle of the biggest data file of `item` at `step` (decodes, but wrongly)."""
  files = [f for f in glob.glob(os.path.join(ckpt_dir, str(step), item, "**", "d", "*"), recursive=True)]
  biggest = max(files, key=os.path.getsize)
  data = bytearray(open(biggest, "rb").read())
  data[len(data) // 2] ^= 0x40
  with open(biggest, "wb") as f:
    f.write(data)


def all_finite(ckpt_dir: str) -> bool:
  loaded = load_checkpoint(ckpt_dir)
  return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(loaded.params))


# ---- checksums -------------------------------------------------------------------------------------

def _numpy_checksum(x: np.ndarray) -> str:
  """The checksum of launch/run/checksum.py written again in NumPy (uint64 arithmetic, then mod 2^32)."""
  words = x.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[x.dtype.itemsize]).astype(np.uint64).ravel()
  def mix(w):
    w = w ^ (w >> 16)
    w = (w * 0x85EBCA6B) % 2**32
    w = w ^ (w >> 13)
    w = (w * 0xC2B2AE35) % 2**32
    return w ^ (w >> 16)
  index = np.arange(words.size, dtype=np.uint64)
  first = int(words.sum() % 2**32)
  second = int((mix(words) * ((2 * index + 1) % 2**32) % 2**32).sum() % 2**32)
  return f"{first:08x}{second:08x}"


def test_checksum_matches_numpy_and_ignores_sharding():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 24)).astype(np.float32)
  mesh = jax.make_mesh((8,), ("d",))
  tree = {"single": jnp.asarray(x), "sharded": jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, "d"))),
          "bf16": jnp.asarray(x, jnp.bfloat16), "int8": jnp.asarray((x * 10).astype(np.int8))}
  sums, nonfinite = checksum.fingerprints(tree)
  assert sums["['single']"] == [_numpy_checksum(x), "float32"]
  assert sums["['sharded']"] == sums["['single']"]            # the mesh does not change the value
  assert sums["['bf16']"][0] == _numpy_checksum(np.asarray(tree["bf16"]))
  assert sums["['int8']"][0] == _numpy_checksum((x * 10).astype(np.int8))
  assert nonfinite == []
  y = x.copy()
  y[3, 5], y[5, 3] = y[5, 3], y[3, 5]                        # a swap keeps the plain sum, not the weighted one
  y[0, 0] = np.nextafter(y[0, 0], np.float32(np.inf))        # and one ulp anywhere changes both
  changed, _ = checksum.fingerprints({"single": jnp.asarray(y), "nan": jnp.asarray(np.float32([1, np.nan]))})
  assert changed["['single']"][0] != sums["['single']"][0]
  assert checksum.fingerprints({"nan": jnp.asarray(np.float32([1, np.nan]))})[1] == ["['nan']"]


def test_flipped_byte_is_refused_naming_array_and_step(good_run, tmp_path):
  ckpt_dir = copy_checkpoints(good_run, tmp_path)
  flip_byte(ckpt_dir, 8)
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"step 8 in .*: params\['.*'\] does not match the checksum saved with it"):
    load_checkpoint(ckpt_dir)
  assert load_checkpoint(ckpt_dir, step=6).step == 6


def test_listing_offers_only_whole_steps(good_run, tmp_path):
  ckpt_dir = copy_checkpoints(good_run, tmp_path)
  assert os.listdir(os.path.join(ckpt_dir, ckpt_lib.DELETING)) == []   # old steps were renamed, then removed
  os.remove(os.path.join(ckpt_dir, "4", "opt_state", "_METADATA"))    # as a kill during rmtree leaves it
  shutil.rmtree(os.path.join(ckpt_dir, "6", "params"))
  assert ckpt_lib.Checkpointer(ckpt_dir, read_only=True).steps() == [8]


# ---- NaN guard -------------------------------------------------------------------------------------

def test_skip_step_keeps_state_and_flags_it():
  """train_step with skip_nonfinite: a NaN loss leaves params and optimizer state bit-identical."""
  cfg = smoke_config("unused")
  mdef = make_plan(cfg).mdef
  from launch.run.optimizer import learning_rate_schedule, make_optimizer
  tx, schedule = make_optimizer(cfg.train), learning_rate_schedule(cfg.train)
  state = ts._fresh(ts.init_params(mdef, jax.random.key(0)), tx).replace(step=jnp.int32(5))
  batch = {"inputs": jnp.ones((2, 8), jnp.int32), "targets": jnp.ones((2, 8), jnp.int32)}
  def loss_fn(params, b, scale):  # the cross-entropy times `scale` (NaN makes the step non-finite)
    from launch.run.step import _loss
    loss, (loss_sum, tokens) = _loss(params, b, mdef)
    return loss * scale, (loss_sum * scale, tokens)
  step = jax.jit(functools.partial(train_step, mdef=mdef, tx=tx, schedule=schedule, accum_steps=1,
                                   loss_fn=loss_fn, skip_nonfinite=True))
  bad, bad_metrics = step(state, batch, jnp.float32(np.nan))
  assert float(bad_metrics["nonfinite"]) == 1.0 and int(bad.step) == 6
  for before, after in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((bad.params, bad.opt_state))):
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
  good, good_metrics = step(state, batch, jnp.float32(1.0))
  assert float(good_metrics["nonfinite"]) == 0.0
  moments = lambda s: np.concatenate([np.ravel(x) for x in jax.tree.leaves(s.opt_state) if x.ndim])
  assert not np.array_equal(moments(good), moments(state))  # the same step with a finite loss does update


@pytest.mark.parametrize("policy", ["stop", "skip_step"])
def test_divergence_stops_without_saving_it(data_dir, tmp_path, good_run, policy):
  del good_run  # only so the data is prepared
  cfg = smoke_config(data_dir, train__learning_rate=1e4, train__steps=16, train__nonfinite=policy,
                     train__nonfinite_skip_limit=2)
  with pytest.raises(NonFiniteError) as caught:
    train(cfg, str(tmp_path))
  message = str(caught.value)
  bad_step = int(message.split(":")[0].removeprefix("step "))
  assert "loss=" in message and "grad_norm=" in message and "Last good checkpoint: step" in message
  if policy == "skip_step":
    assert "2 non-finite steps in a row" in message
    skipped = [r["skipped_steps"] for r in read_metrics(str(tmp_path)) if "skipped_steps" in r]
    assert skipped and skipped[-1] >= 1
  ckpt_dir = str(tmp_path / "checkpoints")
  saved = ckpt_lib.Checkpointer(ckpt_dir, read_only=True).steps()
  assert saved and max(saved) < bad_step and f"step {max(saved)} in {ckpt_dir}" in message
  assert all_finite(ckpt_dir)
  assert not os.path.exists(tmp_path / LOCK_NAME)  # released on the way out


# ---- resume fallback ---------------------------------------------------------------------------------

def test_resume_falls_back_to_newest_readable_step(good_run, data_dir, tmp_path, capsys):
  ckpt_dir = copy_checkpoints(good_run, tmp_path)
  flip_byte(ckpt_dir, 8, "opt_state")
  strict = smoke_config(data_dir, train__steps=10, train__resume_fallback=False)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"No checkpoint for step 5 .* available: \[4, 6, 8\]"):
    train(strict, str(tmp_path), resume_step=5)  # launch.train --step 5
  # The flipped byte lands in a zstd-compressed chunk or a raw one, depending on the order the async
  # save wrote the arrays into the OCDBT file: either refusal names step 8's opt_state (the checksum
  # message itself is checked by test_flipped_byte_is_refused_naming_array_and_step).
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"opt_state.* does not match the checksum|step 8 .* is corrupt .*opt_state"):
    train(strict, str(tmp_path), resume=True)
  result = train(smoke_config(data_dir, train__steps=10), str(tmp_path), resume=True)
  out = capsys.readouterr().out
  assert "step 8 is unreadable" in out and "continuing from step 6" in out
  assert result.final_step == 10
  assert os.path.isdir(ckpt_dir + ".set_aside/8")  # moved, not deleted
  assert ckpt_lib.Checkpointer(ckpt_dir, read_only=True).steps() == [6, 8, 10]
  assert load_checkpoint(ckpt_dir, step=8).step == 8  # step 8 was trained again and is whole


# ---- storage errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("async_save", [True, False])
def test_disk_full_while_saving_names_step_and_keeps_older(tmp_path, monkeypatch, async_save):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler
  state = ts.TrainState(step=jnp.int32(0), params={"w": jnp.ones((4, 4))}, opt_state=(jnp.zeros(4),))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=3, async_save=async_save)
  checkpointer.save(1, state, {})

  async def full_disk(self, item, directory):  # the meta writer, called in orbax's commit thread
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_disk)
  with pytest.raises(SaveError) as caught:
    checkpointer.save(2, state, {})
    checkpointer.close()
  assert str(caught.value).startswith(f"could not save step 2 to {tmp_path}: no space left on device; "
                                      "checkpoints [1] are intact")
  assert cli.exit_status(caught.value) == cli.RUN_EXIT
  monkeypatch.undo()
  assert ckpt_lib.Checkpointer(str(tmp_path), read_only=True).steps() == [1]


# ---- the workdir lock ---------------------------------------------------------------------------------

def test_stale_lock_is_taken_over(tmp_path, capsys):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  with open(tmp_path / LOCK_NAME, "w") as f:
    f.write(f'{{"host": "{socket.gethostname()}", "pid": {dead.pid}}}')
  with WorkdirLock(str(tmp_path)):
    assert f"left by pid {dead.pid}" in capsys.readouterr().out
    with pytest.raises(WorkdirLocked, match=f"in use by pid {os.getpid()} on host"):
      WorkdirLock(str(tmp_path)).acquire()  # a live holder (this process) is never taken over
  assert not os.path.exists(tmp_path / LOCK_NAME)


# ---- one line per error, at every entry point -------------------------------------------------------------

def test_entry_points_print_one_error_line(good_run, data_dir, tmp_path):
  """Typical user errors of each command: stderr starts with `error:`, holds no traceback, exit != 0.

  The commands run in parallel; each stops before compiling anything. A second run on a workdir
  held by this process (the lock) is one of them.
  """
  corrupt = copy_checkpoints(good_run, tmp_path)
  flip_byte(corrupt, 8)
  locked, bad_mesh = tmp_path / "locked", tmp_path / "bad_mesh"
  smoke = ["--config", "configs/smoke.py", f"--config.data.data_dir={data_dir}"]
  cases = {
      "unknown key": (["launch.train", *smoke, "--config.train.lerning_rate=1", "--workdir=/nonexistent"],
                      2, "Did you mean --config.train.learning_rate?"),
      "bad mesh": (["launch.train", *smoke, "--config.mesh.data=3", f"--workdir={bad_mesh}"], 2, "mesh"),
      "workdir in use": (["launch.train", *smoke, f"--workdir={locked}"], 1, f"in use by pid {os.getpid()}"),
      "unknown flag": (["launch.eval", "--checkpoint_dri=x"], 2, "Unknown command line flag"),
      "corrupt checkpoint": (["launch.eval", f"--checkpoint_dir={corrupt}"], 2, "does not match the checksum"),
      "missing step": (["launch.generate", f"--checkpoint_dir={good_run}", "--step=3"], 2, "No checkpoint for step 3"),
      "missing checkpoint": (["launch.quantize", f"--checkpoint_dir={tmp_path}/none", f"--out_dir={tmp_path}/q"],
                             2, "No checkpoint directory"),
      "missing flag": (["launch.convert", f"--to-hf={good_run}"], 2, "--out"),
  }
  with WorkdirLock(str(locked)):
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    env.pop("SHARDLM_TRACEBACK", None)
    procs = {name: subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, (args, _, _) in cases.items()}
    outputs = {name: proc.communicate(timeout=300) for name, proc in procs.items()}
  for name, (_, status, words) in cases.items():
    _, stderr = outputs[name]
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(("WARNING", "W0", "I0"))]
    assert lines and lines[0].startswith("error: "), (name, stderr)
    assert "Traceback" not in stderr, (name, stderr)
    assert words in lines[0], (name, lines[0])
    assert procs[name].returncode == status, (name, procs[name].returncode, stderr)
  assert not os.path.exists(bad_mesh)  # refused before anything was written
