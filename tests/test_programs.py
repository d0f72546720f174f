"""launch/run/programs.py: every program comes from the plan, and what is compiled ahead of time is what runs.

- The prefill and decode programs `launch.compile` compiles for 8 devices have the same HLO as the ones
  `launch.generate` runs on those devices (one builder, the same shardings).
- Generation from a checkpoint under fsdp x tensor on 8 devices gives the tokens one device gives, each
  device holding its share of the serving parameters; the command prints that share, and the test
  checks it against the rule table and the arrays themselves.
- A model whose plan splits the sequence refuses to run in a program that installs no way across the
  shards (the ring's kernel, strategy and layout are the model's own, never a hook's).
"""

import dataclasses
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.smoke import get_config
from launch.generate import serving_line
from launch.measure import aot
from launch.run import loop, programs
from launch.run.config import validate, with_overrides
from launch.run.plan import make_plan
from launch.run.restore import load_checkpoint
from sharding import rules as rules_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE_MESH = {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 4, "mesh.rules": "fsdp_tp"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A 2-step smoke run on 8 devices (data parallel), the checkpoint generation reads."""
  root = tmp_path_factory.mktemp("programs")
  c = get_config()
  c.data.data_dir = str(root / "data")
  c.model.num_kv_heads = 4  # 4 kv heads split over tensor=4
  c.train.update(dict(steps=2, eval_batches=1, tensorboard=False))
  c.checkpoint.async_save = False
  result = loop.train(validate(c), str(root / "run"))
  return result.checkpoint_dir


def test_compile_and_generate_run_the_same_prefill_and_decode_programs(checkpoint, monkeypatch):
  loaded = load_checkpoint(checkpoint, overrides=SERVE_MESH)
  plan = loaded.plan
  # What launch.compile compiles: record each program's HLO as it is lowered.
  compiled = {}
  real_compile = aot._compile
  monkeypatch.setattr(aot, "_compile", lambda plan_, name, lower: (
      compiled.__setitem__(name, lower().as_text()) or real_compile(plan_, name, lower)))
  aot.compile_programs(plan, ("prefill", "decode"), check_fit=False)
  # What launch.generate runs, at the shape launch.compile compiles for (greedy, no stop id, as there).
  ran = {}
  real_call = programs.Program.__call__

  def recording(self, *args):
    name = "prefill" if len(args) == 3 else "decode"
    ran[name] = self.lower(*args).as_text()
    return real_call(self, *args)

  monkeypatch.setattr(programs.Program, "__call__", recording)
  batch, prompt_len = plan.cfg.train.global_batch_size, aot.prompt_length(plan)
  params = programs.serving_params(plan, loaded.params)
  generate = programs.text_generator(plan, params, max_new_tokens=plan.cfg.data.seq_len - prompt_len)(())
  prompts = np.random.default_rng(0).integers(1, 100, (batch, prompt_len)).astype(np.int32)
  generate(prompts, jax.random.key(0), np.full((batch,), prompt_len, np.int32))
  assert set(compiled) == set(ran) == {"prefill", "decode"}
  for name in ("prefill", "decode"):
    if compiled[name] != ran[name]:
      import difflib
      a, b = compiled[name].replace(", ", ",\n").splitlines(), ran[name].replace(", ", ",\n").splitlines()
      print("\n".join(list(difflib.unified_diff(a, b, lineterm=""))[:40]))
    assert compiled[name] == ran[name], name
  assert "devices=[" in ran["prefill"] or "sharding" in ran["prefill"]  # a sharded program, not one device's


def _expected_bytes_per_device(plan) -> int:
  """Bytes of the serving parameters on one device, from the rule table: each dimension divided by
  the sizes of the mesh axes its logical name maps to."""
  mdef = programs.serving_mdef(plan)
  shapes = programs.abstract_serving_params(plan)
  total = 0
  for names, leaf in zip(jax.tree.leaves(mdef.logical_names, is_leaf=lambda x: isinstance(x, tuple)),
                         jax.tree.leaves(shapes)):
    spec = rules_lib.logical_to_spec(names, plan.rules)
    dims = []
    for size, axes in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      dims.append(size // math.prod(plan.mesh.shape[a] for a in axes))
    total += math.prod(dims) * leaf.dtype.itemsize
  return total


def test_generation_under_fsdp_tp_on_8_devices_equals_one_device(checkpoint):
  prompts = ["ROMEO.", "JULIET. What is", "To be"]  # 3 rows: padded to a multiple of the 2 fsdp shards
  one = load_checkpoint(checkpoint, overrides={"mesh.num_devices": 1})
  eight = load_checkpoint(checkpoint, overrides=SERVE_MESH)
  assert one.plan.num_devices == 1 and eight.plan.num_devices == 8
  assert dict(eight.plan.mesh.shape) == {"stage": 1, "data": 1, "fsdp": 2, "sequence": 1, "tensor": 4}
  texts = [loaded.generate(prompts, max_new_tokens=8, temperature=0.0) for loaded in (one, eight)]
  assert texts[0] == texts[1]
  # Each device holds its share of the serving parameters, as the rule table places them.
  params = programs.serving_params(eight.plan, eight.params)
  held = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(params))
  whole = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
  assert held == _expected_bytes_per_device(eight.plan) < whole / 4
  kernel = params["layers"][0]["mlp"]["up"]["kernel"]  # [embed, mlp]: fsdp x tensor
  assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 2, kernel.shape[1] // 4)
  line = serving_line(eight.plan)
  assert "mesh fsdp=2 x tensor=4, rules fsdp_tp" in line


def test_the_generate_command_serves_on_a_mesh_given_on_the_command_line(checkpoint):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "launch.generate", f"--checkpoint_dir={checkpoint}",
                        "--mesh=fsdp=2,tensor=4", "--rules=fsdp_tp", "--prompt=ROMEO.", "--temperature=0",
                        "--max_new_tokens=4"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  plan = load_checkpoint(checkpoint, overrides=SERVE_MESH).plan
  expected = serving_line(plan)
  assert expected in out.stderr
  printed = re.search(r"parameters ([\d.]+ \w+) per device", out.stderr).group(1)
  from launch.measure.memory import format_bytes
  assert printed == format_bytes(_expected_bytes_per_device(plan))
  assert out.stdout.startswith("ROMEO.")
  bad = subprocess.run([sys.executable, "-m", "launch.generate", f"--checkpoint_dir={checkpoint}",
                        "--mesh=tensor=8"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --mesh='tensor=8' needs --rules")
  assert "Traceback" not in bad.stderr


def test_a_sequence_split_model_refuses_a_program_without_the_way_across_shards():
  c = get_config()
  c.mesh.update(dict(rules="sp", data=1, sequence=8))
  plan = make_plan(validate(c))
  assert plan.mdef.attention.ring_block is not None and plan.mdef.attention.ring_layout == "zigzag"
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), plan.mdef.abstract_params)
  tokens = jax.ShapeDtypeStruct((8, plan.cfg.data.seq_len), jnp.int32)
  with pytest.raises(ValueError, match="installs no attention across sequence shards"):
    jax.eval_shape(lambda p, t: plan.mdef.bind(p)(t), params, tokens)
  # Built from the plan, the same model runs.
  out = programs.logits(plan).trace(params, tokens).out_info
  assert out.shape == (8, plan.cfg.data.seq_len, plan.cfg.model.vocab_size)


def test_model_dtype_auto_is_settled_for_the_target_not_the_host():
  cfg = validate(get_config())
  assert cfg.model.dtype == "auto"  # validation leaves it to the plan
  host = make_plan(cfg)
  described = make_plan(cfg, jax.devices(), platform="tpu")
  assert (host.cfg.model.dtype, described.cfg.model.dtype) == ("float32", "bfloat16")
  assert "compute bfloat16" in " ".join(described.describe())
  with pytest.raises(ValueError, match="settled for the target devices by the run plan"):
    _ = cfg.model.compute_dtype
  explicit = make_plan(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32")),
                       jax.devices(), platform="tpu")
  assert explicit.cfg.model.dtype == "float32"  # an explicit dtype is never changed


def test_eval_of_a_checkpoint_under_another_mesh_equals_one_device(checkpoint):
  from launch.run.evaluation import eval_checkpoint
  one = eval_checkpoint(checkpoint, eval_batches=1, overrides={"mesh.num_devices": 1})
  eight = eval_checkpoint(checkpoint, eval_batches=1, overrides=SERVE_MESH)
  assert eight["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
  assert one["step"] == eight["step"] == 2
