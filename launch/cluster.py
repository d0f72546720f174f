"""Cluster launchers: the sbatch script or gcloud commands that run a config on a GPU cluster or TPU pod.

  python -m launch.cluster slurm --config configs/llama_1b.py --nodes 4 --gpus-per-node 8 \
      --workdir /shared/runs/1b [--partition gpu --time 24:00:00 --account proj] [--out 1b.sbatch] \
      [--config.train.steps=1000 ...]
  python -m launch.cluster tpu --config configs/llama_1b.py --tpu-name my-pod --zone us-east5-a \
      --accelerator v5p-64 --workdir gs://bucket/runs/1b [--repo https://github.com/you/shardlm.git]

A dry run: nothing is submitted. The plan is checked first, with no devices, exactly as
launch.context would check it on the cluster (mesh vs the device count the nodes or the TPU slice
have, batch vs data axes, every parameter's split, remat vs platform), so a bad plan stops here
with the same ValueError. The script or commands go to stdout (and --out); the plan to stderr.
`--config.a.b=value` flags are checked and forwarded to every process's `python -m launch.train`.
"""

import argparse
import dataclasses
import math
import os
import re
import shlex
import sys

from launch.cli import config_from_file

# Chips per TPU generation: names count TensorCores for v4 / v5p (2 per chip) and chips for v5e / v6e.
# A host has 4 chips, except single-host slices of up to 8 chips (v5e, v6e) or 4 (v4, v5p).
_TPU = {  # generation: (TensorCores per chip in the name, single-host max chips, runtime version)
    "v4": (2, 4, "tpu-ubuntu2204-base"),
    "v5p": (2, 4, "v2-alpha-tpuv5"),
    "v5litepod": (1, 8, "v2-alpha-tpuv5-lite"),
    "v6e": (1, 8, "v2-alpha-tpuv6e"),
}
_TPU_ALIASES = {"v5e": "v5litepod"}


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the run will look like on the cluster, checked before anything is generated."""
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


def check_plan(raw_config, devices: int, hosts: int, platform: str) -> Plan:
  """Validates the config for `devices` accelerators on `hosts` hosts without touching a device.

  The same checks as launch.context.build_context: mesh shape vs device count, DCN factors vs
  hosts, batch vs the data axes, remat vs platform, and every parameter's split under the rule
  table. Returns the Plan; raises ValueError naming what does not fit and how to fix it.
  """
  from launch import train_state as ts
  from launch.config import check_against_mesh, validate
  from sharding import mesh as mesh_lib
  from sharding import remat as remat_lib
  from sharding import rules as rules_lib
  raw = raw_config.to_dict()
  if raw["model"]["dtype"] == "auto":  # resolved on the cluster's accelerators, not on this machine
    raw["model"]["dtype"] = "bfloat16"
  cfg = validate(raw)
  if cfg.mesh.num_devices not in (0, devices):
    raise ValueError(f"mesh.num_devices={cfg.mesh.num_devices} but the job has {devices} devices; "
                     "set --config.mesh.num_devices=0 to use them all.")
  dcn = cfg.mesh.dcn_shape()
  slices = math.prod(dcn.values())
  if slices > 1 and hosts != slices:
    raise ValueError(f"mesh.dcn_* = {dcn} asks for {slices} slices/hosts but the job has {hosts} "
                     f"processes; make the product of mesh.dcn_data, dcn_fsdp and dcn_tensor equal {hosts}.")
  ici = mesh_lib.resolve_mesh_shape(cfg.mesh.requested_shape(), devices // slices)
  mesh = {name: ici[name] * dcn[name] for name in ici}
  check_against_mesh(cfg, mesh)
  remat_lib.check_remat_supported(cfg.model.remat, platform)
  rules = rules_lib.get_rules(cfg.mesh.rules, cfg.mesh.custom_rules)
  mdef = ts.model_def(cfg.model)
  rules_lib.tree_specs(mdef.logical_names, mdef.abstract_params, mesh, rules)
  params = cfg.model.num_params()
  shape = " x ".join(f"{k}={v}" for k, v in mesh.items())
  summary = (f"{params / 1e9:.2f}B parameters on {devices} devices ({hosts} host(s)); mesh {shape}, "
             f"rules={cfg.mesh.custom_rules or cfg.mesh.rules}, remat={cfg.model.remat}, dtype={cfg.model.dtype}; "
             f"global batch {cfg.train.global_batch_size} x {cfg.data.seq_len} tokens, {cfg.train.steps} steps")
  return Plan(devices, hosts, mesh, params, summary)


def train_command(config: str, workdir: str, overrides: list[str], python: str = "python") -> str:
  """The `python -m launch.train` line every process runs; --resume makes a requeued job continue."""
  return shlex.join([python, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}",
                     "--resume", *overrides])


def slurm_script(args, overrides: list[str], plan: Plan) -> str:
  """An sbatch script: one process per node (or per GPU), jax.distributed found from SLURM's env."""
  per_gpu = args.process_per == "gpu"
  tasks = args.gpus_per_node if per_gpu else 1
  name = args.job_name or "shardlm-" + os.path.splitext(os.path.basename(args.config))[0]
  lines = ["#!/bin/bash", f"# Generated by: {args.command}", f"# Plan: {plan.summary}",
           f"#SBATCH --job-name={name}", f"#SBATCH --nodes={args.nodes}",
           f"#SBATCH --ntasks-per-node={tasks}", f"#SBATCH --gpus-per-node={args.gpus_per_node}",
           f"#SBATCH --cpus-per-task={args.cpus_per_task}" if args.cpus_per_task else None,
           "#SBATCH --exclusive", "#SBATCH --output=%x-%j.out",
           # SIGTERM two minutes before the time limit: launch.train saves and exits 0 (--requeue resumes).
           "#SBATCH --signal=TERM@120",
           f"#SBATCH --partition={args.partition}" if args.partition else None,
           f"#SBATCH --time={args.time}" if args.time else None,
           f"#SBATCH --account={args.account}" if args.account else None,
           "#SBATCH --requeue" if args.requeue else None,
           "", "set -euo pipefail",
           "# One-time setup on a shared filesystem (jax with CUDA):",
           f"#   git clone {args.repo} {args.repo_dir} && cd {args.repo_dir}",
           "#   python3.11 -m venv .venv && .venv/bin/pip install -e . 'jax[cuda12]'",
           f'cd "{args.repo_dir}"', f'source "{args.venv}/bin/activate"', "",
           "# launch.train calls jax.distributed.initialize(), which reads the coordinator (first node of",
           "# SLURM_STEP_NODELIST), process count (SLURM_NTASKS) and id (SLURM_PROCID) from SLURM's env.",
           "export PYTHONUNBUFFERED=1",
           "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"]
  if per_gpu:
    lines += ["# One process per GPU: jax binds process SLURM_LOCALID to GPU SLURM_LOCALID."]
  else:
    lines += ["# One process per node sees all its GPUs (jax would otherwise bind it to GPU SLURM_LOCALID=0).",
              "export JAX_LOCAL_DEVICE_IDS=" + ",".join(str(i) for i in range(args.gpus_per_node))]
  lines += ["", f"srun --ntasks-per-node={tasks} --kill-on-bad-exit=1 \\",
            "  " + train_command(args.config, args.workdir, overrides)]
  return "\n".join(line for line in lines if line is not None) + "\n"


def tpu_commands(args, overrides: list[str], plan: Plan, version: str) -> str:
  """gcloud commands: create the slice (optional), set it up on every worker, train on every worker."""
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu_name, f"--zone={args.zone}", "--worker=all"]
  ssh += [f"--project={args.project}"] if args.project else []
  create = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.tpu_name, f"--zone={args.zone}",
            f"--accelerator-type={args.accelerator}", f"--version={args.version or version}"]
  create += [f"--project={args.project}"] if args.project else []
  repo = shlex.quote(args.repo_dir)
  setup = (f"git clone {shlex.quote(args.repo)} {repo} 2>/dev/null || git -C {repo} pull; "
           f'cd {repo} && python3 -m venv .venv && .venv/bin/pip install -q -e . "jax[tpu]"')
  # Every worker runs the same command; jax.distributed.initialize() finds the other workers itself.
  train = f"cd {repo} && PYTHONUNBUFFERED=1 " + train_command(args.config, args.workdir, overrides,
                                                             python=".venv/bin/python")
  return "\n".join([
      f"# Generated by: {args.command}", f"# Plan: {plan.summary}",
      f"# {args.accelerator}: {plan.devices} chips on {plan.hosts} worker(s); --workdir must be "
      "storage every worker sees (a gs:// bucket).", "",
      "# 1. Create the slice (skip if it exists)", shlex.join(create), "",
      "# 2. Clone and install on every worker", f"{shlex.join(ssh)} --command {shlex.quote(setup)}", "",
      "# 3. Train: the same program on every worker", f"{shlex.join(ssh)} --command {shlex.quote(train)}",
      ""])


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m launch.cluster", description=__doc__.split("\n")[0],
                                   epilog="Extra --config.a.b=value flags are forwarded to launch.train.")
  sub = parser.add_subparsers(dest="target", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--config", required=True, help="config file, relative to the repository root")
  common.add_argument("--workdir", required=True, help="checkpoints and logs; storage every host sees")
  common.add_argument("--repo", default="https://github.com/YOUR-ORG/shardlm.git", help="git URL to clone")
  common.add_argument("--out", help="also write the script / commands to this file")
  slurm = sub.add_parser("slurm", parents=[common], help="an sbatch script for GPU nodes")
  slurm.add_argument("--nodes", type=int, required=True)
  slurm.add_argument("--gpus-per-node", "--gpus_per_node", type=int, default=8)
  slurm.add_argument("--process-per", "--process_per", choices=("node", "gpu"), default="node",
                     help="one process per node seeing all its GPUs (default), or one per GPU")
  slurm.add_argument("--partition")
  slurm.add_argument("--time", help="time limit, e.g. 24:00:00")
  slurm.add_argument("--account")
  slurm.add_argument("--job-name", "--job_name")
  slurm.add_argument("--cpus-per-task", "--cpus_per_task", type=int)
  slurm.add_argument("--requeue", action="store_true", help="requeue on preemption (resumes)")
  slurm.add_argument("--repo-dir", "--repo_dir", default="$HOME/shardlm",
                     help="the repository's path on the cluster's shared filesystem")
  slurm.add_argument("--venv", default=".venv", help="virtualenv with jax[cuda12], relative to --repo-dir")
  tpu = sub.add_parser("tpu", parents=[common], help="gcloud commands for a TPU VM slice")
  tpu.add_argument("--tpu-name", "--tpu_name", required=True)
  tpu.add_argument("--zone", required=True)
  tpu.add_argument("--accelerator", required=True, help="e.g. v4-32, v5p-64, v5e-16, v6e-8")
  tpu.add_argument("--project")
  tpu.add_argument("--version", help="TPU VM runtime (default: the generation's usual one)")
  tpu.add_argument("--repo-dir", "--repo_dir", default="shardlm", help="checkout directory on each worker")
  return parser


def generate(argv: list[str]) -> tuple[str, Plan]:
  """Parses `argv`, checks the plan and returns (script or commands, plan); raises ValueError."""
  parser = _parser()
  args, extra = parser.parse_known_args(argv)
  bad = [a for a in extra if not a.startswith("--config.") or "=" not in a]
  if bad:
    raise ValueError(f"unrecognized arguments {bad}; config overrides look like --config.train.steps=1000.")
  args.command = "python -m launch.cluster " + shlex.join(argv)
  raw = config_from_file(args.config, extra)
  if args.target == "slurm":
    if args.nodes < 1 or args.gpus_per_node < 1:
      raise ValueError(f"--nodes={args.nodes} and --gpus-per-node={args.gpus_per_node} must be >= 1.")
    hosts = args.nodes * (args.gpus_per_node if args.process_per == "gpu" else 1)
    plan = check_plan(raw, args.nodes * args.gpus_per_node, hosts, "gpu")
    text = slurm_script(args, extra, plan)
  else:
    chips, hosts, version = tpu_topology(args.accelerator)
    plan = check_plan(raw, chips, hosts, "tpu")
    text = tpu_commands(args, extra, plan, version)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  return text, plan


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    text, plan = generate(argv)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"Plan OK: {plan.summary}", file=sys.stderr)
  print(text, end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
