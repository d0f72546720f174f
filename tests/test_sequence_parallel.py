"""sharding/sequence.py and the `sequence` mesh axis: sequences split over devices, same numbers.

Loss and gradients under sequence=2, 4, 8 (alone) and sequence=2 with fsdp=2 and tensor=2 equal the
single-device run for both attention strategies (ring, all_gather), with packed documents whose
boundaries cross shard boundaries, and through the jitted train step with gradient accumulation;
a checkpoint trained on a sequence-split mesh evaluates and
generates on one device; bad plans fail before compiling.
"""

import jax
import numpy as np
import pytest

from configs.smoke import get_config
from launch.run import checkpoint as ckpt_lib
from launch.run import state as ts
from launch.run import programs
from launch.run import step as step_lib
from launch.run.config import validate, with_overrides
from launch.run.plan import decide, make_plan
from lm import attention_plan
from lm.decoding import make_generate_fn
from sharding import rules as rules_lib
from sharding import sequence as sequence_lib

VOCAB, BATCH, SEQ = 64, 4, 32
AXES = ("stage", "data", "fsdp", "sequence", "tensor")


def make_config(**changes):
  base = {"model.vocab_size": VOCAB, "model.num_layers": 2, "model.d_model": 32, "model.num_heads": 4,
          "model.num_kv_heads": 2, "model.head_dim": 8, "model.mlp_dim": 64, "data.seq_len": SEQ,
          "train.global_batch_size": BATCH, "mesh.data": 1}
  full = {**base, **changes}
  full.setdefault("mesh.num_devices", int(np.prod([full.get(f"mesh.{a}", 1) for a in AXES])))
  return validate(with_overrides(get_config(), full))


def host_batch():
  """Tokens and packed-document segment ids; documents start at random places, so most cross the
  boundaries between sequence shards (every 4 tokens at sequence=8)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
  starts = rng.random((BATCH, SEQ)) < 0.15
  starts[:, 0] = False
  segments = np.cumsum(starts, axis=1).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments}


def host_params():
  """The seed-0 parameters on the host: every run starts from these (no init compile per mesh)."""
  plan = make_plan(make_config(**{"mesh.num_devices": 1}))
  return jax.device_get(ts.init_train_state(plan.mdef, plan.tx, plan.shardings, seed=0).params)


# The collective each strategy's shard_map must show in the lowered step (GSPMD alone adds none
# before partitioning), so a silently bypassed hook cannot pass for an equal result.
COLLECTIVE = {"all_gather": "all_gather", "ring": "collective_permute"}


def loss_and_grads(cfg, params):
  """(loss, grads on the host) of `params` on one fixed batch, through the run's own loss (in the
  zigzag order under the ring strategy, as the train step runs it)."""
  plan = make_plan(cfg)
  params = jax.device_put(params, plan.shardings.params)
  strategy = cfg.mesh.sequence_attention
  fn = jax.jit(jax.value_and_grad(lambda p, b: step_lib._loss(p, b, plan.mdef)[0]))
  sharding = step_lib.batch_sharding(plan.mesh, plan.rules)
  batch = {k: jax.device_put(v, sharding) for k, v in host_batch().items()}
  lowered = programs.Program(fn, plan).lower(params, batch)
  if plan.mesh.shape["sequence"] > 1:
    assert COLLECTIVE[strategy] in lowered.as_text()
  loss, grads = lowered.compile()(params, batch)
  return float(loss), jax.device_get(grads)


@pytest.fixture(scope="module")
def params():
  return host_params()


@pytest.fixture(scope="module")
def reference(params):
  return loss_and_grads(make_config(**{"mesh.num_devices": 1}), params)


MESHES = [({"mesh.sequence": 2}, "seq2"), ({"mesh.sequence": 4}, "seq4"), ({"mesh.sequence": 8}, "seq8"),
          ({"mesh.sequence": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "mesh.rules": "fsdp_sp_tp"},
           "seq2-fsdp2-tensor2")]


@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
@pytest.mark.parametrize("changes", [m for m, _ in MESHES], ids=[i for _, i in MESHES])
def test_sequence_parallel_equals_single_device(changes, strategy, params, reference):
  loss, grads = loss_and_grads(make_config(**changes, **{"mesh.sequence_attention": strategy}), params)
  ref_loss, ref_grads = reference
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    scale = float(np.max(np.abs(want)))  # rtol of each gradient's own scale (sums cancel differently)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_train_step_with_gradient_accumulation(params, reference):
  """The jitted train step itself (zigzag reorder, micro-batches) on sequence=4 x data=2."""
  cfg = make_config(**{"mesh.sequence": 4, "mesh.data": 2, "train.grad_accum_steps": 2})
  plan = make_plan(cfg)
  state = ts.train_state_from_params(jax.device_put(params, plan.shardings.params), plan.tx, plan.shardings)
  step = programs.train_step(plan)
  sharding = step_lib.batch_sharding(plan.mesh, plan.rules)
  _, metrics = step(state, {k: jax.device_put(v, sharding) for k, v in host_batch().items()})
  ref_norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(reference[1]))))
  np.testing.assert_allclose(float(metrics["loss"]), reference[0], rtol=2e-5)
  np.testing.assert_allclose(float(metrics["grad_norm"]), ref_norm, rtol=2e-5)


def test_rules_map_length_to_sequence():
  for name in ("dp", "fsdp", "fsdp_tp"):
    table = rules_lib.get_rules(name, sequenced=True)
    assert rules_lib.logical_to_spec(("batch", "length", "embed"), table)[1] == "sequence"
    assert dict(table) == {**dict(rules_lib.get_rules(name)), "length": ("sequence",)}
  # Parameters are never split by `sequence`: no table places a weight's name on it.
  assert all("sequence" not in axes for name, axes in rules_lib.RULE_PRESETS["fsdp_sp_tp"] if name != "length")
  assert rules_lib.preset_for_mesh({"fsdp": 2, "sequence": 4}) == "fsdp_sp"
  assert rules_lib.preset_for_mesh({"sequence": 8}) == "sp"


@pytest.mark.parametrize("changes, message", [
    ({"mesh.sequence": 4, "data.seq_len": 36},
     "data.seq_len=36 is not divisible by 2 x mesh.sequence = 2 x 4 = 8"),
    ({"mesh.sequence": 4, "data.seq_len": 30, "mesh.sequence_attention": "all_gather"},
     "data.seq_len=30 is not divisible by mesh.sequence = 4"),
    ({"mesh.sequence": 2, "mesh.stage": 2, "train.microbatches": 2}, "mesh.stage=1 or"),
    ({"mesh.sequence": 2, "model.attention": "splash"},
     "model.attention='splash' with mesh.sequence=2: it cannot run inside the ring's blocks: splash "
     "attention tiles a ring sub-block in blocks of 128, and each device's sub-block holds 8 tokens"),
    ({"mesh.sequence": 2, "model.attention": "splash", "mesh.sequence_attention": "all_gather"},
     "model.attention='splash' with mesh.sequence=2: all_gather attention runs"),
])
def test_bad_sequence_plans_fail_before_compiling(changes, message):
  cfg = make_config(**changes)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    decide(cfg, int(np.prod([getattr(cfg.mesh, a) for a in AXES])), "tpu" if "splash" in message else "cpu")


def test_custom_rules_must_leave_length_to_the_sequence_axis():
  with pytest.raises(ValueError, match="write length=sequence in mesh.custom_rules"):
    make_plan(make_config(**{"mesh.sequence": 2, "mesh.custom_rules": "batch=data,length="}))


def test_unknown_strategy_is_a_config_error():
  with pytest.raises(ValueError, match="mesh.sequence_attention='ringg'"):
    make_config(**{"mesh.sequence_attention": "ringg"})


def test_checkpoint_from_sequence_mesh_evaluates_and_generates(tmp_path, params, reference):
  """Params are not split by `sequence`: a sequence-split run's checkpoint evaluates on its own mesh
  and restores bit-equal onto one device, where it generates."""
  split = make_plan(make_config(**{"mesh.sequence": 4, "mesh.sequence_attention": "all_gather"}))
  single = make_plan(make_config(**{"mesh.num_devices": 1}))
  writer = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  state = ts.train_state_from_params(jax.device_put(params, split.shardings.params), split.tx, split.shardings)
  writer.save(1, state, {"config": split.cfg.to_dict()})
  writer.close()
  restored = {}
  for name, c in (("split", split), ("single", single)):
    reader = ckpt_lib.Checkpointer(str(tmp_path), read_only=True)
    restored[name], _ = reader.restore_params(ts.abstract_params(c.mdef, c.shardings.params))
    reader.close()
  # Without segment ids, positions come from arange over the whole (GSPMD-global) sequence.
  rows = {k: v for k, v in host_batch().items() if k != "segment_ids"}
  losses = {}
  for name, c in (("split", split), ("single", single)):
    eval_fn = programs.eval_step(c)
    sharding = step_lib.batch_sharding(c.mesh, c.rules)
    out = eval_fn(restored[name], {k: jax.device_put(v, sharding) for k, v in rows.items()})
    losses[name] = float(out["loss_sum"] / out["tokens"])
  np.testing.assert_allclose(losses["split"], losses["single"], rtol=2e-5)
  assert abs(losses["single"] - reference[0]) > 1e-4  # documents change the loss: the check is not vacuous
  for got, want in zip(jax.tree.leaves(restored["single"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), want)
  generate = make_generate_fn(single.mdef.graphdef, max_new_tokens=2, temperature=0.0)
  tokens = np.asarray(generate(restored["single"], np.arange(1, 9, dtype=np.int32).reshape(2, 4), jax.random.key(0)))
  assert tokens.shape == (2, 6) and (tokens[:, :4] == np.arange(1, 9).reshape(2, 4)).all()


def test_ring_block_kernel_selection():
  def pick(requested, platform, strategy, shards, seq_len):
    chosen = attention_plan.select_sequence_block(requested, platform=platform, strategy=strategy,
                                                  shards=shards, seq_len=seq_len)
    return chosen.implementation, chosen.reason
  # TPU: splash inside each block when a sub-block (seq_len / 2N) is whole tiles of 128, else XLA.
  assert pick("auto", "tpu", "ring", 4, 8192) == (
      "splash", "mesh.sequence=4: ring attention, each block through Pallas splash on TPU")
  kernel, reason = pick("auto", "tpu", "ring", 4, 8 * 96)
  assert kernel == "xla" and "holds 96 tokens" in reason
  assert pick("splash", "tpu", "ring", 2, 512)[0] == "splash"
  assert pick("xla", "tpu", "ring", 2, 512)[0] == "xla"
  # GPU and CPU: XLA, with the reason; all_gather: XLA everywhere.
  kernel, reason = pick("auto", "cuda", "ring", 2, 8192)
  assert kernel == "xla" and "returns no softmax statistics" in reason
  assert pick("auto", "cpu", "ring", 2, 8192)[0] == "xla"
  assert pick("auto", "tpu", "all_gather", 2, 8192)[0] == "xla"
  with pytest.raises(ValueError, match="model.attention='cudnn' with mesh.sequence=2: ring attention merges"):
    pick("cudnn", "cuda", "ring", 2, 8192)
  with pytest.raises(ValueError, match="splash attention is a TPU kernel, and this is cpu"):
    pick("splash", "cpu", "ring", 2, 8192)


def test_model_with_splash_blocks_equals_single_device(params):
  """The train step's loss and gradients with Pallas splash inside every ring block (in Pallas'
  interpreter, as if on a TPU) equal one device's. Splash tiles 128 tokens, so the sequence here is
  2 x 2 x 128 long and the heads are 64 wide. (The natural layout, which a loss hook's model calls
  see, is checked on the kernel alone in test_ring_attention.py and for its wiring below.)"""
  # One layer: the hook runs per layer, and Pallas' interpreter is slow.
  # float32 on both sides: a plan for TPU devices would compute model.dtype=auto in bfloat16.
  shape = {"data.seq_len": 512, "model.head_dim": 64, "model.max_seq_len": 512, "model.num_layers": 1,
           "model.dtype": "float32"}
  cfg = make_config(**shape, **{"mesh.num_devices": 1})
  plan = make_plan(cfg)
  params = jax.device_get(ts.init_train_state(plan.mdef, plan.tx, plan.shardings, seed=0).params)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (2, 513)).astype(np.int32)
  segments = np.stack([np.repeat([0, 1, 2], [100, 300, 112]), np.zeros(512, int)]).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments}
  results = {}
  # The reference is the host's plan (XLA); the split run is planned for TPU devices (splash blocks).
  for name, changes, platform in (("single", {"mesh.num_devices": 1}, None),
                                  ("zigzag", {"mesh.sequence": 2, "mesh.data": 2}, "tpu")):
    c = make_plan(make_config(**shape, **changes), platform=platform)
    fn = jax.jit(jax.value_and_grad(lambda p, b, c=c: step_lib._loss(p, b, c.mdef)[0]))
    sharding = step_lib.batch_sharding(c.mesh, c.rules)
    traced = programs.Program(fn, c)
    lowered = traced.lower(jax.device_put(params, c.shardings.params),
                           {k: jax.device_put(v, sharding) for k, v in batch.items()})
    if name != "single":
      assert c.attention.ring_block.implementation == "splash"
      assert "splash" in lowered.as_text()  # the kernel really runs inside the blocks
    results[name] = jax.device_get(lowered.compile()(jax.device_put(params, c.shardings.params),
                                                     {k: jax.device_put(v, sharding) for k, v in batch.items()}))
  (loss, grads), (ref_loss, ref_grads) = results["zigzag"], results["single"]
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_ring_blocks_are_told_the_layout_they_run_in(params, monkeypatch):
  """The train step's loss runs in the plan's zigzag layout and the ring hears it; a loss hook's
  model calls run in natural order, and the same plan's step tells the ring "natural" (the splash
  blocks read it)."""
  seen = []
  real = sequence_lib.ring_attention_block
  monkeypatch.setattr(sequence_lib, "ring_attention_block",
                      lambda *a, layout, **kw: seen.append(layout) or real(*a, layout=layout, **kw))
  plan = make_plan(make_config(**{"mesh.sequence": 2, "mesh.data": 2}))
  assert plan.sequence.layout == "zigzag"
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host_batch().items()}
  state = ts.abstract_state(plan.mdef, plan.tx, plan.shardings)
  natural = plan.natural_order_mdef()  # the model a loss hook calls
  hook = step_lib.LossHook(lambda p, b, extra: step_lib._loss(p, b, natural), None, None)
  for loss_hook, layout in ((None, "zigzag"), (hook, "natural")):
    seen.clear()
    programs.train_step(plan, loss_hook).lower(state, batch)
    assert seen and set(seen) == {layout}
