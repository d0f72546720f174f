"""launch/measure/sweep.py and python -m launch.sweep: the grid syntax, a tiny sweep that records an invalid point and goes on, resume, compile-only."""

import csv
import os
import subprocess
import sys

import pytest

from launch.measure import sweep, sweep_report
from sharding.rules import preset_for_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")


def test_grid_parses_into_points_with_inferred_rules():
  dims = sweep.parse_grid(" mesh=data8,data2.fsdp2.tensor2 ; remat=none,full;batch=16 ")
  assert dims == [("mesh", ["data8", "data2.fsdp2.tensor2"]), ("remat", ["none", "full"]), ("batch", ["16"])]
  points = sweep.expand_grid(dims)
  assert [p.name for p in points] == [
      "mesh=data8 remat=none batch=16", "mesh=data8 remat=full batch=16",
      "mesh=data2.fsdp2.tensor2 remat=none batch=16", "mesh=data2.fsdp2.tensor2 remat=full batch=16"]
  assert points[2].overrides == (
      "--config.mesh.stage=1", "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.sequence=1", "--config.mesh.tensor=2",
      "--config.mesh.rules=dp_fsdp_tp",
      "--config.model.remat=none", "--config.train.global_batch_size=16")
  assert points[2].slug == "mesh-data2.fsdp2.tensor2_remat-none_batch-16"
  assert [preset_for_mesh(sweep.parse_mesh_point(m)) for m in ("data8", "fsdp8", "data2.fsdp4", "data2.tensor4",
                                                                 "fsdp2.tensor4", "sequence8", "fsdp2.sequence4",
                                                                 "fsdp2.sequence2.tensor2")] == [
      "dp", "fsdp", "fsdp", "tp", "fsdp_tp", "sp", "fsdp_sp", "fsdp_sp_tp"]


def test_grid_explicit_rules_and_generic_keys():
  points = sweep.expand_grid(sweep.parse_grid("mesh=fsdp8;rules=dp,fsdp;model.d_model=64"))
  assert len(points) == 2
  assert "--config.mesh.rules=dp" in points[0].overrides and "--config.model.d_model=64" in points[0].overrides
  assert not any(o.startswith("--config.mesh.rules=fsdp") for o in points[0].overrides)


@pytest.mark.parametrize("grid, message", [
    ("mesh=data8;remat", "is not 'key=value"),
    ("mesh=gpu8", "is not an axis and a size"),
    ("mesh=data2.data4", "names axis 'data' twice"),
    ("colour=red", "Grid key 'colour' is unknown"),
    ("remat=none;model.remat=full", "appears twice"),
    ("remat=none,", "empty key or value"),
    ("", "--grid is empty"),
])
def test_grid_errors_are_clear(grid, message):
  with pytest.raises(ValueError, match=message):
    sweep.parse_grid(grid)


def test_bad_key_or_value_stops_before_any_point(tmp_path):
  with pytest.raises(ValueError, match="Unknown config key 'model.widht'"):
    sweep.run_sweep(SMOKE, "model.widht=1", str(tmp_path))
  with pytest.raises(ValueError, match="Bad override value"):
    sweep.run_sweep(SMOKE, "batch=many", str(tmp_path))
  assert not os.path.exists(tmp_path / "points")


def test_sweep_records_invalid_point_goes_on_and_resumes(tmp_path):
  lines = []
  out = str(tmp_path / "sweep")
  # smoke: 4 heads, 2 KV heads, so tensor=8 cannot split them: an invalid point between two good ones.
  records = sweep.run_sweep(SMOKE, "mesh=data8,tensor8,fsdp8", out, steps=1, warmup=0, echo=lines.append)
  assert [r["status"] for r in records] == ["ok", "invalid", "ok"], lines
  assert "cannot be split over mesh.tensor=8" in records[1]["reason"]
  for r in (records[0], records[2]):
    assert r["tokens_per_s"] > 0 and r["temp_bytes"] > 0 and r["mfu"] > 0
  # fsdp=8 holds 1/8 of the parameters that data=8 replicates (up to unsplit norm scales).
  assert records[2]["params_bytes"] < records[0]["params_bytes"] / 4
  assert "[2/3] mesh=tensor8: INVALID" in lines[1] and "ETA" in lines[0]
  for name in ("results.csv", "results.md", "memory.png", "tokens_per_s.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  with open(os.path.join(out, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["mesh"], r["status"], r["rules"]) for r in rows] == [
      ("data8", "ok", "dp"), ("tensor8", "invalid", ""), ("fsdp8", "ok", "fsdp")]
  assert "kv_heads" in rows[1]["reason"]
  with open(os.path.join(out, "results.md")) as f:
    assert "| tensor8 | invalid |" in f.read()

  stamps = {p: os.path.getmtime(os.path.join(out, "points", p)) for p in os.listdir(os.path.join(out, "points"))}
  lines.clear()
  again = sweep.run_sweep(SMOKE, "mesh=data8,tensor8,fsdp8", out, steps=1, warmup=0, echo=lines.append)
  assert all("recorded earlier" in line for line in lines[:3]), lines
  assert [r["status"] for r in again] == ["ok", "invalid", "ok"]
  assert stamps == {p: os.path.getmtime(os.path.join(out, "points", p)) for p in stamps}


def test_compile_only_fills_memory_without_timings(tmp_path):
  out = str(tmp_path / "compile")
  (record,) = sweep.run_sweep(SMOKE, "mesh=fsdp8;remat=full", out, compile_only=True, echo=lambda _: None)
  assert record["status"] == "ok" and record["mode"] == "compile"
  assert record["params_bytes"] > 0 and record["temp_bytes"] > 0 and record["peak_bytes"] > record["temp_bytes"]
  assert "tokens_per_s" not in record
  with open(os.path.join(out, "results.csv")) as f:
    (row,) = list(csv.DictReader(f))
  assert int(row["temp_bytes"]) > 0 and row["tokens_per_s"] == "" and row["step_s"] == ""
  assert os.path.exists(os.path.join(out, "memory.png")) and not os.path.exists(os.path.join(out, "tokens_per_s.png"))
  # A compile-only record satisfies another compile-only run, not one that wants timings.
  assert sweep.is_finished(record, compile_only=True, retry_failed=False)
  assert not sweep.is_finished(record, compile_only=False, retry_failed=False)


def test_point_timeout_is_recorded(tmp_path):
  point = sweep.expand_grid(sweep.parse_grid("mesh=data8"))[0]
  path = str(tmp_path / "p.json")
  record = sweep.run_point_process(point, SMOKE, [], path, compile_only=True, steps=1, warmup=0, devices=8,
                                   timeout=0.5)
  assert record["status"] == "timeout" and "--timeout=0.5s" in record["reason"]
  assert sweep.is_finished(record, True, retry_failed=False) and not sweep.is_finished(record, True, retry_failed=True)


def test_markdown_and_sweep_wide_peak():
  ok = {"mesh": "data8", "status": "ok", "rules": "dp", "params_bytes": 2 * 2**20, "optimizer_bytes": 4 * 2**20,
        "temp_bytes": 2**20, "peak_bytes": 7 * 2**20, "step_s": 0.5, "tokens_per_s": 1000.0, "model_tflops": 1.0,
        "mfu": 0.5, "peak_source": "measured 1x1x1 float32 matmul on cpu"}
  slow_peak = {**ok, "mesh": "fsdp8", "mfu": 2.0}   # its own peak measured at 0.5 TFLOP/s: MFU 200%
  bad = {"mesh": "tensor8", "status": "invalid", "reason": "heads | cannot be split"}
  fixed = sweep_report.with_sweep_peak([ok, slow_peak, bad])
  assert [r.get("mfu") for r in fixed] == [0.5, 0.5, None] and fixed[1]["mfu_own_peak"] == 2.0
  table = sweep_report.markdown_table(fixed, ["mesh"])
  assert "| data8 | ok | dp | 6.00 | 1.00 | 7.00 | 500 | 1,000 | 50.0% |  |" in table
  assert "| tensor8 | invalid |" in table and "heads / cannot be split" in table


def test_command_line_refuses_bad_input(tmp_path):
  out = str(tmp_path / "cli")
  command = [sys.executable, "-m", "launch.sweep", "--config", SMOKE, "--out", out]
  bad_grid = subprocess.run([*command, "--grid", "mesh=gpu8"], capture_output=True, text=True, cwd=ROOT)
  assert bad_grid.returncode == 2 and bad_grid.stderr.startswith("error: ")
  assert "is not an axis and a size" in bad_grid.stderr and "Traceback" not in bad_grid.stderr
  bad_flag = subprocess.run([*command, "--grid", "mesh=data8", "--colour", "red"], capture_output=True, text=True,
                            cwd=ROOT)
  assert bad_flag.returncode != 0 and "colour" in bad_flag.stderr and not os.path.exists(out)
