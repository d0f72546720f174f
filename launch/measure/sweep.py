"""Parallelism sweeps: every point of a grid in its own process, recorded even when it fails.

The command is `python -m launch.sweep` (its docstring describes the grid). Each point runs
`python -m launch.sweep_point` with a timeout; invalid, out-of-memory, failing and timed-out points
get a status and reason and the sweep goes on (a crashed point is first retried `retries` times).
Results: <out>/points/<point>.json (+ .log), <out>/results.csv, results.md and PNG plots
(sweep_report.py). Rerunning skips recorded points (retry_failed reruns error/timeout/oom ones; a
compile-only record is redone when steps are wanted). `out` may be a gs:// URL: every file goes
through launch/storage/paths.py (a point's log is written locally while it runs, then uploaded), and
its bucket is probed before any point runs.
"""

import dataclasses
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

from launch.measure import sweep_report
from launch.run.cli import config_from_file
from launch.run.topology import topology_devices
from launch.storage import bucket
from launch.storage import paths
from sharding.mesh import MESH_AXES
from sharding.rules import preset_for_mesh

ALIASES = {"rules": "mesh.rules", "remat": "model.remat", "batch": "train.global_batch_size",
           "accum": "train.grad_accum_steps", "dtype": "model.dtype", "layers": "model.num_layers",
           "seq": "data.seq_len", "micro": "train.microbatches", "schedule": "train.pipeline_schedule",
           "repeats": "train.pipeline_repeats", "seq_attention": "mesh.sequence_attention"}
RETRYABLE = ("error", "timeout", "oom")
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Point:
  """One configuration of the grid: its grid values (for tables) and the config overrides they mean."""
  values: tuple[tuple[str, str], ...]    # (grid key, value text), in grid order
  overrides: tuple[str, ...]             # "--config.a.b=value", forwarded to the point's process

  @property
  def name(self) -> str:
    return " ".join(f"{k}={v}" for k, v in self.values)

  @property
  def slug(self) -> str:
    """A file name for the point, e.g. 'mesh-data2.tensor4_remat-full_batch-32'."""
    return "_".join(re.sub(r"[^A-Za-z0-9.+-]", "-", f"{k.split('.')[-1]}-{v}") for k, v in self.values)


def parse_mesh_point(text: str) -> dict[str, int]:
  """'data2.tensor4' -> {"stage": 1, "data": 2, "fsdp": 1, "sequence": 1, "tensor": 4} (every axis of
  MESH_AXES; 'fsdp2.sequence4' splits sequences); raises ValueError for a bad point."""
  shape = {}
  for part in text.split("."):
    match = re.fullmatch(rf"({'|'.join(MESH_AXES)})(\d+)", part.strip())
    if not match or int(match.group(2)) < 1:
      raise ValueError(f"Grid mesh point {text!r}: {part!r} is not an axis and a size such as 'data8', "
                       f"'fsdp4' or 'tensor2'; join axes with '.', e.g. 'data2.fsdp2.tensor2'.")
    if match.group(1) in shape:
      raise ValueError(f"Grid mesh point {text!r} names axis {match.group(1)!r} twice.")
    shape[match.group(1)] = int(match.group(2))
  return {axis: shape.get(axis, 1) for axis in MESH_AXES}


def parse_grid(text: str) -> list[tuple[str, list[str]]]:
  """'mesh=data8,fsdp8;remat=none,full' -> [("mesh", ["data8", "fsdp8"]), ("remat", ["none", "full"])].

  Keys are `mesh`, an alias (ALIASES) or a dotted config key; raises ValueError for a malformed
  dimension, an empty value, a repeated key or a bad mesh point.
  """
  dims, seen = [], set()
  for part in filter(None, (p.strip() for p in text.split(";"))):
    if "=" not in part:
      raise ValueError(f"Grid dimension {part!r} is not 'key=value,value,...'; separate dimensions "
                       "with ';', e.g. \"mesh=data8,fsdp8;remat=none,full\".")
    key, values_text = (x.strip() for x in part.split("=", 1))
    values = [v.strip() for v in values_text.split(",")]
    if not key or not all(values):
      raise ValueError(f"Grid dimension {part!r} has an empty key or value.")
    if key != "mesh" and key not in ALIASES and "." not in key:
      raise ValueError(f"Grid key {key!r} is unknown: use 'mesh', one of {sorted(ALIASES)}, or a "
                       "dotted config key such as 'model.d_model'.")
    config_key = ALIASES.get(key, key)
    if config_key in seen:
      raise ValueError(f"Grid key {key!r} appears twice (as {config_key}); give each key once.")
    seen.add(config_key)
    if key == "mesh":
      for value in values:
        parse_mesh_point(value)
    dims.append((key, values))
  if not dims:
    raise ValueError("--grid is empty; e.g. --grid \"mesh=data8,fsdp8;remat=none,full\".")
  return dims


def expand_grid(dims: list[tuple[str, list[str]]]) -> list[Point]:
  """The Cartesian product of the dimensions as Points, first dimension slowest."""
  keys = [key for key, _ in dims]
  rules_given = any(ALIASES.get(k, k) in ("mesh.rules", "mesh.custom_rules") for k in keys)
  points = []
  for combo in itertools.product(*(values for _, values in dims)):
    overrides = []
    for key, value in zip(keys, combo):
      if key == "mesh":
        shape = parse_mesh_point(value)
        overrides += [f"--config.mesh.{axis}={shape[axis]}" for axis in MESH_AXES]
        overrides += [] if rules_given else [f"--config.mesh.rules={preset_for_mesh(shape)}"]
      else:
        overrides.append(f"--config.{ALIASES.get(key, key)}={value}")
    points.append(Point(tuple(zip(keys, combo)), tuple(overrides)))
  return points


def load_record(path: str, config: str, overrides: list[str]) -> dict | None:
  """The point's recorded JSON if it was made from the same config and overrides, else None."""
  record = _read_json(path)
  same = record.get("config") == config and record.get("overrides") == overrides
  return record if same else None


def _read_json(path: str) -> dict:
  try:
    return json.loads(paths.read_text(path))
  except (OSError, ValueError):
    return {}


def is_finished(record: dict | None, compile_only: bool, retry_failed: bool) -> bool:
  """Whether a recorded point can be skipped on rerun."""
  if record is None or (retry_failed and record["status"] in RETRYABLE):
    return False
  return compile_only or record["status"] != "ok" or record.get("mode") == "time"


def run_point_process(point: Point, config: str, base: list[str], path: str, compile_only: bool,
                      steps: int, warmup: int, devices: int, timeout: float, topology: str | None = None,
                      num_slices: int = 1) -> dict:
  """Runs launch.sweep_point for `point` (output to <path>.log); returns its record, never raises.
  With `topology` the point compiles for that TPU slice (x `num_slices`) and runs nothing."""
  overrides = [*base, *point.overrides]
  cmd = [sys.executable, "-m", "launch.sweep_point", f"--config={config}", *overrides, f"--out={path}",
         f"--steps={steps}", f"--warmup={warmup}", f"--devices={devices}"]
  cmd += ["--compile_only"] if compile_only else []
  cmd += [f"--topology={topology}", f"--num_slices={num_slices}"] if topology else []
  env = {**os.environ, "PYTHONUNBUFFERED": "1",
         "PYTHONPATH": os.pathsep.join(filter(None, [_REPO, os.environ.get("PYTHONPATH")]))}
  paths.remove(path)
  log_path = _log_path(path)
  local_log = log_path
  if paths.is_url(path):  # the child writes its log as it goes: a local file, uploaded when it ends
    fd, local_log = tempfile.mkstemp(prefix="shardlm-point-", suffix=".log")
    os.close(fd)
  start = time.perf_counter()
  try:
    with open(local_log, "w") as log:
      log.write("$ " + shlex.join(cmd) + "\n")
      log.flush()
      try:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
      except subprocess.TimeoutExpired:
        code = None
    record = _read_json(path)
    if "status" not in record:
      if code is None:
        status, reason = "timeout", f"no result within --timeout={timeout:g}s (the point was killed)"
      else:
        status, reason = "error", _exit_reason(code, local_log, log_path)
      record = {"status": status, "reason": reason, "mode": "compile" if compile_only else "time"}
    if local_log != log_path:
      with open(local_log, "rb") as f:
        paths.write_bytes(log_path, f.read())
  finally:
    if local_log != log_path:
      os.remove(local_log)
  record.update(point=point.name, config=config, overrides=overrides,
                wall_s=time.perf_counter() - start, **dict(point.values))
  paths.write_text(path, json.dumps(record, indent=1))
  return record


def _log_path(json_path: str) -> str:
  return json_path.removesuffix(".json") + ".log"


def _exit_reason(code: int, log_path: str, shown_path: str | None = None) -> str:
  """Why a point's process ended without writing a result: its exit and the last line of the local log
  `log_path` (named as `shown_path`, where it ends up, when that differs)."""
  if code < 0:
    how = f"killed by signal {-code}" + (" (SIGKILL: often the host running out of memory)" if code == -9 else "")
  else:
    how = f"exited with code {code}"
  with open(log_path) as f:
    lines = [line.strip() for line in f if line.strip()]
  # The most telling line: a Python exception, else an XLA fatal check (glog 'F' line), else the last.
  python_error = [l for l in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b:", l)]
  fatal = [l.split("] ", 1)[-1] for l in lines if re.match(r"^F\d{4} ", l)]
  last = (python_error or fatal or lines or ["(no output)"])[-1]
  return f"process {how}: {last[:300]} (log: {shown_path or log_path})"


def run_sweep(config: str, grid: str, out: str, base_overrides: list[str] = (), compile_only: bool = False,
              steps: int = 5, warmup: int = 2, devices: int = 8, timeout: float = 600,
              retry_failed: bool = False, command: str = "", echo=None, retries: int = 1,
              topology: str | None = None, num_slices: int = 1) -> list[dict]:
  """Runs (or resumes) the sweep and writes its reports; returns one record per point, in grid order.

  A point that crashes (`error`) is run up to `retries` more times before it is recorded. With
  `topology` (a TPU slice name, x `num_slices`) every point is compiled for that slice by the TPU
  compiler and nothing runs (compile-only): memory, fits, collectives and XLA's estimated step time.

  Raises ValueError before running anything for a malformed grid, an unknown key or a bad value, a
  topology libtpu cannot describe, or a gs:// `out` whose bucket is missing or refuses writes.
  """
  echo = echo or (lambda line: print(line, flush=True))
  points = expand_grid(parse_grid(grid))
  base = list(base_overrides)
  for point in points:  # every key and value parses before any point runs
    config_from_file(config, [*base, *point.overrides])
  if topology:
    topology_devices(topology, num_slices)  # the name and libtpu, checked before any point
    compile_only = True
  bucket.probe(out)  # a missing bucket or permission: one error line before any point compiles
  paths.makedirs(paths.join(out, "points"))
  records, durations = [], []
  for i, point in enumerate(points, 1):
    path = paths.join(out, "points", point.slug + ".json")
    record = load_record(path, config, [*base, *point.overrides])
    if is_finished(record, compile_only, retry_failed):
      echo(f"[{i}/{len(points)}] {point.name}: recorded earlier ({record['status']}), skipped")
    else:
      for attempt in range(1 + retries):
        if attempt:
          echo(f"[{i}/{len(points)}] {point.name}: {record['status']} ({record['reason'][:100]}); retrying")
        record = run_point_process(point, config, base, path, compile_only, steps, warmup, devices, timeout,
                                   topology, num_slices)
        durations.append(record["wall_s"])
        if record["status"] != "error":
          break
      left = sum(1 for p in points[i:] if not is_finished(
          load_record(paths.join(out, "points", p.slug + ".json"), config, [*base, *p.overrides]),
          compile_only, retry_failed))
      eta = sum(durations) / len(durations) * left
      echo(f"[{i}/{len(points)}] {point.name}: {sweep_report.summary(record)} "
           f"({record['wall_s']:.0f}s; ETA {eta / 60:.1f} min)")
    records.append(record)
    sweep_report.write_reports(records, [k for k, _ in point.values], out, command)
  counts = {s: sum(r["status"] == s for r in records) for s in dict.fromkeys(r["status"] for r in records)}
  echo(f"{len(records)} points: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; results in {out}")
  return records
