"""Structured pruning: the smaller model equals the masked bigger one, zero-importance units go without
changing the outputs, target shapes are checked, and the smaller checkpoint is read by every command."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from compress import structured
from configs.smoke import get_config
from launch.run import state as ts
from launch.run.config import validate
from lm.attention_plan import unplanned
from lm.config import ModelConfig
from lm.model_def import define
from launch.run.plan import config_for_model, make_plan

CFG = dataclasses.replace(validate(get_config()).model, dtype="float32", num_layers=3)


def plan_for(cfg):
  """A one-device run plan of `cfg`'s model: the calibration forwards run from it."""
  return make_plan(config_for_model(cfg))


def _logits(cfg: ModelConfig, params, tokens_BxL):
  graphdef = define(cfg, unplanned(cfg.attention)).graphdef
  return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens_BxL))


@pytest.fixture(scope="module")
def setup():
  params = jax.device_get(ts.init_params(ts.model_def(CFG), jax.random.key(0)))
  params = jax.tree.map(np.asarray, params)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CFG.vocab_size, (4, 33)).astype(np.int32)
  batches = [{"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}]
  return params, batches


def _prune(prune_cfg_changes, params, batches, cfg=CFG):
  raw = get_config()
  for k, v in prune_cfg_changes.items():
    raw.prune[k] = v
  target = structured.target_config(cfg, validate(raw).prune)
  return target, *structured.prune_params(plan_for(cfg), params, batches, target)


def test_stats_forward_is_the_models_forward(setup):
  params, batches = setup
  stats = structured.make_width_stats(plan_for(CFG), CFG)(params, batches[0]["inputs"])
  graphdef = ts.model_def(CFG, None, unplanned(CFG.attention)).graphdef
  hidden, _ = jax.jit(lambda p, t: nnx.merge(graphdef, p).hidden_states(t))(params, batches[0]["inputs"])
  np.testing.assert_allclose(np.asarray(stats["hidden"]), np.asarray(hidden), rtol=1e-5, atol=1e-5)


def test_zero_importance_units_are_removed_without_changing_outputs(setup):
  """A neuron with a zero `up` column, a KV group whose value head is zero and a layer whose outputs
  are zero have importance 0 (or loss change 0); pruning exactly those leaves the logits unchanged."""
  params, batches = setup
  p = jax.tree.map(np.copy, params)
  p["blocks"]["mlp"]["up"]["kernel"][:, :, 5] = 0            # neuron 5 of every layer: [L, D, F]
  p["blocks"]["attention"]["value"]["kernel"][:, :, 1] = 0   # KV head 1 of every layer: [L, D, G, K]
  p["blocks"]["attention"]["out"]["kernel"][1] = 0           # layer 1 writes nothing to the residual
  p["blocks"]["mlp"]["down"]["kernel"][1] = 0
  imp = structured.width_importance(plan_for(CFG), CFG, p, batches)
  assert np.all(imp["mlp"][:, 5] == 0) and np.all(imp["groups"][:, 1] == 0)
  assert np.all(imp["mlp"][:, np.arange(CFG.mlp_dim) != 5] > 0)
  assert structured.layer_importance(plan_for(CFG), CFG, p, batches)[1] == pytest.approx(0, abs=1e-6)

  target, small, report = _prune(dict(mlp_dim=CFG.mlp_dim - 1, num_kv_heads=1), p, batches)
  assert small["blocks"]["mlp"]["up"]["kernel"].shape == (3, CFG.d_model, CFG.mlp_dim - 1)
  assert small["blocks"]["attention"]["query"]["kernel"].shape == (3, CFG.d_model, 2, CFG.head_dim)
  tokens = batches[0]["inputs"]
  np.testing.assert_allclose(_logits(target, small, tokens), _logits(CFG, p, tokens), rtol=1e-4, atol=1e-4)


def test_smaller_model_equals_the_masked_bigger_one(setup):
  """Prune a layer, neurons and groups; zeroing the same units in the big model (a removed layer's
  output kernels, a removed neuron's `down` row, a removed head's `out` rows) gives the same logits:
  an independent path, the big model's own forward, no slicing."""
  params, batches = setup
  target, small, report = _prune(dict(num_layers=2, mlp_dim=80, num_heads=2), params, batches)
  assert np.argmin(report["layer_importance"]) not in report["layers_kept"]
  masked = jax.tree.map(np.copy, params)
  dropped = [i for i in range(CFG.num_layers) if i not in report["layers_kept"]]
  masked["blocks"]["attention"]["out"]["kernel"][dropped] = 0
  masked["blocks"]["mlp"]["down"]["kernel"][dropped] = 0
  for row, layer in enumerate(report["layers_kept"]):
    drop_f = np.ones(CFG.mlp_dim, bool)
    drop_f[report["kept"]["mlp"][row]] = False
    masked["blocks"]["mlp"]["down"]["kernel"][layer, drop_f] = 0
    drop_n = np.ones(CFG.num_heads, bool)
    drop_n[report["kept"]["heads"][row]] = False
    assert len(report["kept"]["heads"][row]) == 2 and len(report["kept"]["kv_heads"][row]) == 1
    masked["blocks"]["attention"]["out"]["kernel"][layer, drop_n] = 0
  tokens = batches[0]["inputs"]
  np.testing.assert_allclose(_logits(target, small, tokens), _logits(CFG, masked, tokens),
                             rtol=1e-4, atol=1e-4)


def test_embedding_channels_that_carry_zeros_go_without_changing_outputs(setup):
  """Channels zero in the embedding and in every kernel writing the residual stay zero; removing them
  (with the sqrt(D/D') norm-scale correction) leaves the logits unchanged up to norm_eps."""
  params, batches = setup
  dead = [3, 17, 40, 41]
  p = jax.tree.map(np.copy, params)
  p["embed"]["table"][:, dead] = 0
  p["blocks"]["attention"]["out"]["kernel"][..., dead] = 0
  p["blocks"]["mlp"]["down"]["kernel"][..., dead] = 0
  imp = structured.width_importance(plan_for(CFG), CFG, p, batches)
  assert np.all(imp["embed"][dead] == 0) and np.sum(imp["embed"] == 0) == len(dead)
  target, small, _ = _prune(dict(d_model=CFG.d_model - len(dead)), p, batches)
  assert small["embed"]["table"].shape == (CFG.vocab_size, CFG.d_model - len(dead))
  tokens = batches[0]["inputs"]
  np.testing.assert_allclose(_logits(target, small, tokens), _logits(CFG, p, tokens), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("changes, message", [
    (dict(num_heads=3), "multiple of"),
    (dict(num_heads=4, num_kv_heads=1), "whole groups"),
    (dict(mlp_dim=10_000), "larger than"),
    (dict(), "no smaller target"),
])
def test_impossible_targets_are_named(changes, message):
  raw = get_config()
  for k, v in changes.items():
    raw.prune[k] = v
  with pytest.raises(ValueError, match=message):
    structured.target_config(CFG, validate(raw).prune)


def test_negative_target_is_a_config_error():
  raw = get_config()
  raw.prune.method, raw.prune.mlp_dim = "structured", -1
  with pytest.raises(ValueError, match="prune.mlp_dim=-1"):
    validate(raw)


def test_smaller_checkpoint_is_read_by_every_command(tmp_path_factory):
  """Train a few steps, prune structurally, then eval, generate, quantize, export and convert --to-hf
  the smaller checkpoint, and distill it back from the unpruned model."""
  from compress.distill_run import distill
  from compress.export import export_checkpoint
  from compress.quantize_run import quantize_checkpoint
  from compress.structured_run import prune_structured
  from launch.huggingface.convert import export_hf
  from launch.run.evaluation import eval_checkpoint
  from launch.run.loop import train
  from launch.run.restore import load_checkpoint, read_saved_config

  data_dir = str(tmp_path_factory.mktemp("data"))
  base = get_config()
  base.data.data_dir, base.train.steps, base.train.tensorboard = data_dir, 2, False
  base.train.eval_batches, base.checkpoint.async_save = 1, False
  source = train(validate(base), str(tmp_path_factory.mktemp("source"))).checkpoint_dir

  c = get_config()
  c.data.data_dir, c.train.tensorboard, c.train.eval_batches = data_dir, False, 1
  c.prune.method, c.prune.init_checkpoint, c.prune.calibration_batches = "structured", source, 1
  c.prune.num_layers, c.prune.d_model, c.prune.num_kv_heads, c.prune.mlp_dim = 1, 32, 1, 64
  workdir = str(tmp_path_factory.mktemp("small"))
  out = prune_structured(validate(c), workdir)
  assert out["params_after"] < out["params_before"]
  small_dir = out["checkpoint_dir"]
  saved, _ = read_saved_config(small_dir)
  assert (saved.model.num_layers, saved.model.d_model, saved.model.num_heads, saved.model.num_kv_heads,
          saved.model.mlp_dim) == (1, 32, 2, 1, 64)
  with pytest.raises(ValueError, match="already holds checkpoints"):
    prune_structured(validate(c), workdir)

  assert np.isfinite(eval_checkpoint(small_dir, eval_batches=1)["val_loss"])
  loaded = load_checkpoint(small_dir)
  assert loaded.params["embed"]["table"].shape == (512, 32)
  assert loaded.generate(["To be"], max_new_tokens=3, temperature=0.0)[0].startswith("To be")
  quantize_checkpoint(small_dir, str(tmp_path_factory.mktemp("q") / "w8a16"), mode="w8a16",
                      calibration_batches=1)
  export_checkpoint(small_dir, str(tmp_path_factory.mktemp("servable") / "out"))
  hf_dir = str(tmp_path_factory.mktemp("hf") / "out")
  export_hf(small_dir, hf_dir)
  with open(os.path.join(hf_dir, "config.json")) as fh:
    hf = json.load(fh)
  assert (hf["hidden_size"], hf["num_hidden_layers"], hf["intermediate_size"]) == (32, 1, 64)

  d = get_config()
  d.data.data_dir, d.train.steps, d.train.tensorboard, d.train.eval_batches = data_dir, 2, False, 1
  d.checkpoint.async_save = False
  for k in ("num_layers", "d_model", "num_heads", "num_kv_heads", "mlp_dim"):
    d.model[k] = getattr(saved.model, k)
  d.train.init_checkpoint, d.distill.teacher_checkpoint = small_dir, source
  result = distill(validate(d), str(tmp_path_factory.mktemp("recovered")))
  assert np.isfinite(result.val_loss)
