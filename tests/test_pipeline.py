"""sharding/pipeline.py: a `stage` mesh axis runs the layer stack as a pipeline with the same numbers.

Loss and gradients under stage=2 and 4 (alone, with fsdp, tensor or data, GPipe and circular, with
remat and gradient accumulation) equal the single-device run; a checkpoint moves between stage=4 and
stage=1 bit-equal; eval and KV-cache generation work on stage-sharded parameters; bad plans fail early.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.smoke import get_config
from launch.run import checkpoint as ckpt_lib
from launch.run import state as ts
from launch.run import programs
from launch.run import step as step_lib
from launch.run.config import validate, with_overrides
from launch.run.plan import decide, make_plan
from lm.decoding import make_generate_fn
from sharding.pipeline import Pipeline

VOCAB, BATCH, SEQ = 64, 8, 16


def make_config(**changes):
  base = {"model.vocab_size": VOCAB, "model.num_layers": 4, "model.d_model": 32, "model.num_heads": 4,
          "model.num_kv_heads": 2, "model.head_dim": 8, "model.mlp_dim": 64, "data.seq_len": SEQ,
          "train.global_batch_size": BATCH, "mesh.data": 1}
  full = {**base, **changes}
  axes = [full.get(f"mesh.{a}", 1) for a in ("stage", "data", "fsdp", "tensor")]
  full.setdefault("mesh.num_devices", int(np.prod(axes)))
  return validate(with_overrides(get_config(), full))


def batch_for(plan):
  tokens = np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
  sharding = step_lib.batch_sharding(plan.mesh, plan.rules)
  return {"inputs": jax.device_put(tokens[:, :-1], sharding), "targets": jax.device_put(tokens[:, 1:], sharding)}


def loss_and_grads(cfg):
  """(loss, grads on the host) of the seed-0 parameters on one fixed batch, through the run's own loss."""
  plan = make_plan(cfg)
  params = ts.init_train_state(plan.mdef, plan.tx, plan.shardings, seed=0).params
  fn = jax.jit(jax.value_and_grad(lambda p, b: step_lib._loss(p, b, plan.mdef)[0]))
  loss, grads = programs.Program(fn, plan)(params, batch_for(plan))
  return float(loss), jax.device_get(grads)


@pytest.fixture(scope="module")
def reference():
  return loss_and_grads(make_config(**{"mesh.num_devices": 1}))


@pytest.mark.parametrize("changes", [
    {"mesh.stage": 2, "train.microbatches": 4},
    {"mesh.stage": 4, "train.microbatches": 2},
    {"mesh.stage": 2, "mesh.fsdp": 4, "mesh.rules": "fsdp", "train.microbatches": 2, "model.remat": "full"},
    {"mesh.stage": 4, "mesh.tensor": 2, "mesh.rules": "tp", "train.microbatches": 4},
    {"mesh.stage": 2, "mesh.data": 2, "train.microbatches": 2, "train.pipeline_schedule": "circular",
     "train.pipeline_repeats": 2},
], ids=["stage2", "stage4", "stage2-fsdp4-remat", "stage4-tensor2", "stage2-data2-circular"])
def test_pipeline_equals_single_device(changes, reference):
  loss, grads = loss_and_grads(make_config(**changes))
  ref_loss, ref_grads = reference
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    # rtol 2e-5 of each gradient's own scale: single elements near zero cancel differently when the
    # batch is summed in micro-batches.
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_pipeline_composes_with_gradient_accumulation(reference):
  cfg = make_config(**{"mesh.stage": 2, "mesh.data": 2, "train.microbatches": 2, "train.grad_accum_steps": 2})
  plan = make_plan(cfg)
  state = ts.init_train_state(plan.mdef, plan.tx, plan.shardings, seed=0)
  step = programs.train_step(plan)
  _, metrics = step(state, batch_for(plan))
  ref_norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(reference[1]))))
  np.testing.assert_allclose(float(metrics["loss"]), reference[0], rtol=2e-5)
  np.testing.assert_allclose(float(metrics["grad_norm"]), ref_norm, rtol=2e-5)


def test_checkpoint_moves_between_stage_counts(tmp_path):
  staged = make_plan(make_config(**{"mesh.stage": 4, "train.microbatches": 2}))
  single = make_plan(make_config(**{"mesh.num_devices": 1}))
  for source, target, name in ((staged, single, "from4"), (single, staged, "from1")):
    saved = ts.init_train_state(source.mdef, source.tx, source.shardings, seed=3)
    writer = ckpt_lib.Checkpointer(str(tmp_path / name), async_save=False)
    writer.save(1, saved, {"config": source.cfg.to_dict()})
    writer.close()
    reader = ckpt_lib.Checkpointer(str(tmp_path / name), read_only=True)
    restored, _ = reader.restore_state(ts.abstract_state(target.mdef, target.tx, target.shardings))
    reader.close()
    assert int(restored.step) == 1
    for a, b in zip(jax.tree.leaves((restored.params, restored.opt_state)),
                    jax.tree.leaves((saved.params, saved.opt_state))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kernel = restored.params["blocks"]["mlp"]["up"]["kernel"]
    assert kernel.sharding.spec == target.shardings.params["blocks"]["mlp"]["up"]["kernel"].spec
    assert kernel.sharding.spec[0] == ("stage" if target is staged else None)


def test_eval_and_generation_run_on_stage_sharded_parameters():
  staged = make_plan(make_config(**{"mesh.stage": 2, "train.microbatches": 2}))
  single = make_plan(make_config(**{"mesh.num_devices": 1}))
  params = {name: ts.init_train_state(c.mdef, c.tx, c.shardings, seed=0).params
            for name, c in (("staged", staged), ("single", single))}
  losses = {name: float(programs.eval_step(c)(
      params[name], batch_for(c))["loss_sum"]) for name, c in (("staged", staged), ("single", single))}
  np.testing.assert_allclose(losses["staged"], losses["single"], rtol=2e-5)
  prompt = jnp.asarray(np.arange(1, 9, dtype=np.int32).reshape(2, 4))
  tokens = {}
  for name, c in (("staged", staged), ("single", single)):
    fn = make_generate_fn(c.mdef.graphdef, max_new_tokens=4, temperature=0.0)
    tokens[name] = np.asarray(programs.Program(fn, c)(params[name], prompt, jax.random.key(0)))
  np.testing.assert_array_equal(tokens["staged"], tokens["single"])


@pytest.mark.parametrize("changes, message", [
    ({"mesh.stage": 3, "mesh.num_devices": 3, "train.microbatches": 2}, "not divisible by mesh.stage=3"),
    ({"mesh.stage": 2, "train.microbatches": 3}, "do not split into train.microbatches=3"),
    ({"mesh.stage": 2, "mesh.data": 2, "train.microbatches": 8}, "over the 2 data shards"),
    ({"train.microbatches": 4}, "mesh.stage=1"),
    ({"mesh.stage": 4, "train.microbatches": 2, "train.pipeline_schedule": "circular"}, "needs train.microbatches >= mesh.stage"),
    ({"mesh.stage": 2, "train.microbatches": 2, "train.pipeline_schedule": "circular", "train.pipeline_repeats": 4},
     r"mesh.stage x train.pipeline_repeats = 2 x 4 = 8"),
    ({"mesh.stage": 2, "mesh.num_devices": 1, "train.microbatches": 2}, "needs 2 devices but 1 are available"),
])
def test_bad_pipelines_fail_before_compiling(changes, message):
  with pytest.raises(ValueError, match=message):
    cfg = make_config(**changes)
    decide(cfg, cfg.mesh.num_devices, "cpu")


@pytest.mark.parametrize("pipe, bubble", [
    (Pipeline(stages=4, microbatches=4), 3 / 7), (Pipeline(stages=4, microbatches=12), 3 / 15),
    (Pipeline(stages=4, microbatches=4, schedule="circular", repeats=2), 3 / 11)])
def test_bubble_formula(pipe, bubble):
  assert pipe.bubble == pytest.approx(bubble)


@pytest.mark.parametrize("pipe", [Pipeline(stages=4, microbatches=4),
                                  Pipeline(stages=4, microbatches=4, schedule="circular", repeats=2)])
def test_timeline_drawing_writes_a_png(pipe, tmp_path):
  # launch.reproduce.pipeline draws docs/results/pipeline/timeline_*.png with it.
  from launch.measure.layout import draw_pipeline_timeline
  path = tmp_path / "timeline.png"
  draw_pipeline_timeline(pipe, 8, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
