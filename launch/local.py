"""Run N cooperating processes on this machine, as N hosts would: the multi-host code path, tested here.

  python -m launch.local --num_processes 2 --cpu_devices 4 -- \
      --config configs/smoke.py --workdir runs/two-hosts --config.data.process_sharding=rows

Each process runs `python -m launch.train` (or --module) with its own CPU devices, a shared
coordinator on 127.0.0.1 and gloo collectives. Output is prefixed with the process id. If a process
exits with an error or is killed, or none prints anything for --hang_timeout seconds, the others are
stopped (SIGTERM, then SIGKILL) and this command exits non-zero saying which process failed and how.
"""

import sys

from absl import flags

from launch.run import cli
from launch.run.processes import run_local

flags.DEFINE_integer("num_processes", 2, "Processes to start.")
flags.DEFINE_integer("cpu_devices", 4, "CPU devices per process.")
flags.DEFINE_string("module", "launch.train", "Entry module each process runs.")
flags.DEFINE_integer("hang_timeout", 300, "Stop everything if no process prints for this many seconds.")
flags.DEFINE_integer("grace", 15, "Seconds between SIGTERM and SIGKILL when stopping processes.")
FLAGS = flags.FLAGS


def main(argv):
  sys.exit(run_local(argv[1:], FLAGS.num_processes, FLAGS.cpu_devices, FLAGS.module,
                     FLAGS.hang_timeout, FLAGS.grace))


if __name__ == "__main__":
  cli.run(main)
