"""Runs that live in a bucket: gs:// workdirs against a real GCS emulator (fake-gcs-server, tests/conftest.py).

One run in a module fixture (stopped at step 4, resumed to 8: three flush periods and a restart) is
checked by several tests, and is the init_checkpoint and distillation teacher others read from the
bucket; the rest add a SIGKILL during a save, the lock and its stale rule, a missing, unreachable,
forbidden or credential-less bucket, reading the bucket back (eval, generate, Hugging Face conversion),
a sweep writing its results there, a 2-process run, and a data.data_dir in the bucket (published once,
downloaded by a second host, never read without its marker).
"""

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

import gcs_emulator
from configs.smoke import get_config
from launch.run import checkpoint as ckpt_lib
from launch.run.config import validate, with_overrides
from launch.run.errors import WorkdirLocked
from launch.run.logger import read_metrics
from launch.run.loop import train
from launch.run.preemption import StopRequest
from launch.storage import paths
from launch.storage.workdir_lock import WorkdirLock
from lm.model_def import for_shapes

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
  from launch.storage import bucket as bucket_lib
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
  from launch.storage import bucket as bucket_lib
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


def _train_fails_fast(tmp_path, workdir, env):
  """Runs launch.train on `workdir` with `env`; checks it stops with exit 2, one `error:` line, no
  traceback, within 30 s, having compiled nothing (the compilation cache stays empty) and written
  nothing locally. Returns the error line."""
  cache = f"{tmp_path}-jax-cache"  # every compile would leave an entry here
  env = {**env, "PYTHONPATH": REPO, "JAX_COMPILATION_CACHE_DIR": cache,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  started = time.time()
  proc = subprocess.run([sys.executable, "-m", "launch.train", "--config", os.path.join(REPO, "configs/smoke.py"),
                         f"--workdir={workdir}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
  elapsed = time.time() - started
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert elapsed < 30, elapsed
  assert not os.path.exists(cache) or not os.listdir(cache)  # nothing compiled
  assert os.listdir(tmp_path) == []  # no local "gs:" directory, nothing else
  return lines[-1]


def test_missing_bucket_is_one_error_line_within_30s_and_writes_nothing(gcs, tmp_path):
  line = _train_fails_fast(tmp_path, "gs://no-such-bucket-shardlm/runs/x", dict(os.environ))
  assert line.startswith("error: bucket gs://no-such-bucket-shardlm does not exist"), line


@pytest.mark.parametrize("kind, says", [("refused", "cannot reach bucket"), ("silent", "cannot reach bucket"),
                                        ("denied", "no permission to write to bucket")])
def test_unreachable_or_forbidden_bucket_is_one_error_line_within_30s(kind, says, tmp_path):
  """refused: nothing listens; silent: a server that never answers (the probe's 15 s timeout ends it);
  denied: GCS's own 403 body for an account without storage.objects.create (the emulator has no IAM)."""
  with gcs_emulator.failing_endpoint(kind) as url:
    line = _train_fails_fast(tmp_path, f"gs://{BUCKET}/runs/x", {**os.environ, "STORAGE_EMULATOR_HOST": url})
  assert line.startswith(f"error: {says} gs://{BUCKET} (for gs://{BUCKET}/runs/x)"), line
  if kind == "denied":
    assert "does not have storage.objects.create access" in line and "Storage Object Admin" in line, line


def test_no_credentials_is_one_error_line_naming_the_bucket(tmp_path):
  """Outside the emulator with no Application Default Credentials: no key file, an empty gcloud
  config, and no metadata server (its address points at a closed port, as off Google Cloud)."""
  home = tmp_path.parent / f"{tmp_path.name}-home"
  home.mkdir()
  closed = f"127.0.0.1:{gcs_emulator._free_port()}"
  env = {k: v for k, v in os.environ.items() if k not in (
      "STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "TENSORSTORE_GCS_HTTP_URL",
      "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GOOGLE_CLOUD_PROJECT")}
  env.update(HOME=str(home), CLOUDSDK_CONFIG=str(home / "gcloud"), GCE_METADATA_HOST=closed, GCE_METADATA_IP=closed)
  line = _train_fails_fast(tmp_path, f"gs://{BUCKET}/runs/x", env)
  assert line.startswith(f"error: no Google Cloud credentials for bucket gs://{BUCKET} (for gs://{BUCKET}/runs/x): "
                         "run `gcloud auth application-default login`"), line


def test_a_lock_silent_past_the_stale_threshold_is_taken_over_and_a_beating_one_is_kept(bucket, monkeypatch):
  """bucket_lock.py's rule at a 2 s threshold instead of 300 s: the lock object's age is its last write
  on the server's clock; a heartbeat (here every 0.5 s) keeps a live holder's lock fresh."""
  from launch.storage import bucket as bucket_lib
  from launch.storage import bucket_lock
  monkeypatch.setattr(bucket_lock, "STALE_S", 2.0)
  monkeypatch.setattr(bucket_lock, "HEARTBEAT_S", 0.5)
  url = f"{bucket}/runs/stale/run.lock"
  blob = bucket_lib.client().bucket(BUCKET).blob("runs/stale/run.lock")
  blob.upload_from_string(json.dumps({"host": "gone-host", "pid": 4242, "since": 0, "heartbeat": 0}))
  with pytest.raises(WorkdirLocked, match="pid 4242 on host gone-host"):  # written just now: fresh
    bucket_lock.BucketLock(url).acquire_here()
  time.sleep(2.5)
  taker = bucket_lock.BucketLock(url)
  note = taker.acquire_here()
  assert note and note.startswith(f"note: took over the lock {url} left by pid 4242 on gone-host, silent for"), note
  assert json.loads(paths.read_text(url))["pid"] == os.getpid()
  time.sleep(2.5)  # longer than the threshold, but the taker's heartbeat kept writing
  with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()} on host"):
    bucket_lock.BucketLock(url).acquire_here()
  taker.release()
  assert not paths.exists(url)


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
  mdef = ts.model_def(for_shapes(ModelConfig(**saved["model"])))
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


def _train_printing(cfg, workdir):
  """train(cfg, workdir) and what it printed (its one-line notes)."""
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    result = train(cfg, workdir)
  return result, printed.getvalue()


@pytest.fixture(scope="module")
def data_in_bucket(bucket, tmp_path_factory):
  """A 2-step run whose data.data_dir is gs://.../data (nothing published there yet), run from an empty
  directory where a stray local "gs:" would appear. Returns (data_dir URL, workdir, result, printed)."""
  url, workdir = f"{bucket}/data", str(tmp_path_factory.mktemp("run-data-in-bucket"))
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(tmp_path_factory.mktemp("cwd-data"))
    result, printed = _train_printing(smoke_config(url, train__steps=2, train__tensorboard=False), workdir)
    assert os.listdir(".") == []
  return url, workdir, result, printed


def test_data_dir_in_the_bucket_is_prepared_here_then_published_marker_last(data_in_bucket):
  from launch.run.restore import read_saved_config
  from launch.storage import published_corpus
  url, _, result, printed = data_in_bucket
  assert result.final_step == 2 and math.isfinite(result.val_loss)
  assert f"data: published the corpus prepared in {paths.cache_path(url)} to {url}" in printed, printed
  marker = json.loads(paths.read_text(f"{url}/{published_corpus.MARKER}"))
  listed = marker["files"]
  assert "tokenizer_sp512.model" in listed and any(r.startswith("shakespeare/1.0.0/") for r in listed), listed
  assert sorted(listed) == sorted(paths.files_under(paths.cache_path(url)))  # all that was prepared
  for rel, info in listed.items():
    data = paths.read_bytes(f"{url}/{rel}")
    assert len(data) == info["bytes"] and hashlib.sha256(data).hexdigest() == info["sha256"], rel
  assert read_saved_config(result.checkpoint_dir)[0].data.data_dir == url  # the saved config keeps the URL
  assert not os.path.exists(os.path.join(REPO, "gs:"))


def test_a_second_host_downloads_the_published_corpus_instead_of_preparing_it(data_in_bucket, tmp_path, monkeypatch):
  """A fresh cache (another host): the corpus comes from the bucket; the cache's record of what was
  downloaded (sizes, mtimes) still matches after the run, so nothing was prepared (no tokenizer trained,
  no shard written) over the download, and nothing was published again. Evaluating the checkpoint
  (launch.eval) reads the same copy."""
  from launch.storage import published_corpus
  url, first_workdir, first, _ = data_in_bucket
  monkeypatch.setenv("SHARDLM_GCS_CACHE", str(tmp_path / "other-host-cache"))
  local = paths.cache_path(url)
  assert local.startswith(str(tmp_path)) and not os.path.exists(local)
  result, printed = _train_printing(smoke_config(url, train__steps=2, train__tensorboard=False),
                                    str(tmp_path / "run"))
  assert f"data: downloaded the prepared corpus published at {url}" in printed, printed
  assert "published the corpus" not in printed, printed
  record = json.loads(open(f"{local}.published.json").read())
  assert record["files"] == published_corpus._local_stats(local)  # untouched since the download
  marker = json.loads(paths.read_text(f"{url}/{published_corpus.MARKER}"))
  assert sorted(record["files"]) == sorted(marker["files"]) and record["content_sha256"] == marker["content_sha256"]
  assert losses(str(tmp_path / "run")) == losses(first_workdir)  # the same batches: equal bitwise
  assert result.val_loss == first.val_loss
  from launch.run.evaluation import eval_checkpoint  # launch.eval reads the same local copy
  scores = eval_checkpoint(result.checkpoint_dir, eval_batches=1)
  assert scores["val_loss"] == result.val_loss and math.isfinite(scores["unigram_perplexity"])


def test_a_data_dir_in_the_bucket_without_the_marker_is_never_read(bucket, tmp_path, monkeypatch):
  """Objects under a gs:// data_dir with no marker (a half-finished upload): the corpus is prepared
  locally, as for an empty prefix, and published over them, marker last."""
  from launch.run import inputs
  from launch.storage import published_corpus
  url = f"{bucket}/half-uploaded"
  paths.write_bytes(f"{url}/tokenizer_sp512.model", b"not a sentencepiece model")
  paths.write_text(f"{url}/shakespeare/1.0.0/dataset_info.json", "{")
  monkeypatch.setenv("SHARDLM_GCS_CACHE", str(tmp_path / "cache"))
  data = smoke_config(url).data
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    tokenizer = inputs.prepare(data, 512)
  assert tokenizer.decode(tokenizer.encode("ROMEO: hello")) == "ROMEO: hello"
  assert "data: published the corpus prepared in" in printed.getvalue(), printed.getvalue()
  local = inputs.local_data(data).data_dir
  assert local == paths.cache_path(url) and local.startswith(str(tmp_path))
  listed = json.loads(paths.read_text(f"{url}/{published_corpus.MARKER}"))["files"]
  for rel in ("tokenizer_sp512.model", "shakespeare/1.0.0/dataset_info.json"):
    with open(os.path.join(local, *rel.split("/")), "rb") as f:
      assert paths.read_bytes(f"{url}/{rel}") == f.read() and rel in listed, rel


def test_a_run_starts_from_an_init_checkpoint_in_the_bucket(run, bucket, data_dir):
  source, result = run
  workdir = f"{bucket}/runs/finetuned"
  tuned = train(smoke_config(data_dir, train__steps=1, train__tensorboard=False,
                             train__init_checkpoint=result.checkpoint_dir), workdir)
  assert tuned.final_step == 1
  first, fresh = losses(workdir)[1], losses(source)[1]
  # The same first batch as the source run's step 1, read with its 8 trained steps instead of a fresh init.
  assert first < fresh - 0.2, (first, fresh, losses(source))


def test_distillation_reads_its_teacher_from_the_bucket(run, data_dir, tmp_path):
  from compress.distill_run import distill, load_teacher
  from launch.run.plan import make_plan
  _, result = run
  cfg = smoke_config(data_dir, train__steps=1, train__tensorboard=False, model__num_layers=1,
                     model__d_model=32, model__num_heads=2, model__num_kv_heads=2, model__mlp_dim=64,
                     distill__teacher_checkpoint=result.checkpoint_dir, distill__alpha=1.0)
  teacher = load_teacher(cfg, make_plan(cfg))
  assert teacher.step == STEPS and teacher.mdef.cfg.num_layers == 2  # the run's, not the student's
  student = distill(cfg, str(tmp_path / "student"))
  assert student.final_step == 1 and math.isfinite(student.val_loss)


def test_sweep_writes_its_tables_points_and_plots_into_the_bucket(bucket, tmp_path):
  """`launch.sweep --out gs://...`: one compiled point and one invalid one (tensor8 cannot split the
  smoke model's heads), compile-only; then a rerun reads the recorded points back from the bucket."""
  from launch.measure import sweep
  out = f"{bucket}/sweeps/smoke"
  config = os.path.join(REPO, "configs/smoke.py")
  proc = subprocess.run([sys.executable, "-m", "launch.sweep", "--config", config, "--grid", "mesh=data8,tensor8",
                         "--out", out, "--compile_only"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO},
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  rows = list(csv.DictReader(io.StringIO(paths.read_text(f"{out}/results.csv"))))
  assert [(r["mesh"], r["status"]) for r in rows] == [("data8", "ok"), ("tensor8", "invalid")]
  assert int(rows[0]["peak_bytes"]) > 0 and rows[0]["mode"] == "compile"
  markdown = paths.read_text(f"{out}/results.md")
  assert "| data8 | ok | dp |" in markdown and "| tensor8 | invalid |" in markdown
  assert paths.read_bytes(f"{out}/memory.png").startswith(b"\x89PNG")
  assert paths.listdir(f"{out}/points") == ["mesh-data8.json", "mesh-data8.log", "mesh-tensor8.json",
                                            "mesh-tensor8.log"]
  assert "launch.sweep_point" in paths.read_text(f"{out}/points/mesh-data8.log")
  assert os.listdir(tmp_path) == []  # no local "gs:" directory
  lines = []
  again = sweep.run_sweep(config, "mesh=data8,tensor8", out, compile_only=True, echo=lines.append)
  assert [r["status"] for r in again] == ["ok", "invalid"]
  assert sum("recorded earlier" in line for line in lines) == 2, lines


def test_result_tables_and_the_reproduce_summary_read_and_write_the_bucket(bucket):
  from launch.measure.tables import write_table
  from launch.reproduce import summary
  committed, regenerated = f"{bucket}/results/committed", f"{bucket}/results/regenerated"
  for root, loss in ((committed, 2.0), (regenerated, 2.5)):
    write_table([{"variant": "a", "val_loss": loss}], f"{root}/sub", "table", "A table", "cmd")
  assert paths.read_text(f"{committed}/sub/table.csv").splitlines() == ["variant,val_loss", "a,2.0"]
  cells = summary.compare_dirs(committed, regenerated)
  assert [(c.file, c.column, c.committed, c.regenerated) for c in cells] == [("sub/table.md", "val_loss", 2.0, 2.5)]
