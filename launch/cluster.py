"""Cluster launchers: the sbatch script or gcloud commands that run a config on a GPU cluster or TPU pod.

  python -m launch.cluster slurm --config configs/llama_1b.py --nodes 4 --gpus_per_node 8 \
      --workdir /shared/runs/1b [--partition gpu --time 24:00:00 --account proj] [--out 1b.sbatch] \
      [--config.train.steps=1000 ...]
  python -m launch.cluster tpu --config configs/llama_1b.py --tpu_name my-pod --zone us-east5-a \
      --accelerator v5p-64 --workdir gs://bucket/runs/1b [--repo https://github.com/you/shardlm.git]

A dry run: nothing is submitted. The plan is checked first, with no devices, by the same check the
run makes on the cluster (launch/run/cluster.py), so a bad plan stops here with one `error:` line.
The script or commands go to stdout (and --out); the plan to stderr. `--config.a.b=value` flags are
checked and forwarded to every process's `python -m launch.train`.
"""

import shlex
import sys

from absl import app, flags

from launch.run import cli
from launch.run import cluster

flags.DEFINE_string("workdir", None, "Checkpoints and logs; storage every host sees.")
flags.DEFINE_string("repo", cluster.DEFAULT_REPO, "git URL to clone.")
flags.DEFINE_string("out", None, "Also write the script / commands to this file.")
flags.DEFINE_string("repo_dir", None, "The repository on the cluster (slurm default: $HOME/shardlm on the "
                    "shared filesystem; tpu default: shardlm on each worker).")
# slurm
flags.DEFINE_integer("nodes", None, "slurm: GPU nodes.")
flags.DEFINE_integer("gpus_per_node", 8, "slurm: GPUs per node.")
flags.DEFINE_enum("process_per", "node", ["node", "gpu"],
                  "slurm: one process per node seeing all its GPUs, or one per GPU.")
flags.DEFINE_string("partition", None, "slurm: partition.")
flags.DEFINE_string("time", None, "slurm: time limit, e.g. 24:00:00.")
flags.DEFINE_string("account", None, "slurm: account.")
flags.DEFINE_string("job_name", None, "slurm: job name (default: shardlm-<config name>).")
flags.DEFINE_integer("cpus_per_task", None, "slurm: CPUs per task.")
flags.DEFINE_bool("requeue", False, "slurm: requeue on preemption (the job resumes).")
flags.DEFINE_string("venv", ".venv", "slurm: virtualenv with jax[cuda12], relative to --repo_dir.")
# tpu
flags.DEFINE_string("tpu_name", None, "tpu: the TPU VM's name.")
flags.DEFINE_string("zone", None, "tpu: zone.")
flags.DEFINE_string("accelerator", None, "tpu: type, e.g. v4-32, v5p-64, v5e-16, v6e-8.")
flags.DEFINE_string("project", None, "tpu: Google Cloud project.")
flags.DEFINE_string("version", None, "tpu: TPU VM runtime (default: the generation's usual one).")
FLAGS = flags.FLAGS


def job_from_flags(target: str) -> cluster.SlurmJob | cluster.TpuJob:
  """The job the flags describe for `target` ("slurm" or "tpu"); UsageError for a missing flag."""
  if target == "slurm":
    cli.require("nodes")
    extra = {"repo_dir": FLAGS.repo_dir} if FLAGS.repo_dir else {}
    return cluster.SlurmJob(nodes=FLAGS.nodes, gpus_per_node=FLAGS.gpus_per_node,
                            process_per=FLAGS.process_per, partition=FLAGS.partition, time=FLAGS.time,
                            account=FLAGS.account, job_name=FLAGS.job_name, cpus_per_task=FLAGS.cpus_per_task,
                            requeue=FLAGS.requeue, venv=FLAGS.venv, **extra)
  if target == "tpu":
    cli.require("tpu_name", "zone", "accelerator")
    extra = {"repo_dir": FLAGS.repo_dir} if FLAGS.repo_dir else {}
    return cluster.TpuJob(tpu_name=FLAGS.tpu_name, zone=FLAGS.zone, accelerator=FLAGS.accelerator,
                          project=FLAGS.project, version=FLAGS.version, **extra)
  raise app.UsageError(f"the first argument must be 'slurm' or 'tpu', not {target!r}.")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("pass the target first: python -m launch.cluster slurm|tpu --config ... --workdir ...")
  cli.require("config", "workdir")
  job = job_from_flags(argv[1])
  command = "python -m launch.cluster " + shlex.join(sys.argv[1:])
  text, plan = cluster.generate(job, cli.config_path(), FLAGS.workdir, cli.config_overrides(sys.argv[1:]),
                                repo=FLAGS.repo, command=command)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(text)
  print(f"Plan OK: {plan.summary}", file=sys.stderr)
  print(text, end="")


if __name__ == "__main__":
  cli.run(main)
