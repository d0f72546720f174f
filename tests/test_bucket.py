"""Runs that live in a bucket: gs:// workdirs against a real GCS emulator (fake-gcs-server, tests/conftest.py).

One run in a module fixture (stopped at step 4, resumed to 8: three flush periods and a restart) is
checked by several tests; the others add a SIGKILL during a save, the lock, a missing bucket, reading
the bucket back (eval, generate, Hugging Face conversion) and a 2-process run.
"""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from configs.smoke import get_config
from launch.run import checkpoint as ckpt_lib
from launch.run import paths
from launch.run.config import validate, with_overrides
from launch.run.errors import WorkdirLocked
from launch.run.logger import read_metrics
from launch.run.loop import train
from launch.run.preemption import StopRequest
from launch.run.workdir_lock import WorkdirLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "shardlm-test"
STEPS = 8


@pytest.fixture(scope="module")
def bucket(gcs):
  gcs.create_bucket(BUCKET)
  return f"gs://{BUCKET}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def smoke_config(data_dir, **overrides):
  c = get_config()
  c.data.data_dir = data_dir
  c.train.steps = STEPS
  c.train.log_every = 1
  c.train.eval_batches = 1
  c.train.tensorboard = True
  c.checkpoint.save_every = 2
  c.checkpoint.keep = 3
  return validate(with_overrides(c, {k.replace("__", "."): v for k, v in overrides.items()}))


def losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def run(bucket, data_dir, tmp_path_factory, monkeypatch_module):
  """A run in the bucket stopped after step 4 (two saves, each a flush period) and resumed to step 8."""
  monkeypatch_module.chdir(tmp_path_factory.mktemp("cwd"))  # where a stray local "gs:" would appear
  workdir = f"{bucket}/runs/smoke"
  cfg = smoke_config(data_dir)
  stop = StopRequest()
  first = train(cfg, workdir, stop=stop, on_step=lambda s: s == 4 and stop.request("test"))
  assert first.stopped_early and first.final_step == 4
  second = train(cfg, workdir, resume=True)
  return workdir, second


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    yield mp


def test_run_in_bucket_keeps_committed_steps_and_writes_nothing_local(run):
  workdir, result = run
  assert result.final_step == STEPS and np.isfinite(result.val_loss)
  assert result.checkpoint_dir == f"{workdir}/checkpoints"
  assert ckpt_lib.Checkpointer(result.checkpoint_dir, read_only=True).steps() == [4, 6, 8]  # keep=3
  step_dirs = [n for n in paths.listdir(result.checkpoint_dir) if n.isdigit()]
  assert sorted(step_dirs, key=int) == ["4", "6", "8"]  # older steps deleted whole, none half-left
  for step in step_dirs:
    assert paths.exists(f"{result.checkpoint_dir}/{step}/{ckpt_lib.COMMIT}")
  assert paths.isfile(f"{workdir}/loss_curve.png")
  assert not paths.exists(f"{workdir}/run.lock")  # released at exit
  assert not os.path.exists("gs:") and not os.path.exists(os.path.join(REPO, "gs:"))


def _event_scalars(data: bytes) -> list[tuple[str, int]]:
  """(tag, step) of every scalar in one TensorBoard event file (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2
  found, offset = [], 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4
    found.extend((v.tag, event.step) for v in event.summary.value)
  return found


def test_metrics_and_tensorboard_keep_every_record_across_flushes_and_a_restart(run):
  workdir, _ = run
  chunks = paths.listdir(f"{workdir}/metrics")
  assert len(chunks) >= 4, chunks  # saves at 2 and 4, the stop, the restart's saves and its exit
  assert sorted(losses(workdir)) == list(range(1, STEPS + 1))
  assert [r["step"] for r in read_metrics(workdir) if "val_loss" in r] == [STEPS]
  events = paths.listdir(f"{workdir}/tensorboard")
  assert len(events) >= 4, events
  scalars = [s for name in events for s in _event_scalars(paths.read_bytes(f"{workdir}/tensorboard/{name}"))]
  assert sorted(step for tag, step in scalars if tag == "loss") == list(range(1, STEPS + 1))
  assert [step for tag, step in scalars if tag == "val_loss"] == [STEPS]


def _train_process(data_dir, workdir, *extra):
  cmd = [sys.executable, "-m", "launch.train", "--config", os.path.join(REPO, "configs/smoke.py"),
         f"--config.data.data_dir={data_dir}", f"--workdir={workdir}", f"--config.train.steps={STEPS}",
         "--config.train.log_every=1", "--config.train.eval_batches=1", *extra]
  env = {**os.environ, "PYTHONPATH": REPO}
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_resume_after_sigkill_during_a_save_is_bitwise_equal(run, data_dir):
  reference_dir, _ = run
  workdir = f"gs://{BUCKET}/runs/killed"
  ckpt_dir = f"{workdir}/checkpoints"
  proc = _train_process(data_dir, workdir, "--config.checkpoint.save_every=1", "--config.checkpoint.keep=2",
                        "--config.train.tensorboard=False")
  from launch.run import bucket as bucket_lib
  storage = bucket_lib.client().bucket(BUCKET)
  partial, deadline = [], time.time() + 120
  while time.time() < deadline and proc.poll() is None and not partial:  # a save in progress, after one
    names = [b.name.split("/") for b in storage.list_blobs(prefix="runs/killed/checkpoints/")]
    steps = {n[3] for n in names if n[3].isdigit()}
    done = {n[3] for n in names if n[3].isdigit() and n[4:] == [ckpt_lib.COMMIT]}
    partial = sorted(steps - done) if done else []
  proc.send_signal(signal.SIGKILL)
  output, _ = proc.communicate(timeout=30)
  assert partial, f"never observed a save in progress:\n{output[-3000:]}"
  good = ckpt_lib.Checkpointer(ckpt_dir, read_only=True).steps()
  assert good and str(good[-1]) not in partial
  assert paths.exists(f"{workdir}/run.lock")  # the killed run's lock, taken over below (dead pid here)
  resumed = train(smoke_config(data_dir, checkpoint__save_every=1, checkpoint__keep=2), workdir, resume=True)
  assert resumed.final_step == STEPS
  reference, again = losses(reference_dir), losses(workdir)
  for step in range(good[-1] + 1, STEPS + 1):
    assert again[step] == reference[step], step  # bitwise: same data position, same state
  assert resumed.val_loss == run[1].val_loss


def test_second_run_on_a_locked_bucket_workdir_is_refused_naming_the_holder(bucket):
  from launch.run import bucket as bucket_lib
  url = f"{bucket}/runs/locked/run.lock"
  blob = bucket_lib.client().bucket(BUCKET).blob("runs/locked/run.lock")
  blob.upload_from_string(json.dumps({"host": "other-host", "pid": 4242, "since": time.time(),
                                      "heartbeat": time.time()}))
  with pytest.raises(WorkdirLocked, match="pid 4242 on host other-host"):
    WorkdirLock(f"{bucket}/runs/locked").acquire()
  blob.delete()
  with WorkdirLock(f"{bucket}/runs/locked"):
    holder = json.loads(paths.read_text(url))
    assert holder["pid"] == os.getpid() and holder["heartbeat"] >= holder["since"]
    with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()}"):
      WorkdirLock(f"{bucket}/runs/locked").acquire()
  assert not paths.exists(url)


def test_missing_bucket_is_one_error_line_within_30s_and_writes_nothing(gcs, tmp_path):
  started = time.time()
  proc = subprocess.run([sys.executable, "-m", "launch.train", "--config", os.path.join(REPO, "configs/smoke.py"),
                         "--workdir=gs://no-such-bucket-shardlm/runs/x"], cwd=tmp_path,
                        env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=60)
  elapsed = time.time() - started
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith("error: bucket gs://no-such-bucket-shardlm does not exist"), proc.stderr[-3000:]
  assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in proc.stderr
  assert elapsed < 30, elapsed
  assert os.listdir(tmp_path) == []  # no local "gs:" directory, nothing else


def test_eval_and_generate_read_the_bucket(run):
  from launch.run.evaluation import eval_checkpoint
  from launch.run.restore import load_checkpoint
  workdir, result = run
  scores = eval_checkpoint(result.checkpoint_dir, eval_batches=1)
  assert scores["step"] == STEPS and scores["val_loss"] == result.val_loss
  texts = load_checkpoint(result.checkpoint_dir).generate(["ROMEO:"], max_new_tokens=4, temperature=0.0)
  assert len(texts) == 1 and texts[0].startswith("ROMEO:")


def test_hugging_face_checkpoint_converts_into_and_out_of_the_bucket(bucket, tmp_path):
  import jax
  from launch.huggingface import convert
  from launch.run import state as ts
  from lm.config import ModelConfig
  fixture = os.path.join(REPO, "tests", "fixtures", "hf_qwen2")
  hf_url, converted, exported = (f"{bucket}/hf/{n}" for n in ("source", "converted", "exported"))
  for name in os.listdir(fixture):
    with open(os.path.join(fixture, name), "rb") as f:
      paths.write_bytes(f"{hf_url}/{name}", f.read())
  saved = convert.import_hf(hf_url, converted)
  assert saved["data"]["tokenizer_path"] == f"{converted}/tokenizer/tokenizer.json"
  files = convert.export_hf(converted, exported)
  assert "model.safetensors" in files and "tokenizer.json" in files and paths.isfile(f"{exported}/config.json")
  assert paths.read_bytes(f"{exported}/tokenizer.json") == paths.read_bytes(f"{hf_url}/tokenizer.json")
  again = convert.import_hf(exported, str(tmp_path / "local"))  # back from the bucket to a disk
  assert again["model"] == saved["model"]
  mdef = ts.model_def(ModelConfig(**saved["model"]))
  restored = []
  for directory in (converted, str(tmp_path / "local")):
    checkpointer = ckpt_lib.Checkpointer(directory, read_only=True)
    restored.append(checkpointer.restore_params(mdef.abstract_params)[0])
    checkpointer.close()
  for a, b in zip(jax.tree.leaves(restored[0]), jax.tree.leaves(restored[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_two_processes_write_the_bucket_and_resume_from_it(bucket, data_dir, run):
  from launch.run.processes import run_local
  del run  # its data_dir is prepared
  workdir = f"{bucket}/runs/two"
  overrides = {"train.log_every": 1, "train.eval_batches": 1, "data.process_sharding": "rows",
               "data.data_dir": data_dir, "checkpoint.save_every": 2, "train.tensorboard": False}

  def two_processes(*extra):
    output = []
    code = run_local(["--config", os.path.join(REPO, "configs/smoke.py"), f"--workdir={workdir}",
                      *[f"--config.{k}={v}" for k, v in overrides.items()], *extra],
                     num_processes=2, cpu_devices=4, hang_timeout=240, echo=output.append)
    assert code == 0, "\n".join(output[-40:])

  two_processes("--config.train.steps=2")
  assert sorted(losses(workdir)) == [1, 2]
  two_processes("--config.train.steps=3", "--resume")
  assert sorted(losses(workdir)) == [1, 2, 3]
  assert ckpt_lib.Checkpointer(f"{workdir}/checkpoints", read_only=True).steps() == [2, 3]
  assert not paths.exists(f"{workdir}/run.lock")


def test_data_inputs_in_the_bucket_are_read_from_a_local_copy(bucket, data_dir):
  import dataclasses
  import glob
  from launch.run import inputs
  texts = {"a.txt": "To be, or not to be.\n", "b.txt": "All the world's a stage.\n"}
  for name, text in texts.items():
    paths.write_text(f"{bucket}/corpus/{name}", text)
  paths.write_text(f"{bucket}/corpus/notes.md", "not matched")
  data = smoke_config(data_dir).data
  local = inputs.localize(dataclasses.replace(data, path=f"{bucket}/corpus/*.txt",
                                              validation_path=f"{bucket}/corpus/b.txt"))
  assert not paths.is_url(local.path) and not paths.is_url(local.validation_path)
  assert {os.path.basename(p): open(p).read() for p in glob.glob(local.path)} == texts
  assert open(local.validation_path).read() == texts["b.txt"]
  with pytest.raises(ValueError, match="matches no object"):
    inputs.localize(dataclasses.replace(data, path=f"{bucket}/corpus/*.parquet"))
  with pytest.raises(ValueError, match="must be local"):
    inputs.localize(dataclasses.replace(data, data_dir=f"{bucket}/data"))
