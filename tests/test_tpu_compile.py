"""Compiling for a TPU slice from this CPU host: launch/run/topology.py, launch/measure/aot.py,
launch.compile, launch.memory --topology, the plan for topology devices (launch/run/plan.py).

The TPU compiler (libtpu, the `tpu` extra) compiles a tiny model's train step for 8 chips of a
v5p:2x2x2 slice under every rule preset, sequence parallelism (ring attention with splash inside its
blocks) and a pipeline included; each preset is compiled once (module-scoped cache). Checked: the
plan makes a TPU's choices without the Pallas interpreter; the compiled HLO holds a Mosaic kernel
exactly where the plan says splash; parameter bytes per chip equal the closed-form count over the
shards; a model too big for the chip stops with one `error: ... does not fit` line, and the command
prints none of libtpu's warnings.
"""

import os
import platform
import subprocess
import sys

import pytest

if not (sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")):
  pytest.skip("libtpu (the TPU compiler) is published for Linux x86_64 only", allow_module_level=True)

from configs.smoke import get_config  # noqa: E402
from launch.measure.aot import compile_programs, state_bytes  # noqa: E402
from launch.measure.step_estimate import attention_kernel_flops  # noqa: E402
from launch.run.config import validate, with_overrides  # noqa: E402
from launch.run.plan import make_plan  # noqa: E402
from launch.run.topology import libtpu_installed, topology_devices  # noqa: E402
from sharding.rules import EXAMPLE_MESHES_8  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5p:2x2x2"  # 8 chips, like the presets' example meshes
# Two layers of 128-wide heads (4, so tensor=4 splits them): splash tiles 128 tokens, and every
# sequence below is whole tiles.
SHAPE = {"model.vocab_size": 256, "model.num_layers": 2, "model.d_model": 128, "model.num_heads": 4,
         "model.num_kv_heads": 4, "model.head_dim": 128, "model.mlp_dim": 256, "model.max_seq_len": 2048,
         "model.dtype": "bfloat16", "train.global_batch_size": 8}
# Pipeline: 2 stages x 4 data, 2 micro-batches.
STAGE = dict(stage=2, data=4, fsdp=1, sequence=1, tensor=1)
CASES = {**{rules: (rules, mesh) for rules, mesh in EXAMPLE_MESHES_8.items()}, "stage": ("dp", STAGE),
         # sp over 4 (not 8) sequence shards: 1024 tokens instead of 2048 keeps the compile short.
         "sp": ("sp", dict(stage=1, data=2, fsdp=1, sequence=4, tensor=1))}


def test_libtpu_is_installed():
  assert libtpu_installed(), "the tpu extra is missing: pip install -e '.[tpu]' (make test installs it)"


def make_config(rules: str, mesh: dict, **changes):
  seq = 256 * mesh["sequence"]  # the ring gives each device 2 chunks; splash wants 128-token tiles
  overrides = {**SHAPE, "data.seq_len": seq, "mesh.rules": rules,
               **{f"mesh.{axis}": size for axis, size in mesh.items()}, **changes}
  if mesh["stage"] > 1:
    overrides["train.microbatches"] = 2
  return validate(with_overrides(get_config(), overrides))


@pytest.fixture(scope="module")
def devices():
  return topology_devices(TOPOLOGY)


@pytest.fixture(scope="module")
def compiled(devices):
  """case -> (plan, train report), each compiled once for the whole module."""
  cache = {}

  def get(case):
    if case not in cache:
      plan = make_plan(make_config(*CASES[case]), devices, platform="tpu")
      cache[case] = plan, compile_programs(plan, ("train",))[0]
    return cache[case]
  return get


def test_topology_devices_are_tpus_and_the_plan_compiles_splash_not_its_interpreter(devices):
  assert len(devices) == 8 and {d.platform for d in devices} == {"tpu"}
  assert devices[0].device_kind == "TPU v5"
  plan = make_plan(make_config("fsdp_sp", EXAMPLE_MESHES_8["fsdp_sp"]), devices, platform="tpu")
  assert plan.platform == "tpu" and not plan.attention.interpret
  assert plan.attention.full.implementation == "splash"
  assert plan.attention.ring_block.implementation == "splash"


@pytest.mark.parametrize("case", list(CASES))
def test_every_preset_compiles_for_the_slice_with_splash_where_planned(case, compiled):
  plan, train = compiled(case)
  splash = (plan.attention.ring_block if plan.sequence.shards > 1 else plan.attention.full).implementation
  assert splash == "splash"
  assert train.mosaic_kernels > 0  # splash's forward and backward, compiled by Mosaic
  params_b, opt_b = state_bytes(plan)
  assert train.argument_bytes >= params_b + opt_b > 0
  assert 0 < train.total_bytes < 95 * 2**30
  if plan.sequence.shards > 1:
    assert train.collectives["collective-permute"]["count"] > 0  # the ring passes K/V blocks


@pytest.mark.parametrize("case,shards", [("dp", 1), ("fsdp", 8), ("tp", 4)])
def test_parameter_bytes_per_chip_are_the_closed_form_count_over_the_shards(case, shards, compiled):
  plan, _ = compiled(case)
  m = plan.cfg.model
  if case == "tp":  # tensor splits heads, MLP and vocabulary; norms stay whole
    d, h, k, f, v, layers = m.d_model, m.num_heads, m.head_dim, m.mlp_dim, m.vocab_size, m.num_layers
    embeddings = 1 if m.tie_embeddings else 2
    split = layers * (2 * d * h * k + 2 * d * m.num_kv_heads * k + 3 * d * f) + embeddings * v * d
    expected = (split / shards + (m.num_params() - split)) * 4
  else:
    expected = m.num_params() * 4 / shards  # float32 storage
  assert state_bytes(plan)[0] == expected


def test_data_parallel_collectives_are_the_closed_form_gradient_all_reduce(compiled):
  # Replicated parameters: one all-reduce of every gradient, 2 * bytes * (n - 1) / n per chip
  # (launch/measure/collectives.py), nothing gathered. The block matmuls' weight gradients come out of
  # bfloat16 matmuls and XLA sums them before the cast to float32: 2 bytes each; the embedding and
  # the norms' gradients are float32. Plus one float32 scalar.
  plan, train = compiled("dp")
  m, n = plan.cfg.model, plan.num_devices
  d, k = m.d_model, m.head_dim
  block_matmuls = m.num_layers * (2 * d * m.num_heads * k + 2 * d * m.num_kv_heads * k + 3 * d * m.mlp_dim)
  sent = 2 * (n - 1) / n * (2 * block_matmuls + 4 * (m.num_params() - block_matmuls) + 4)
  assert train.collectives["all-reduce"]["bytes"] == pytest.approx(sent, abs=8)
  assert train.collectives["all-gather"]["bytes"] == 0


def test_xla_attention_compiles_no_mosaic_kernel(devices):
  # 192 tokens are not whole splash tiles: `auto` plans XLA, and the compiled step has no Mosaic call.
  plan = make_plan(make_config("dp", EXAMPLE_MESHES_8["dp"], **{"data.seq_len": 192}), devices, platform="tpu")
  assert plan.attention.full.implementation == "xla"
  assert compile_programs(plan, ("train",))[0].mosaic_kernels == 0


def test_xla_prices_splash_at_nothing_so_the_estimate_adds_the_kernels_it_runs(devices, compiled):
  # The same step with XLA's attention: XLA counts its score matrix whole, 7 matmuls a layer (forward
  # QK^T and PV, QK^T again in the backward, which recomputes the scores under remat=none, and 4
  # backward), and nothing for the Mosaic kernels that replace them. cost_analysis prices the layer
  # scan's body once, so the difference is one layer's.
  plan, splash = compiled("fsdp")
  xla = compile_programs(make_plan(make_config("fsdp", EXAMPLE_MESHES_8["fsdp"], **{"model.attention": "xla"}),
                                   devices, platform="tpu"), ("train",))[0]
  cfg, m = plan.cfg, plan.cfg.model
  one_matmul = (2 * cfg.train.global_batch_size * cfg.data.seq_len ** 2 * m.num_heads * m.head_dim
                * m.num_layers / plan.num_devices)
  assert plan.cfg.model.remat == "none"
  assert xla.flops - splash.flops == pytest.approx(7 * one_matmul / m.num_layers, rel=0.05)
  # The kernels the compiled step runs, read through the layer scan's trip count: one forward and
  # one backward (dq, dkv) per layer, and a second forward per layer where remat recomputes it.
  layers = m.num_layers
  assert splash.splash_calls == {"fwd": layers, "dq": layers, "dkv": layers}
  full = compile_programs(make_plan(make_config("fsdp", EXAMPLE_MESHES_8["fsdp"], **{"model.remat": "full"}),
                                    devices, platform="tpu"), ("train",))[0]
  assert full.splash_calls == {"fwd": 2 * layers, "dq": layers, "dkv": layers}
  # 256 tokens are one splash block, computed whole: forward 2 matmuls, dq 3, dkv 4.
  assert attention_kernel_flops(splash, plan) == pytest.approx(9 * one_matmul)


def test_a_topology_sweep_marks_the_best_point_with_estimates_below_the_peak(tmp_path):
  from launch.measure.sweep import run_sweep
  base = [f"--config.{k}={v}" for k, v in {**SHAPE, "data.seq_len": 256, "mesh.rules": "fsdp",
                                           **{f"mesh.{a}": n for a, n in EXAMPLE_MESHES_8["fsdp"].items()}}.items()]
  records = run_sweep(os.path.join(REPO, "configs/smoke.py"), "remat=none,full", str(tmp_path), base, topology=TOPOLOGY)
  none, full = records
  assert [r["status"] for r in records] == ["ok", "ok"] and none["fits"] and full["fits"]
  for r in records:
    assert 0 < r["est_attention_s"] < r["est_step_s"] and 0 < r["est_mfu"] < 1
  assert full["est_attention_s"] > none["est_attention_s"]  # remat=full runs each splash forward twice
  table = (tmp_path / "estimates.md").read_text()
  assert table.count("**best**") == 1 and (tmp_path / "estimates.png").stat().st_size > 0


def test_eval_prefill_and_decode_compile(compiled):
  plan, _ = compiled("fsdp")
  reports = compile_programs(plan, ("eval", "prefill", "decode"))
  assert [r.name for r in reports] == ["eval", "prefill", "decode"]
  assert reports[1].mosaic_kernels > 0 and reports[2].mosaic_kernels == 0  # splash prefill, XLA decode
  assert all(r.total_bytes > 0 for r in reports)


BIG = ["--config.model.d_model=8192", "--config.model.num_layers=16", "--config.model.num_heads=64",
       "--config.model.num_kv_heads=8", "--config.model.head_dim=128", "--config.model.mlp_dim=28672",
       "--config.mesh.data=8", "--config.mesh.rules=dp", "--config.data.seq_len=256",
       "--config.model.max_seq_len=256"]


def test_a_model_too_big_for_the_chip_is_one_error_line_without_libtpu_noise():
  # ~13.6B parameters replicated on every chip: 16 bytes each (params, Adam, grads) is ~200 GiB.
  cmd = [sys.executable, "-m", "launch.compile", "--config", os.path.join(REPO, "configs/smoke.py"),
         f"--topology={TOPOLOGY}", "--programs=train", *BIG]
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "SHARDLM_TRACEBACK")}
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith("error: train step does not fit on TPU v5p (95 GiB HBM): the TPU compiler")


def test_bad_topology_names_are_one_line_errors(tmp_path):
  from launch.measure.sweep import run_sweep
  with pytest.raises(ValueError, match="is not a TPU topology name"):
    topology_devices("v5p-128")
  with pytest.raises(ValueError, match="is not a TPU topology name"):  # before any point runs
    run_sweep(os.path.join(REPO, "configs/smoke.py"), "mesh=data8", str(tmp_path / "sweep"), topology="v5p-128")
  assert not (tmp_path / "sweep").exists()
  with pytest.raises(ValueError, match="libtpu cannot describe this slice"):
    topology_devices("v5p:3x3x3")
  with pytest.raises(ValueError, match="mesh stage=1 x data=3"):
    make_plan(make_config("dp", dict(stage=1, data=3, fsdp=1, sequence=1, tensor=1)),
              topology_devices(TOPOLOGY), platform="tpu")


def test_two_slices_split_the_dcn_axis_across_slices():
  devices = topology_devices("v5p:2x2x1", num_slices=2)
  assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
  plan = make_plan(make_config("fsdp", dict(stage=1, data=1, fsdp=4, sequence=1, tensor=1),
                               **{"mesh.dcn_data": 2}), devices, platform="tpu")
  assert dict(plan.mesh.shape)["data"] == 2 and dict(plan.mesh.shape)["fsdp"] == 4
  grid = plan.mesh.devices.reshape(2, 4)  # data x fsdp: each data index is one whole slice
  assert [{d.slice_index for d in row} for row in grid] == [{0}, {1}]


def test_the_estimate_check_refuses_an_unknown_remat_before_compiling(tmp_path):
  cmd = [sys.executable, "-m", "launch.reproduce.tpu_estimate", "--config", os.path.join(REPO, "configs/smoke.py"),
         "--remats=none,sometimes", f"--out={tmp_path / 'out'}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr[-2000:]
  assert proc.stderr.startswith("error: model.remat='sometimes' is not a remat policy")
  assert not (tmp_path / "out").exists()


def test_the_smoke_configs_tpu_plan_computes_in_bfloat16_and_its_estimate_stays_below_the_peak(monkeypatch):
  """The plan of configs/smoke.py for a v5p slice, made on this CPU host, is a TPU's: model.dtype=auto
  computes in bfloat16, the MFU's peak is the chip's bf16 rate, and XLA's estimate of the 2-layer step
  (compiled again with the layers unrolled: the loop extrapolation is known to be far off for tiny
  models) gives an MFU in (0, 100%]."""
  from launch.measure.step_estimate import train_estimate
  from launch.run.throughput import plan_peak
  devices = topology_devices("v5p:2x2x1")
  plan = make_plan(validate(get_config()), devices, platform="tpu")
  assert plan.cfg.model.dtype == "bfloat16" and "compute bfloat16" in plan.describe()[1]
  peak, source = plan_peak(plan)
  assert peak == 459e12 * 4 and "TPU v5p spec sheet" in source
  train = compile_programs(plan, ("train",))[0]
  estimate = train_estimate(train, plan)
  assert estimate["method"] == "compiled again with its 2 layers unrolled"
  assert 0 < estimate["mfu"] <= 1
  # A step time that would claim more than the peak (a cost model gone wrong) is not given, and says why.
  from launch.measure import step_estimate
  monkeypatch.setattr(step_estimate, "estimated_step_seconds",
                      lambda report, plan: (estimate["step_s"] / 1e3, "a test"))
  impossible = step_estimate.train_estimate(train, plan)
  assert impossible["step_s"] is None and "which no program reaches" in impossible["why"]
