"""The benchmark tooling: MFU arithmetic, the written table, and the profile's op classification."""

import csv

import jax
import jax.numpy as jnp
import pytest

from configs.smoke import get_config
from launch.measure import timing as bench
from launch.measure.tables import write_table
from launch.run.config import validate
from launch.measure.profile import classify_ops, summarize_trace


def test_bench_row_reports_consistent_numbers(tmp_path):
  cfg = validate(get_config())
  row, compiled = bench.bench_row("smoke", bench.variant(cfg, "float32"), steps=2, warmup=1)
  tokens = cfg.train.global_batch_size * cfg.data.seq_len
  assert row["tokens_per_s"] == pytest.approx(tokens / row["step_s"])
  assert row["mfu"] == pytest.approx(row["model_tflops"] / row["peak_tflops"])
  assert 0 < row["mfu"] < 1.5 and row["devices"] == 1
  write_table([row], str(tmp_path), "bench", "t", "cmd")
  with open(tmp_path / "bench.csv") as f:
    header = next(csv.reader(f))
  for column in ("config", "devices", "dtype", "step_s", "tokens_per_s", "model_tflops", "peak_tflops", "mfu"):
    assert column in header


def test_profile_summary_finds_the_matmul(tmp_path):
  f = jax.jit(lambda a, b: jnp.tanh(a @ b) * 2.0)
  a = jnp.ones((256, 256))
  compiled = f.lower(a, a).compile()
  kinds = classify_ops(compiled.as_text())
  assert "matmul" in kinds.values()
  compiled(a, a).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(3):
      compiled(a, a).block_until_ready()
  summary = summarize_trace(str(tmp_path), compiled.as_text())
  assert summary["share"].get("matmul", 0) > 0
  assert sum(summary["share"].values()) == pytest.approx(1.0)
