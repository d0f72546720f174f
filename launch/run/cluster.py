"""Cluster job templates: the sbatch script or gcloud commands that run a config on a GPU cluster or TPU pod.

The command is `python -m launch.cluster` (its docstring has the command lines). Nothing is
submitted: the plan is checked first with no devices, by the same `decide` the run plan uses (mesh vs
the device count the nodes or the TPU slice have, batch vs data axes, remat vs platform) plus every
parameter's split under the rule table, so a bad plan stops with the same ValueError as on the cluster.
"""

import dataclasses
import math
import os
import re
import shlex

from launch.run import state as ts
from launch.run.config import validate
from launch.run.plan import decide
from sharding import rules as rules_lib

# Chips per TPU generation: names count TensorCores for v4 / v5p (2 per chip) and chips for v5e / v6e.
# A host has 4 chips, except single-host slices of up to 8 chips (v5e, v6e) or 4 (v4, v5p).
_TPU = {  # generation: (TensorCores per chip in the name, single-host max chips, runtime version)
    "v4": (2, 4, "tpu-ubuntu2204-base"),
    "v5p": (2, 4, "v2-alpha-tpuv5"),
    "v5litepod": (1, 8, "v2-alpha-tpuv5-lite"),
    "v6e": (1, 8, "v2-alpha-tpuv6e"),
}
_TPU_ALIASES = {"v5e": "v5litepod"}
DEFAULT_REPO = "https://github.com/YOUR-ORG/shardlm.git"


@dataclasses.dataclass(frozen=True)
class CheckedJob:
  """What the job will look like on the cluster (from `launch.run.plan.decide`), checked before
  anything is generated."""
  devices: int
  hosts: int
  mesh: dict[str, int]      # resolved sizes of (data, fsdp, tensor), DCN factors included
  params: int
  summary: str


def tpu_topology(accelerator: str) -> tuple[int, int, str]:
  """'v5p-64' -> (chips 32, hosts 8, runtime version); raises ValueError for an unknown type."""
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator.strip())
  generation = _TPU_ALIASES.get(match.group(1), match.group(1)) if match else None
  if generation not in _TPU:
    raise ValueError(f"--accelerator={accelerator!r}: expected a TPU type such as v4-32, v5p-64, v5e-16 "
                     f"or v6e-8 (generations: {sorted(_TPU) + sorted(_TPU_ALIASES)}).")
  cores_per_chip, single_host, version = _TPU[generation]
  size = int(match.group(2))
  if size % cores_per_chip or size < cores_per_chip:
    raise ValueError(f"--accelerator={accelerator!r}: {generation} sizes count TensorCores, "
                     f"{cores_per_chip} per chip; use an even size such as {generation}-8.")
  chips = size // cores_per_chip
  if chips > single_host and chips % 4:
    raise ValueError(f"--accelerator={accelerator!r}: a multi-host slice has a multiple of 4 chips.")
  return chips, 1 if chips <= single_host else chips // 4, version


@dataclasses.dataclass(frozen=True)
class SlurmJob:
  """An sbatch job on GPU nodes: one process per node (seeing all its GPUs) or one per GPU."""
  nodes: int
  gpus_per_node: int = 8
  process_per: str = "node"         # node | gpu
  partition: str | None = None
  time: str | None = None           # time limit, e.g. 24:00:00
  account: str | None = None
  job_name: str | None = None
  cpus_per_task: int | None = None
  requeue: bool = False             # requeue on preemption (the job resumes)
  repo_dir: str = "$HOME/shardlm"   # the repository on the cluster's shared filesystem
  venv: str = ".venv"               # virtualenv with jax[cuda12], relative to repo_dir


@dataclasses.dataclass(frozen=True)
class TpuJob:
  """A TPU VM slice driven with gcloud: the same program on every worker."""
  tpu_name: str
  zone: str
  accelerator: str                  # e.g. v4-32, v5p-64, v5e-16, v6e-8
  project: str | None = None
  version: str | None = None        # TPU VM runtime (default: the generation's usual one)
  repo_dir: str = "shardlm"         # checkout directory on each worker


def check_plan(raw_config, devices: int, hosts: int, platform: str) -> CheckedJob:
  """Validates the config for `devices` accelerators on `hosts` hosts without touching a device.

  Returns the CheckedJob; raises ValueError naming what does not fit and how to fix it.
  """
  cfg = validate(raw_config.to_dict())
  if cfg.mesh.num_devices not in (0, devices):
    raise ValueError(f"mesh.num_devices={cfg.mesh.num_devices} but the job has {devices} devices; "
                     "set --config.mesh.num_devices=0 to use them all.")
  slices = math.prod(cfg.mesh.dcn_shape().values())
  if slices > 1 and hosts != slices:
    raise ValueError(f"mesh.dcn_* = {cfg.mesh.dcn_shape()} asks for {slices} slices/hosts but the job has "
                     f"{hosts} processes; make the product of the mesh.dcn_* sizes equal {hosts}.")
  decided = decide(cfg, devices, platform)  # model.dtype "auto" settled for the cluster's chips
  mesh = decided.mesh_shape.shape
  rules = rules_lib.get_rules(cfg.mesh.rules, cfg.mesh.custom_rules, pipelined=mesh["stage"] > 1,
                              sequenced=mesh["sequence"] > 1)
  mdef = ts.model_def(dataclasses.replace(cfg.model, dtype=decided.dtype))
  rules_lib.tree_specs(mdef.logical_names, mdef.abstract_params, mesh, rules)
  params = cfg.model.num_params()
  shape = " x ".join(f"{k}={v}" for k, v in mesh.items())
  summary = (f"{params / 1e9:.2f}B parameters on {devices} devices ({hosts} host(s)); mesh {shape}, "
             f"rules={cfg.mesh.custom_rules or cfg.mesh.rules}, remat={cfg.model.remat}, dtype={decided.dtype}; "
             f"global batch {cfg.train.global_batch_size} x {cfg.data.seq_len} tokens, {cfg.train.steps} steps")
  return CheckedJob(devices, hosts, mesh, params, summary)


def train_command(config: str, workdir: str, overrides: list[str], python: str = "python") -> str:
  """The `python -m launch.train` line every process runs; --resume makes a requeued job continue."""
  return shlex.join([python, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}",
                     "--resume", *overrides])


def slurm_script(job: SlurmJob, config: str, workdir: str, overrides: list[str], plan: CheckedJob, repo: str,
                 command: str) -> str:
  """An sbatch script: one process per node (or per GPU), jax.distributed found from SLURM's env."""
  per_gpu = job.process_per == "gpu"
  tasks = job.gpus_per_node if per_gpu else 1
  name = job.job_name or "shardlm-" + os.path.splitext(os.path.basename(config))[0]
  lines = ["#!/bin/bash", f"# Generated by: {command}", f"# Plan: {plan.summary}",
           f"#SBATCH --job-name={name}", f"#SBATCH --nodes={job.nodes}",
           f"#SBATCH --ntasks-per-node={tasks}", f"#SBATCH --gpus-per-node={job.gpus_per_node}",
           f"#SBATCH --cpus-per-task={job.cpus_per_task}" if job.cpus_per_task else None,
           "#SBATCH --exclusive", "#SBATCH --output=%x-%j.out",
           # SIGTERM two minutes before the time limit: launch.train saves and exits 0 (--requeue resumes).
           "#SBATCH --signal=TERM@120",
           f"#SBATCH --partition={job.partition}" if job.partition else None,
           f"#SBATCH --time={job.time}" if job.time else None,
           f"#SBATCH --account={job.account}" if job.account else None,
           "#SBATCH --requeue" if job.requeue else None,
           "", "set -euo pipefail",
           "# One-time setup on a shared filesystem (jax with CUDA):",
           f"#   git clone {repo} {job.repo_dir} && cd {job.repo_dir}",
           "#   python3.11 -m venv .venv && .venv/bin/pip install -e . 'jax[cuda12]'",
           f'cd "{job.repo_dir}"', f'source "{job.venv}/bin/activate"', "",
           "# launch.train calls jax.distributed.initialize(), which reads the coordinator (first node of",
           "# SLURM_STEP_NODELIST), process count (SLURM_NTASKS) and id (SLURM_PROCID) from SLURM's env.",
           "export PYTHONUNBUFFERED=1",
           "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"]
  if per_gpu:
    lines += ["# One process per GPU: jax binds process SLURM_LOCALID to GPU SLURM_LOCALID."]
  else:
    lines += ["# One process per node sees all its GPUs (jax would otherwise bind it to GPU SLURM_LOCALID=0).",
              "export JAX_LOCAL_DEVICE_IDS=" + ",".join(str(i) for i in range(job.gpus_per_node))]
  lines += ["", f"srun --ntasks-per-node={tasks} --kill-on-bad-exit=1 \\",
            "  " + train_command(config, workdir, overrides)]
  return "\n".join(line for line in lines if line is not None) + "\n"


def tpu_commands(job: TpuJob, config: str, workdir: str, overrides: list[str], plan: CheckedJob, version: str,
                 repo: str, command: str) -> str:
  """gcloud commands: create the slice (optional), set it up on every worker, train on every worker."""
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", job.tpu_name, f"--zone={job.zone}", "--worker=all"]
  ssh += [f"--project={job.project}"] if job.project else []
  create = ["gcloud", "compute", "tpus", "tpu-vm", "create", job.tpu_name, f"--zone={job.zone}",
            f"--accelerator-type={job.accelerator}", f"--version={job.version or version}"]
  create += [f"--project={job.project}"] if job.project else []
  repo_dir = shlex.quote(job.repo_dir)
  setup = (f"git clone {shlex.quote(repo)} {repo_dir} 2>/dev/null || git -C {repo_dir} pull; "
           f'cd {repo_dir} && python3 -m venv .venv && .venv/bin/pip install -q -e . "jax[tpu]"')
  # Every worker runs the same command; jax.distributed.initialize() finds the other workers itself.
  train = f"cd {repo_dir} && PYTHONUNBUFFERED=1 " + train_command(config, workdir, overrides,
                                                             python=".venv/bin/python")
  return "\n".join([
      f"# Generated by: {command}", f"# Plan: {plan.summary}",
      f"# {job.accelerator}: {plan.devices} chips on {plan.hosts} worker(s); --workdir must be "
      "storage every worker sees (a gs:// bucket).", "",
      "# 1. Create the slice (skip if it exists)", shlex.join(create), "",
      "# 2. Clone and install on every worker", f"{shlex.join(ssh)} --command {shlex.quote(setup)}", "",
      "# 3. Train: the same program on every worker", f"{shlex.join(ssh)} --command {shlex.quote(train)}",
      ""])


def generate(job: SlurmJob | TpuJob, config: str, workdir: str, overrides: list[str] = (),
             repo: str = DEFAULT_REPO, command: str = "") -> tuple[str, CheckedJob]:
  """Checks the plan of `config` (a file) with `overrides` (`--config.a.b=value`) for `job`; returns
  (the sbatch script or gcloud commands, the plan). Raises ValueError before generating anything."""
  from launch.run.cli import config_from_file
  raw = config_from_file(config, list(overrides))
  if isinstance(job, SlurmJob):
    if job.nodes < 1 or job.gpus_per_node < 1:
      raise ValueError(f"--nodes={job.nodes} and --gpus_per_node={job.gpus_per_node} must be >= 1.")
    if job.process_per not in ("node", "gpu"):
      raise ValueError(f"--process_per={job.process_per!r}: choose 'node' or 'gpu'.")
    hosts = job.nodes * (job.gpus_per_node if job.process_per == "gpu" else 1)
    plan = check_plan(raw, job.nodes * job.gpus_per_node, hosts, "gpu")
    return slurm_script(job, config, workdir, list(overrides), plan, repo, command), plan
  chips, hosts, version = tpu_topology(job.accelerator)
  plan = check_plan(raw, chips, hosts, "tpu")
  return tpu_commands(job, config, workdir, list(overrides), plan, version, repo, command), plan
