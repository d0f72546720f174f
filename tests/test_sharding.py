"""Every parallelism preset trains exactly like one device, and places each array where its rule says."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs.smoke import get_config
from launch.run import checkpoint as ckpt_lib
from launch.run import state as ts
from launch.run.config import validate
from launch.run.plan import make_plan
from launch.run import programs
from launch.run.step import batch_sharding
from lm.config import REMAT_POLICY_NAMES
from sharding import mesh as mesh_lib
from sharding import remat as remat_lib
from sharding import rules as rules_lib

VOCAB, STEPS = 512, 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(data=1, fsdp=1, tensor=1, rules="dp", num_devices=0, remat="none", **model):
  c = get_config()
  c.model.update(dict(vocab_size=VOCAB, d_model=64, num_heads=4, num_kv_heads=4, head_dim=16,
                      mlp_dim=128, remat=remat, **model))
  c.train.global_batch_size = 8
  c.mesh.update(dict(data=data, fsdp=fsdp, tensor=tensor, rules=rules, num_devices=num_devices))
  return validate(c)


def batches():
  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    tokens = rng.integers(0, VOCAB, (8, 65)).astype(np.int32)
    # Packed rows of several documents: the segment mask and restarted positions run under every preset.
    segment_ids = np.cumsum(rng.random((8, 64)) < 0.05, axis=1).astype(np.int32)
    yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids}


def run(cfg):
  """Trains STEPS steps from seed 0; returns (losses, final state, context)."""
  plan = make_plan(cfg)
  state = ts.init_train_state(plan.mdef, plan.tx, plan.shardings, seed=0)
  step = programs.train_step(plan)
  losses = []
  for batch in batches():
    state, metrics = step(state, jax.device_put(batch, batch_sharding(plan.mesh, plan.rules)))
    losses.append(float(metrics["loss"]))
  return losses, state, plan


@pytest.fixture(scope="module")
def single_device():
  return run(make_config(num_devices=1))


MESHES = [
    ("dp", dict(data=8)),
    ("fsdp", dict(fsdp=8)),
    ("fsdp", dict(data=2, fsdp=4)),
    ("tp", dict(data=2, tensor=4)),
    ("tp", dict(data=4, tensor=2)),
    ("fsdp_tp", dict(fsdp=2, tensor=4)),
    ("fsdp_tp", dict(fsdp=4, tensor=2)),
    ("dp_fsdp_tp", dict(data=2, fsdp=2, tensor=2)),
    ("dp_fsdp_tp", dict(data=2, fsdp=1, tensor=4)),
]

# What each preset does to four representative parameters (leading dim of blocks is `layers`).
GOLDEN = {
    "dp": {"query": P(None, None, None, None), "down": P(None, None, None), "table": P(None, None)},
    "fsdp": {"query": P(None, "fsdp", None, None), "down": P(None, None, "fsdp"), "table": P(None, "fsdp")},
    "tp": {"query": P(None, None, "tensor", None), "down": P(None, "tensor", None), "table": P("tensor", None)},
    "fsdp_tp": {"query": P(None, "fsdp", "tensor", None), "down": P(None, "tensor", "fsdp"),
                "table": P("tensor", "fsdp")},
}
GOLDEN["dp_fsdp_tp"] = GOLDEN["fsdp_tp"]


def _normalize(spec):
  return tuple(None if s is None else (s if isinstance(s, str) else tuple(s)) for s in spec) + (None,) * 4


@pytest.mark.parametrize("rules,axes", MESHES, ids=[f"{r}-{'-'.join(f'{k}{v}' for k, v in a.items())}" for r, a in MESHES])
def test_preset_matches_single_device_and_rule_table(rules, axes, single_device):
  reference, _, _ = single_device
  losses, state, plan = run(make_config(rules=rules, **axes))
  np.testing.assert_allclose(losses, reference, rtol=2e-5)

  # Placement, read back from the arrays themselves.
  params = state.params
  shard_of = lambda x: _normalize(x.sharding.spec)[:x.ndim]
  golden = GOLDEN[rules]
  assert shard_of(params["blocks"]["attention"]["query"]["kernel"]) == _normalize(golden["query"])[:4]
  assert shard_of(params["blocks"]["mlp"]["down"]["kernel"]) == _normalize(golden["down"])[:3]
  assert shard_of(params["embed"]["table"]) == _normalize(golden["table"])[:2]
  # Every parameter: the slice each device holds is the full shape divided by its mesh axes.
  mesh_shape = dict(plan.mesh.shape)
  names = jax.tree.leaves(plan.mdef.logical_names, is_leaf=lambda x: isinstance(x, tuple))
  table = dict(rules_lib.get_rules(rules))
  for names_, array in zip(names, jax.tree.leaves(params)):
    local = array.addressable_shards[0].data.shape
    used, expected = set(), []
    for size, name in zip(array.shape, names_):
      axes_ = [a for a in table.get(name, ()) if a not in used]
      used.update(axes_)
      expected.append(size // math.prod(mesh_shape[a] for a in axes_))
    assert local == tuple(expected), (names_, array.shape, local)


def _device_bytes(tree):
  return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def _total_bytes(tree):
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_fsdp8_holds_one_eighth_of_params_and_optimizer_state():
  plan = make_plan(make_config(rules="fsdp", fsdp=8))
  state = ts.init_train_state(plan.mdef, plan.tx, plan.shardings, seed=0)
  for tree in (state.params, state.opt_state):
    total, local = _total_bytes(tree), _device_bytes(tree)
    # Only optax's scalar step counters are replicated ("within padding").
    assert local == pytest.approx(total / 8, abs=64), (total, local)


def test_tensor4_splits_the_sharded_weights_four_ways():
  plan = make_plan(make_config(rules="tp", data=2, tensor=4))
  state = ts.init_train_state(plan.mdef, plan.tx, plan.shardings, seed=0)
  split_names = {"heads", "kv_heads", "mlp", "vocab"}
  names = jax.tree.leaves(plan.mdef.logical_names, is_leaf=lambda x: isinstance(x, tuple))
  for names_, array in zip(names, jax.tree.leaves(state.params)):
    local = array.addressable_shards[0].data.nbytes
    assert local == (array.nbytes // 4 if split_names & set(names_) else array.nbytes), names_


def step_temp_bytes(remat: str) -> int:
  """Compiled temporaries of the train step, from `launch.memory` in its own process (it sets the
  CPU scheduler flag that makes memory_analysis honour remat; see tests/conftest.py)."""
  overrides = dict(vocab_size=VOCAB, d_model=64, num_heads=4, num_kv_heads=4, head_dim=16, mlp_dim=128,
                   num_layers=4, remat=remat)
  cmd = [sys.executable, "-m", "launch.memory", "--config", os.path.join(REPO, "configs/smoke.py"),
         "--devices", "1", "--json", "--config.mesh.num_devices=1", "--config.mesh.data=1",
         "--config.train.global_batch_size=8", *[f"--config.model.{k}={v}" for k, v in overrides.items()]]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(cmd, cwd=REPO, env={**env, "PYTHONPATH": REPO}, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])["temp_bytes"]


def test_full_remat_lowers_temporary_memory_and_keeps_gradients():
  temp_none, temp_full = step_temp_bytes("none"), step_temp_bytes("full")
  assert temp_full < 0.8 * temp_none, (temp_full, temp_none)

  kw = dict(num_devices=1, num_layers=4, max_seq_len=64)
  plan_none = make_plan(make_config(remat="none", **kw))
  plan_full = make_plan(make_config(remat="full", **kw))

  params = ts.init_train_state(plan_none.mdef, plan_none.tx, plan_none.shardings, seed=0).params
  batch = next(batches())

  def grads(mdef):
    def loss(p):
      logits = mdef.bind(p)(batch["inputs"])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1))
    return jax.jit(jax.grad(loss))(params)

  for a, b in zip(jax.tree.leaves(grads(plan_none.mdef)), jax.tree.leaves(grads(plan_full.mdef))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_checkpoint_saved_under_fsdp8_restores_under_dp2_tensor4(tmp_path):
  _, state, plan = run(make_config(rules="fsdp", fsdp=8))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  checkpointer.save(STEPS, state, {"data_state": None, "config": {}})
  checkpointer.close()
  other = make_plan(make_config(rules="tp", data=2, tensor=4))
  restored, meta = ckpt_lib.Checkpointer(str(tmp_path), read_only=True).restore_state(
      ts.abstract_state(other.mdef, other.tx, other.shardings))
  assert meta["step"] == STEPS and int(restored.step) == STEPS
  for a, b, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(restored), jax.tree.leaves(other.shardings)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert b.sharding.is_equivalent_to(sharding, b.ndim)


def test_custom_rule_table_and_its_errors():
  c = make_config(data=2, tensor=4).to_dict()
  c["mesh"]["custom_rules"] = "batch=data+fsdp,mlp=tensor"
  plan = make_plan(validate(c))
  assert plan.shardings.params["blocks"]["mlp"]["up"]["kernel"].spec == P(None, None, "tensor")
  assert plan.shardings.params["blocks"]["attention"]["query"]["kernel"].spec == P(None, None, None, None)
  c["mesh"]["custom_rules"] = "hidden=tensor"
  with pytest.raises(ValueError, match="names 'hidden', which the model does not use"):
    validate(c)
  c["mesh"]["custom_rules"] = "mlp=model"
  with pytest.raises(ValueError, match="'model', which is not a mesh axis"):
    validate(c)


def test_dcn_axes_need_as_many_slices_as_they_ask_for():
  assert mesh_lib.num_granules(jax.devices()) == (1, "hosts")
  with pytest.raises(ValueError, match="asks for 2 slices/hosts but the 8 devices span 1 hosts"):
    mesh_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 1}, jax.devices(), {"data": 2, "fsdp": 1, "tensor": 1})


def test_memory_planner_says_whether_the_step_fits():
  from launch.measure.memory import fit_verdict
  gib = 2 ** 30
  assert fit_verdict(100 * gib, "H200", 139 * gib).startswith("fits on H200 (139.0 GiB): peak estimate 100.0 GiB")
  assert fit_verdict(150 * gib, "H200", 139 * gib).startswith("does not fit on H200 (139.0 GiB)")


def test_layout_command_simulates_its_devices_before_anything_starts_jax(tmp_path):
  # Without XLA_FLAGS (as `make reproduce` runs it): the config's dtype "auto" asks jax for its
  # backend while validating, so the 8 simulated devices must be set before the config is read.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  png = tmp_path / "layout.png"
  cmd = [sys.executable, "-m", "launch.layout", "--config", os.path.join(REPO, "configs/smoke.py"),
         "--config.model.dtype=auto", "--config.mesh.rules=fsdp", "--config.mesh.data=1",
         "--config.mesh.fsdp=8", f"--png={png}"]
  out = subprocess.run(cmd, cwd=REPO, env={**env, "PYTHONPATH": REPO}, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "'fsdp': 8" in out.stdout and png.stat().st_size > 0


def test_remat_policies_are_the_names_model_remat_accepts():
  # lm/config.py declares model.remat's choices without importing sharding/; the two lists must agree.
  assert tuple(remat_lib.REMAT_POLICIES) == REMAT_POLICY_NAMES
