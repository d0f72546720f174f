"""The benchmark tooling: MFU arithmetic, the written table, and the profile's op classification."""

import csv
import dataclasses

import jax
import jax.numpy as jnp
import pytest

from configs.smoke import get_config
from launch.measure import timing as bench
from launch.measure.tables import write_table
from launch.run import chips
from launch.run.config import validate
from launch.run.throughput import table_peak_flops
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


# ---- launch/measure/decode.py ---------------------------------------------------------------------

def test_decode_row_measures_a_tiny_model_and_sizes_its_floor():
  from launch.measure import decode as decode_lib
  from launch.run.config import model_config
  from launch.run.plan import config_for_model
  cfg = model_config(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     mlp_dim=64, max_seq_len=32, dtype="float32")
  # Closed forms: 2 (k, v) x layers x batch x length x kv_heads x head_dim x 4 bytes.
  assert decode_lib.kv_cache_bytes(cfg, 3, 10) == 2 * 2 * 3 * 10 * 2 * 8 * 4
  matmul_params = 2 * (32 * 8 * (2 * 4 + 2 * 2) + 3 * 32 * 64) + 64 * 32
  assert decode_lib.decode_flops(cfg, 2, 5.0) == 2 * (2 * matmul_params + 4 * 2 * 4 * 8 * 5.0)
  float_v, int8_v = decode_lib.make_variants(config_for_model(cfg), ["float", "w8a8"])
  assert decode_lib.weight_read_bytes(cfg, float_v.params) == cfg.num_params() * 4
  assert decode_lib.weight_read_bytes(int8_v.cfg, int8_v.params) < cfg.num_params() * 4 / 3
  row, _ = decode_lib.decode_row(int8_v, 2, 4, 3, bandwidth=1e9, matmul_flops=1e9, repeats=1)
  assert row["floor_ms"] == max(row["memory_floor_ms"], row["compute_floor_ms"])
  assert row["decode_ms_tok"] > 0 and row["x_floor"] == pytest.approx(row["decode_ms_tok"] / row["floor_ms"])
  with pytest.raises(ValueError, match="weights mode"):
    decode_lib.make_variants(config_for_model(cfg), ["w4a16"])
  # An int8 KV cache: 1 byte per value plus a float32 scale per (token, kv head).
  cfg8 = dataclasses.replace(cfg, kv_cache_dtype="int8")
  assert decode_lib.kv_cache_bytes(cfg8, 3, 10) == 2 * 2 * 3 * 10 * 2 * (8 + 4)
  [kv8_v] = decode_lib.make_variants(config_for_model(cfg8), ["float"])
  assert kv8_v.name == "float float32 + int8 KV"
  row, _ = decode_lib.decode_row(kv8_v, 2, 4, 3, bandwidth=1e9, matmul_flops=1e9, repeats=1)
  assert row["kv_cache_MB"] == decode_lib.kv_cache_bytes(cfg8, 2, 4 + 3 + 1) / 1e6


def test_time_interleaved_runs_every_workload_once_per_round():
  calls = []
  runs = {name: (lambda name=name: calls.append(name)) for name in ("teacher", "student")}
  times = bench.time_interleaved(runs, rounds=3, warmup=2)
  # Warm-up per workload first, then rounds that alternate: a round's calls share the same load.
  assert calls == ["teacher"] * 2 + ["student"] * 2 + ["teacher", "student"] * 3
  assert {k: len(v) for k, v in times.items()} == {"teacher": 3, "student": 3}
  # The median of per-round ratios, not the ratio of medians (here 0.5 vs 0.6 / 1.5 = 0.4).
  assert bench.median_ratio([0.5, 0.6, 1.0], [1.0, 1.5, 2.0]) == pytest.approx(0.5)
  with pytest.raises(ValueError):
    bench.median_ratio([1.0], [1.0, 2.0])


@pytest.mark.parametrize("device_kind,name", [
    ("TPU v4", "TPU v4"), ("TPU v5 lite", "TPU v5e"), ("TPU v5", "TPU v5p"), ("TPU v5p", "TPU v5p"),
    ("TPU v6 lite", "TPU v6e"), ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("cpu", None), ("TPU v3", None)])
def test_one_chip_table_feeds_the_peak_and_the_bandwidth(device_kind, name):
  # jax says "TPU v5" for a v5p and "TPU v5 lite" for a v5e: the longest prefix must win.
  from launch.measure import decode as decode_lib
  chip = chips.chip_for(device_kind)
  assert (chip.name if chip else None) == name
  if chip:
    assert table_peak_flops(device_kind, "bfloat16") == chip.bf16_tflops * 1e12
    assert decode_lib.table_bandwidth(device_kind) == chip.hbm_gbs * 1e9
  else:
    assert table_peak_flops(device_kind, "bfloat16") is None and decode_lib.table_bandwidth(device_kind) is None


def test_chip_numbers_are_the_spec_sheets():
  v5p = chips.chip_named("TPU v5p")
  assert (v5p.bf16_tflops, v5p.hbm_gib, v5p.hbm_gbs) == (459.0, 95.0, 2765.0)
  assert table_peak_flops("TPU v5 lite", "float32") is None  # TPUs: no separate fp32 rate
  assert table_peak_flops("NVIDIA H100 80GB HBM3", "float32") == 67e12
  assert len({c.name for c in chips.CHIPS}) == len(chips.CHIPS)
  with pytest.raises(KeyError, match="no chip named 'TPU v9'"):
    chips.chip_named("TPU v9")


def test_time_calls_warms_up_then_times_each_call_waiting_for_its_result():
  calls = []
  times = bench.time_calls(lambda: calls.append(len(calls)) or jnp.ones(3) * len(calls), repeats=4, warmup=2)
  assert len(calls) == 6 and len(times) == 4 and all(t >= 0 for t in times)
  assert bench.call_seconds(lambda: None) >= 0
