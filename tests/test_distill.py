"""Distillation: the KD loss against NumPy, its zero gradient at student == teacher, a sharded step, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import distill as kd
from configs.smoke import get_config
from launch.run import checkpoint as ckpt_lib
from launch.run import state as ts
from launch.run.config import validate, with_overrides
from launch.run.plan import make_plan
from compress.distill_run import distill, distill_hook, load_teacher
from launch.run import programs


def numpy_kd(student, teacher, targets, alpha, temperature):
  """The same loss in float64 NumPy: alpha T^2 KL(p_t || p_s) + (1 - alpha) CE, summed over tokens."""
  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  log_p, log_q = log_softmax(teacher / temperature), log_softmax(student / temperature)
  kl = np.sum(np.exp(log_p) * (log_p - log_q))
  ce = -np.sum(np.take_along_axis(log_softmax(student), targets[..., None], -1))
  return alpha * temperature ** 2 * kl + (1 - alpha) * ce


def test_kd_loss_matches_numpy():
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(2, 3, 7)) * 3, rng.normal(size=(2, 3, 7)) * 3
  targets = rng.integers(0, 7, size=(2, 3))
  for alpha, temperature in [(0.3, 2.5), (1.0, 1.0), (0.0, 4.0)]:
    got = kd.kd_loss_sums(jnp.float32(student), jnp.float32(teacher), jnp.int32(targets),
                          alpha=alpha, temperature=temperature)
    want = numpy_kd(student, teacher, targets, alpha, temperature)
    assert float(got["loss"]) == pytest.approx(want, rel=1e-5)
    assert float(got["tokens"]) == 6


def config(**overrides):
  """The smoke model as teacher shape; overrides as "section__key" = value."""
  c = get_config()
  c.train.tensorboard = False
  return validate(with_overrides(c, {k.replace("__", "."): v for k, v in overrides.items()}))


STUDENT = dict(model__num_layers=1, model__d_model=32, model__num_heads=2, model__num_kv_heads=2,
               model__mlp_dim=64)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A saved checkpoint of the smoke model with random weights (only the shapes matter here)."""
  cfg = config()
  plan = make_plan(cfg)
  state = ts.init_train_state(plan.mdef, plan.tx, plan.shardings, seed=1)
  directory = str(tmp_path_factory.mktemp("teacher") / "checkpoints")
  checkpointer = ckpt_lib.Checkpointer(directory, async_save=False)
  checkpointer.save(5, state, {"config": cfg.to_dict()})
  checkpointer.close()
  return directory


def test_zero_gradient_when_student_is_the_teacher(teacher_dir):
  """At T=1, alpha=1 the KL (and the hidden MSE) is at its minimum: loss 0, every gradient 0."""
  cfg = config(distill__teacher_checkpoint=teacher_dir, distill__alpha=1.0, distill__temperature=1.0,
               distill__hidden_weight=1.0, mesh__num_devices=1)
  plan = make_plan(cfg)
  teacher = load_teacher(cfg, plan)
  hook = distill_hook(cfg, plan, teacher)
  batch = {"inputs": jax.random.randint(jax.random.key(0), (2, 16), 0, 512),
           "targets": jax.random.randint(jax.random.key(1), (2, 16), 0, 512)}
  with_ce = functools.partial(hook.fn.func, **{**hook.fn.keywords, "alpha": 0.5})

  @jax.jit
  def grads(params):
    kd_only = jax.value_and_grad(hook.fn, has_aux=True)(params, batch, teacher.params)
    return kd_only, jax.grad(lambda p: with_ce(p, batch, teacher.params)[0])(params)

  ((loss, _), kd_grads), ce_grads = grads(teacher.params)
  assert abs(float(loss)) < 1e-6
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(kd_grads)) < 1e-6
  # The same student with alpha < 1 feels the cross-entropy, so the gradient is no longer zero.
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ce_grads)) > 1e-4


def test_distillation_step_on_eight_devices_with_both_models_sharded(teacher_dir):
  cfg = config(distill__teacher_checkpoint=teacher_dir, distill__alpha=0.7, mesh__data=2, mesh__fsdp=4,
               mesh__rules="fsdp", **STUDENT)
  plan = make_plan(cfg)
  assert plan.num_devices == 8
  teacher = load_teacher(cfg, plan)
  assert teacher.step == 5 and teacher.mdef.cfg.num_layers == 2
  # Both models are split along `embed` over fsdp by the same rule table.
  t_kernel = teacher.params["blocks"]["mlp"]["up"]["kernel"]      # [layers, embed, mlp]
  assert t_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert t_kernel.sharding.mesh == plan.mesh
  assert len({s.data.shape for s in t_kernel.addressable_shards}) == 1
  assert t_kernel.addressable_shards[0].data.shape == (2, 64 // 4, 128)

  hook = distill_hook(cfg, plan, teacher)
  step_fn = programs.train_step(plan, hook)
  state = ts.init_train_state(plan.mdef, plan.tx, plan.shardings, cfg.seed)
  s_kernel = state.params["blocks"]["mlp"]["up"]["kernel"]
  assert s_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  tokens = jax.random.randint(jax.random.key(0), (8, 65), 0, 512)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  # The reference: the same loss on one device, from host copies of both models.
  one = lambda tree: jax.device_put(jax.tree.map(np.asarray, tree), jax.devices()[0])
  reference, _ = jax.jit(hook.fn)(one(state.params), one(batch), one(teacher.params))
  losses = []
  for _ in range(3):
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[0] == pytest.approx(float(reference), rel=1e-5)
  assert losses[2] < losses[0]
  assert state.params["blocks"]["mlp"]["up"]["kernel"].sharding == s_kernel.sharding


def test_bad_distill_inputs_are_named(teacher_dir, tmp_path):
  with pytest.raises(ValueError, match=r"distill.temperature=0.0: must be > 0"):
    config(distill__temperature=0.0)
  with pytest.raises(ValueError, match=r"distill.temperature=-1.0"):
    config(distill__temperature=-1.0)
  with pytest.raises(ValueError, match=r"distill.alpha=1.5"):
    config(distill__alpha=1.5)
  mismatch = config(distill__teacher_checkpoint=teacher_dir, model__vocab_size=256, mesh__num_devices=1)
  with pytest.raises(ValueError, match=r"teacher has model.vocab_size=512 but the student has "
                                       r"model.vocab_size=256"):
    load_teacher(mismatch, make_plan(mismatch))
  narrow = config(distill__teacher_checkpoint=teacher_dir, distill__hidden_weight=1.0, mesh__num_devices=1,
                  **STUDENT)
  with pytest.raises(ValueError, match=r"teacher d_model=64 and student d_model=32"):
    load_teacher(narrow, make_plan(narrow))
  with pytest.raises(ValueError, match=r"distill.teacher_checkpoint is empty"):
    distill(config(), str(tmp_path))
  with pytest.raises(ckpt_lib.CheckpointError, match="No checkpoint directory"):
    distill(config(distill__teacher_checkpoint=str(tmp_path / "nothing")), str(tmp_path))


def test_distilled_student_is_an_ordinary_checkpoint(teacher_dir, tmp_path_factory, capsys):
  """launch.distill end to end on the corpus; launch.eval and launch.generate read the student. The
  run prints and stores the teacher's kernels (planned for the student's devices) beside its own."""
  from launch.run.evaluation import eval_checkpoint
  from launch.run.restore import load_checkpoint

  data_dir = str(tmp_path_factory.mktemp("data"))
  cfg = config(distill__teacher_checkpoint=teacher_dir, data__data_dir=data_dir, train__steps=3,
               train__eval_batches=1, checkpoint__async_save=False, **STUDENT)
  result = distill(cfg, str(tmp_path_factory.mktemp("student")))
  assert result.final_step == 3 and np.isfinite(result.val_loss)
  printed = capsys.readouterr()
  reader = ckpt_lib.Checkpointer(result.checkpoint_dir, read_only=True)
  stored = reader.read_meta()["plan"]
  reader.close()
  teacher = stored["teacher_attention"]
  assert set(teacher) == {"whole sequence", "prefill", "decode"} and "attention" in stored
  for place, selection in teacher.items():
    assert f"teacher attention [{place}]: {selection['implementation']}" in printed.out + printed.err
  assert eval_checkpoint(result.checkpoint_dir, eval_batches=1)["val_loss"] == pytest.approx(result.val_loss,
                                                                                             rel=1e-5)
  loaded = load_checkpoint(result.checkpoint_dir)
  assert loaded.cfg.model.num_layers == 1 and loaded.cfg.distill.teacher_checkpoint == teacher_dir
  assert len(loaded.generate(["ROMEO."], max_new_tokens=4, temperature=0.0)) == 1
