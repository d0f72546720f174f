"""N cooperating processes on this machine, as N hosts would run: the multi-host code path, tested here.

The command is `python -m launch.local`. Each process runs a module (launch.train by default) with its
own CPU devices, a shared coordinator on 127.0.0.1 and gloo collectives; output is prefixed with the
process id. If a process fails or none prints for `hang_timeout` seconds, the others are stopped.
"""

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def describe_exit(code: int) -> str:
  if code < 0:
    return f"was killed by {signal.Signals(-code).name}"
  return f"exited with code {code}"


def run_local(args: list[str], num_processes: int, cpu_devices: int, module: str = "launch.train",
              hang_timeout: float = 300, grace: float = 15, echo=print) -> int:
  """Starts the processes, relays their output and returns 0 only if every one exits 0."""
  port = free_port()
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  env.pop("XLA_FLAGS", None)  # each process sets its own CPU device count
  procs = []
  lines: queue.Queue = queue.Queue()
  for pid in range(num_processes):
    cmd = [sys.executable, "-m", module, *args, f"--coordinator_address=127.0.0.1:{port}",
           f"--num_processes={num_processes}", f"--process_id={pid}", f"--cpu_devices={cpu_devices}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(proc)
    threading.Thread(target=lambda p=proc, i=pid: [lines.put((i, l)) for l in p.stdout], daemon=True).start()

  def stop_all(reason: str) -> int:
    echo(f"[launch.local] {reason}; stopping the other processes.")
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and any(p.poll() is None for p in procs):
      time.sleep(0.2)
    for p in procs:
      if p.poll() is None:
        p.kill()
    for p in procs:
      p.wait()
    return 1

  last_output = time.time()
  while True:
    try:
      pid, line = lines.get(timeout=0.5)
      echo(f"[p{pid}] {line.rstrip()}")
      last_output = time.time()
      continue
    except queue.Empty:
      pass
    codes = [p.poll() for p in procs]
    failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
    if failed:
      i, code = failed[0]
      return stop_all(f"process {i} {describe_exit(code)}")
    if all(c == 0 for c in codes):
      while not lines.empty():
        pid, line = lines.get()
        echo(f"[p{pid}] {line.rstrip()}")
      echo(f"[launch.local] all {num_processes} processes finished.")
      return 0
    if time.time() - last_output > hang_timeout:
      return stop_all(f"no process printed anything for {hang_timeout:.0f}s (hung?)")
