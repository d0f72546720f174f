"""Multi-host code paths with 2 local processes x 4 CPU devices (gloo collectives), against 1 x 8."""

import os
import subprocess
import threading
import time

import pytest

from configs.smoke import get_config
from launch.run.config import validate, with_overrides
from launch.run.evaluation import eval_checkpoint
from launch.run.processes import run_local
from launch.run.logger import read_metrics
from launch.run.loop import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"train.steps": 3, "train.log_every": 1, "train.eval_batches": 1, "train.tensorboard": False,
             "data.process_sharding": "rows"}


def _args(data_dir, workdir, **extra):
  items = {**OVERRIDES, "data.data_dir": data_dir, **extra}
  return ["--config", os.path.join(REPO, "configs/smoke.py"), f"--workdir={workdir}",
          *[f"--config.{k}={v}" for k, v in items.items()]]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(data_dir, tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  single = train(validate(with_overrides(get_config(), {**OVERRIDES, "data.data_dir": data_dir})),
                 str(tmp_path / "one"))  # 1 process x 8 devices (tests/conftest.py)

  output = []
  code = run_local(_args(data_dir, tmp_path / "two"), num_processes=2, cpu_devices=4,
                   hang_timeout=240, echo=output.append)
  assert code == 0, "\n".join(output[-40:])
  one, two = _losses(str(tmp_path / "one")), _losses(str(tmp_path / "two"))
  assert sorted(two) == [1, 2, 3]
  for step in (1, 2, 3):
    assert two[step] == pytest.approx(one[step], rel=1e-5)

  # The checkpoint two processes wrote restores here, in one process with 8 devices.
  restored = eval_checkpoint(str(tmp_path / "two" / "checkpoints"), eval_batches=1)
  assert restored["step"] == 3
  assert restored["val_loss"] == pytest.approx(single.val_loss, rel=1e-5)


def test_a_killed_process_stops_the_others_with_a_clear_error(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  output, result = [], {}
  args = _args(data_dir, workdir, **{"train.steps": 100000, "checkpoint.save_every": 100000})
  runner = threading.Thread(target=lambda: result.update(code=run_local(
      args, num_processes=2, cpu_devices=4, hang_timeout=240, grace=10, echo=output.append)), daemon=True)
  runner.start()
  try:
    deadline = time.time() + 240
    while time.time() < deadline and max(_losses(workdir) or [0]) < 2:
      time.sleep(0.2)
    assert max(_losses(workdir) or [0]) >= 2, "\n".join(output[-40:])
    killed_at = time.time()
    subprocess.run(["pkill", "-9", "-f", "--", f"--workdir={workdir} .*--process_id=1"], check=True)
    runner.join(timeout=90)
    assert not runner.is_alive(), "the launcher did not stop within 90 s"
  finally:  # never leave training processes behind
    subprocess.run(["pkill", "-9", "-f", "--", f"--workdir={workdir} "], check=False)
  assert result["code"] != 0
  assert any("process 1 was killed by SIGKILL" in line for line in output), "\n".join(output[-20:])
  assert time.time() - killed_at < 60
