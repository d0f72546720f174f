"""Pruning: exact mask counts, zeros that survive optimizer updates, the schedule, clear errors, a run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compress import prune as pruning
from configs.smoke import get_config
from launch.run import state as ts
from launch.run.config import validate
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib
from launch.run.plan import make_plan


def smoke(data_dir=None, **prune):
  c = get_config()
  c.train.tensorboard = False
  if data_dir:
    c.data.data_dir = data_dir
  for key, value in prune.items():
    c.prune[key] = value
  return validate(c)


@pytest.fixture(scope="module")
def model():
  """(config, layouts, random params): a tiny model whose weights have no exact zeros."""
  cfg = smoke(method="magnitude")
  layouts = pruning.kernel_layouts(cfg.model, m=4)
  params = ts.init_params(make_plan(cfg).mdef, jax.random.key(0))
  return cfg, layouts, params


def test_only_matmul_kernels_are_prunable(model):
  _, layouts, _ = model
  flat = {jax.tree_util.keystr(p): l for p, l in jax.tree_util.tree_leaves_with_path(layouts)}
  assert not flat["['embed']['table']"].prunable
  assert not flat["['final_norm']['scale']"].prunable
  assert not flat["['blocks']['mlp_norm']['scale']"].prunable
  assert flat["['blocks']['attention']['out']['kernel']"] == pruning.KernelLayout(True, lead=1, num_in=2)
  assert flat["['blocks']['mlp']['down']['kernel']"] == pruning.KernelLayout(True, lead=1, num_in=1)


def test_two_four_masks_keep_exactly_two_of_every_four_inputs(model):
  _, layouts, params = model
  two_four = smoke(method="n_m", n=2, m=4).prune
  pruned, masks = jax.jit(lambda p: pruning.one_shot(p, layouts, two_four))(params)
  leaves = zip(jax.tree.leaves(params), jax.tree.leaves(pruned), jax.tree.leaves(masks),
               jax.tree.leaves(layouts))
  for w, p, mask, layout in leaves:
    if not layout.prunable:
      assert bool(jnp.all(mask)) and bool(jnp.all(p == w))
      continue
    in_size = int(np.prod(p.shape[layout.lead:layout.lead + layout.num_in]))
    groups = np.asarray(p).reshape(p.shape[0], in_size // 4, 4, -1)   # [layers, groups, 4, outputs]
    assert np.all(np.sum(groups != 0, axis=2) == 2)
    # The two kept are the two largest of their group.
    w = np.abs(np.asarray(w)).reshape(groups.shape)
    kept_min = np.min(np.where(groups != 0, w, np.inf), axis=2)
    dropped_max = np.max(np.where(groups == 0, w, -np.inf), axis=2)
    assert np.all(kept_min >= dropped_max)
  assert pruning.n_m_violations(pruned, layouts, 2, 4) == 0
  assert pruning.n_m_violations(params, layouts, 2, 4) > 0


def test_magnitude_mask_prunes_exactly_the_smallest_per_layer():
  w = jax.random.normal(jax.random.key(1), (3, 8, 10))  # 3 stacked layers of an [8, 10] kernel
  layout = pruning.KernelLayout(True, lead=1, num_in=1)
  mask = np.asarray(pruning.magnitude_mask(jnp.abs(w), jnp.float32(0.3), layout))
  for layer in range(3):
    assert np.sum(~mask[layer]) == 24                      # floor(0.3 * 80)
    a = np.abs(np.asarray(w[layer]))
    assert a[~mask[layer]].max() < a[mask[layer]].min()


def test_cubic_schedule():
  progress = functools.partial(pruning.schedule_progress, start=10, end=20)
  assert float(progress(jnp.int32(0))) == 0.0
  assert float(progress(jnp.int32(10))) == 0.0
  assert float(progress(jnp.int32(15))) == pytest.approx(1 - 0.5 ** 3)
  assert float(progress(jnp.int32(20))) == 1.0 and float(progress(jnp.int32(99))) == 1.0
  assert float(pruning.schedule_progress(jnp.int32(0), 0, 0)) == 1.0   # start == end: one shot


@pytest.mark.parametrize("method,target", [("magnitude", 0.5), ("n_m", 0.5)])
def test_pruned_weights_stay_exactly_zero_through_updates(model, method, target):
  """AdamW + weight decay + the pruning transformation, sharded FSDP over 8 devices, 8 updates."""
  cfg, _, _ = model
  prune_cfg = smoke(method=method, sparsity=target, start_step=0, end_step=4, frequency=2).prune
  layouts = pruning.kernel_layouts(cfg.model, m=4)
  mdef = make_plan(cfg).mdef  # the model as the host's plan computes it
  tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), pruning.pruning(prune_cfg, layouts))
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}, jax.devices())
  rules = rules_lib.get_rules("fsdp")
  shardings = ts.state_shardings(mdef, tx, mesh, rules)
  state = ts.init_train_state(mdef, tx, shardings, seed=0)
  # Masks live in the optimizer state, sharded like their parameter.
  query_mask = state.opt_state[-1].masks["blocks"]["attention"]["query"]["kernel"]
  assert query_mask.sharding == shardings.params["blocks"]["attention"]["query"]["kernel"]
  assert "fsdp" in str(query_mask.sharding.spec)

  @functools.partial(jax.jit, out_shardings=shardings, donate_argnums=0)
  def update(state, key):
    grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape), state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)

  previous_zeros = None
  sparsities = []
  for i in range(8):
    state = update(state, jax.random.key(i))
    mask = np.asarray(state.opt_state[-1].masks["blocks"]["attention"]["query"]["kernel"])
    kernel = np.asarray(state.params["blocks"]["attention"]["query"]["kernel"])
    assert np.all(kernel[~mask] == 0.0), f"update {i}: a pruned weight moved"
    zeros = kernel == 0.0
    if previous_zeros is not None:
      assert np.all(zeros[previous_zeros]), f"update {i}: a pruned weight came back"
    previous_zeros = zeros
    sparsities.append(pruning.sparsity_report(state.params, layouts)["pruned_kernels"])
  assert sparsities == sorted(sparsities)                  # the cubic ramp only goes up
  assert sparsities[0] == 0.0                              # update 0: progress 0
  assert sparsities[-1] == pytest.approx(target, abs=1e-6)
  report = pruning.sparsity_report(state.params, layouts)
  assert all(report[k] == pytest.approx(target, abs=1e-6) for k in report if k.startswith("blocks/"))
  assert report["all_params"] < target                     # embedding and norms are untouched
  if method == "n_m":
    assert pruning.n_m_violations(state.params, layouts, 2, 4) == 0


@pytest.mark.parametrize("key,value,message", [
    ("sparsity", 1.0, r"prune.sparsity=1.0: must be in \[0, 1\)"),
    ("sparsity", -0.1, r"prune.sparsity=-0.1"),
    ("method", "random", "prune.method='random'"),
    ("n", 4, "need 0 < n < m"),
    ("end_step", 20, "prune.end_step=20 is not before train.steps=20"),
])
def test_bad_prune_config_is_named(key, value, message):
  with pytest.raises(ValueError, match=message):
    smoke(**{"method": "magnitude", key: value})


def test_group_size_that_does_not_divide_inputs_is_named(model):
  cfg, _, _ = model
  with pytest.raises(ValueError, match="not a multiple of prune.m=5"):
    pruning.kernel_layouts(cfg.model, m=5)


def test_prune_run_saves_a_sparse_ordinary_checkpoint(tmp_path_factory):
  """launch.prune fine-tunes from a checkpoint; launch.eval reads the result; sparsity is measured."""
  from launch.run.evaluation import eval_checkpoint
  from compress.prune_run import prune, prune_one_shot
  from launch.run.loop import train

  data_dir = str(tmp_path_factory.mktemp("data"))
  base = get_config()
  base.data.data_dir, base.train.steps, base.train.tensorboard = data_dir, 2, False
  base.train.eval_batches, base.checkpoint.async_save = 1, False
  source = train(validate(base), str(tmp_path_factory.mktemp("source"))).checkpoint_dir

  c = get_config()
  c.data.data_dir, c.train.steps, c.train.tensorboard, c.train.eval_batches = data_dir, 4, False, 1
  c.prune.method, c.prune.n, c.prune.m, c.prune.init_checkpoint = "n_m", 2, 4, source
  c.prune.end_step, c.prune.frequency = 2, 1
  out = prune(validate(c), str(tmp_path_factory.mktemp("pruned")))
  assert out["sparsity_pruned_kernels"] == pytest.approx(0.5) and out["n_m_violations"] == 0
  assert out["final_step"] == 4
  assert np.isfinite(eval_checkpoint(out["checkpoint_dir"], eval_batches=1)["val_loss"])

  c.prune.method, c.prune.sparsity = "magnitude", 0.75
  once = prune_one_shot(validate(c), str(tmp_path_factory.mktemp("once")))
  assert once["sparsity_pruned_kernels"] == pytest.approx(0.75, abs=1e-3) and once["step"] == 2
