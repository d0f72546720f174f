"""launch.cluster: the sbatch script and gcloud commands it generates (dry run), and bad plans failing clearly."""

import pytest

from launch import cluster

SLURM = ["slurm", "--config", "configs/llama_1b.py", "--nodes", "4", "--gpus-per-node", "8",
         "--workdir", "/shared/runs/1b", "--partition", "gpu", "--time", "24:00:00"]
TPU = ["tpu", "--config", "configs/llama_1b.py", "--tpu-name", "my-pod", "--zone", "us-east5-a",
       "--accelerator", "v5p-64", "--workdir", "gs://bucket/runs/1b"]


def test_sbatch_script_one_process_per_node(tmp_path):
  out = tmp_path / "job.sbatch"
  text, plan = cluster.generate([*SLURM, "--out", str(out), "--config.train.steps=1000"])
  assert plan.devices == 32 and plan.hosts == 4 and plan.mesh == {"data": 1, "fsdp": 32, "tensor": 1}
  assert text.startswith("#!/bin/bash\n") and out.read_text() == text
  for piece in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                "#SBATCH --partition=gpu", "#SBATCH --time=24:00:00", "#SBATCH --signal=TERM@120",
                "'jax[cuda12]'", "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
                "srun --ntasks-per-node=1 --kill-on-bad-exit=1",
                "python -m launch.train --config=configs/llama_1b.py --workdir=/shared/runs/1b --resume "
                "--config.train.steps=1000", "fsdp=32"):
    assert piece in text, piece
  assert "#SBATCH --account" not in text and "#SBATCH --requeue" not in text


def test_sbatch_script_one_process_per_gpu():
  text, plan = cluster.generate([*SLURM, "--process-per", "gpu", "--requeue", "--config.mesh.fsdp=8",
                                 "--config.mesh.data=-1"])
  assert plan.hosts == 32 and plan.mesh == {"data": 4, "fsdp": 8, "tensor": 1}
  assert "#SBATCH --ntasks-per-node=8" in text and "srun --ntasks-per-node=8" in text
  assert "JAX_LOCAL_DEVICE_IDS" not in text and "#SBATCH --requeue" in text
  assert "--config.mesh.fsdp=8 --config.mesh.data=-1" in text


def test_tpu_commands():
  text, plan = cluster.generate([*TPU, "--repo", "https://example.com/shardlm.git"])
  assert plan.devices == 32 and plan.hosts == 8
  ssh = "gcloud compute tpus tpu-vm ssh my-pod --zone=us-east5-a --worker=all --command "
  assert text.count(ssh) == 2
  for piece in ("gcloud compute tpus tpu-vm create my-pod --zone=us-east5-a --accelerator-type=v5p-64",
                "git clone https://example.com/shardlm.git shardlm", '"jax[tpu]"',
                ".venv/bin/python -m launch.train --config=configs/llama_1b.py --workdir=gs://bucket/runs/1b --resume"):
    assert piece in text, piece


@pytest.mark.parametrize("accelerator, chips, hosts", [
    ("v5p-64", 32, 8), ("v5e-16", 16, 4), ("v5litepod-8", 8, 1), ("v4-32", 16, 4), ("v4-8", 4, 1),
    ("v6e-8", 8, 1), ("v6e-256", 256, 64)])
def test_tpu_topology(accelerator, chips, hosts):
  assert cluster.tpu_topology(accelerator)[:2] == (chips, hosts)


@pytest.mark.parametrize("argv, message", [
    ([*SLURM, "--config.mesh.fsdp=64"], "needs 64 devices but 32 are available"),
    ([*SLURM, "--config.mesh.fsdp=-1", "--config.mesh.tensor=64", "--config.mesh.rules=fsdp_tp",
      "--nodes", "8"], r"'kv_heads', size 8\) cannot be split over mesh.tensor=64"),
    ([*SLURM, "--config.train.global_batch_size=100"], "not divisible by mesh.data x mesh.fsdp = 1 x 32"),
    ([*TPU[:-4], "--accelerator", "v5p-63", "--workdir", "gs://b"], "2 per chip"),
    ([*TPU[:-4], "--accelerator", "h100-8", "--workdir", "gs://b"], "expected a TPU type"),
    ([*TPU, "--config.mesh.data=3", "--config.mesh.fsdp=-1"], "does not divide the 32 devices"),
    ([*SLURM, "--config.model.remt=full"], "Unknown config key 'model.remt'"),
    ([*SLURM, "--partiton", "gpu"], "unrecognized arguments"),
])
def test_bad_plans_fail_before_generating(argv, message, tmp_path, capsys):
  out = tmp_path / "never-written"
  with pytest.raises(ValueError, match=message):
    cluster.generate([*argv, "--out", str(out)])
  assert not out.exists()
  assert cluster.main([*argv]) == 2
  assert capsys.readouterr().err.startswith("error: ")


def test_auto_dtype_is_planned_for_the_accelerator():
  """model.dtype='auto' means bfloat16 on the cluster's GPUs, even though this machine is a CPU."""
  _, plan = cluster.generate(["slurm", "--config", "configs/demo.py", "--nodes", "1", "--workdir", "/w",
                              "--config.model.dtype=auto"])
  assert "dtype=bfloat16" in plan.summary and plan.mesh == {"data": 8, "fsdp": 1, "tensor": 1}
