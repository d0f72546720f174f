"""launch/run/plan.py: one plan per run, for the devices it targets; what it says is what runs.

- A plan for the host's 8 CPU devices described as TPUs makes TPU choices (splash in every place
  that can take it) and changes nothing else (mesh, rules, shardings, model definition).
- What the plan prints and stores is what the traced step ran: a spy on the kernels' entry points
  and the `pallas_call`s in the step's jaxpr, for the unsplit path, the ring blocks (zigzag layout,
  and natural under a loss hook) and prefill; and a real training run's printed lines and stored
  checkpoint meta equal its plan.
"""

import json

import jax
import jax.numpy as jnp
import pytest

from configs.smoke import get_config
from launch.run import checkpoint as ckpt_lib
from launch.run import loop
from launch.run import programs
from launch.run import state as ts
from launch.run import step as step_lib
from launch.run.config import validate, with_overrides
from launch.run.plan import make_plan
from lm import attention
from sharding import sequence as sequence_lib

# Splash tiles 128 tokens and the ring splits each sequence into 2 x sequence pieces: 512 tokens
# give whole tiles at sequence=2. One layer, 64-wide heads: Pallas traces once per layer.
SHAPE = {"model.vocab_size": 64, "model.num_layers": 1, "model.d_model": 64, "model.num_heads": 2,
         "model.num_kv_heads": 1, "model.head_dim": 64, "model.mlp_dim": 64, "model.max_seq_len": 512,
         "data.seq_len": 512, "train.global_batch_size": 4}


def make_config(**changes):
  return validate(with_overrides(get_config(), {**SHAPE, **changes}))


def abstract_inputs(plan):
  state = ts.abstract_state(plan.mdef, plan.tx, plan.shardings)
  tokens = jax.ShapeDtypeStruct((plan.cfg.train.global_batch_size, plan.cfg.data.seq_len), jnp.int32,
                                sharding=step_lib.batch_sharding(plan.mesh, plan.rules))
  return state, {"inputs": tokens, "targets": tokens, "segment_ids": tokens}


def pallas_calls(jaxpr) -> int:
  """How many pallas_call equations `jaxpr` holds, nested jaxprs included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == "pallas_call"
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns"):
          count += pallas_calls(sub)
  return count


@pytest.fixture
def spy(monkeypatch):
  """Records (place, kernel[, layout]) each time attention is traced: whole sequences and prefill
  through lm.attention.attend, sequence blocks through sharding.sequence.ring_attention_block."""
  seen = []
  attend, block = attention.attend, sequence_lib.ring_attention_block
  monkeypatch.setattr(attention, "attend",
                      lambda kernel, *a, **kw: seen.append(("whole", kernel)) or attend(kernel, *a, **kw))
  monkeypatch.setattr(sequence_lib, "ring_attention_block",
                      lambda *a, kernel, layout, **kw: seen.append(("block", kernel, layout))
                      or block(*a, kernel=kernel, layout=layout, **kw))
  return seen


def test_a_plan_for_described_tpu_devices_makes_tpu_choices_and_nothing_else_changes():
  cfg = make_config(**{"mesh.sequence": 2, "mesh.data": 4})
  host, tpu = make_plan(cfg), make_plan(cfg, jax.devices(), platform="tpu")
  assert (host.platform, tpu.platform) == ("cpu", "tpu")
  assert {p: s.implementation for p, s in host.attention.places().items()} == {
      "whole sequence": "xla", "sequence blocks": "xla", "prefill": "xla", "decode": "xla"}
  assert {p: s.implementation for p, s in tpu.attention.places().items()} == {
      "whole sequence": "splash", "sequence blocks": "splash", "prefill": "splash", "decode": "xla"}
  assert tpu.attention.interpret and not host.attention.interpret
  # Everything that is not a kernel is the same plan.
  assert (host.mesh_shape, host.sequence, host.pipeline) == (tpu.mesh_shape, tpu.sequence, tpu.pipeline)
  assert dict(host.mesh.shape) == dict(tpu.mesh.shape) and host.rules == tpu.rules
  specs = lambda plan: jax.tree.map(lambda s: s.spec, plan.shardings)
  assert specs(host) == specs(tpu)
  assert host.mdef.abstract_params == tpu.mdef.abstract_params


@pytest.mark.parametrize("platform", [None, "tpu"])
def test_the_unsplit_step_and_prefill_run_what_the_plan_says(platform, spy):
  plan = make_plan(make_config(**{"mesh.data": 8, "train.global_batch_size": 8}), platform=platform)
  kernel = plan.attention.full.implementation
  traced = programs.train_step(plan).trace(*abstract_inputs(plan))
  assert set(spy) == {("whole", kernel)}
  assert (pallas_calls(traced.jaxpr.jaxpr) > 0) == (kernel == "splash")

  # Prefill: a 256-token prompt is whole splash tiles, a 16-token one is not (XLA under auto).
  generation = programs.Generation(plan, max_new_tokens=1)  # what launch.generate runs
  params = programs.abstract_serving_params(plan)
  lengths = jax.ShapeDtypeStruct((8,), jnp.int32)
  for length in (256, 16):
    spy.clear()
    prompt = jax.ShapeDtypeStruct((8, length), jnp.int32)
    traced = generation.prefill.trace(params, prompt, lengths)
    assert set(spy) == {("whole", plan.attention.prefill.for_length(length))}
    assert (pallas_calls(traced.jaxpr.jaxpr) > 0) == (plan.attention.prefill.for_length(length) == "splash")
  assert (platform, plan.attention.prefill.for_length(256)) in ((None, "xla"), ("tpu", "splash"))


@pytest.mark.parametrize("platform", [None, "tpu"])
def test_ring_blocks_run_the_planned_kernel_in_both_layouts(platform, spy):
  plan = make_plan(make_config(**{"mesh.sequence": 2, "mesh.data": 4}), platform=platform)
  block = plan.attention.ring_block.implementation
  assert plan.sequence.layout == "zigzag" and plan.meta()["sequence"]["layout"] == "zigzag"
  natural = plan.natural_order_mdef()  # what a loss hook's model calls read
  hook = step_lib.LossHook(lambda p, b, extra: step_lib._loss(p, b, natural), None, None)
  for loss_hook, layout in ((None, "zigzag"), (hook, "natural")):
    spy.clear()
    traced = programs.train_step(plan, loss_hook).trace(*abstract_inputs(plan))
    assert set(spy) == {("block", block, layout)}  # and no whole-sequence attention
    assert (pallas_calls(traced.jaxpr.jaxpr) > 0) == (block == "splash")
  assert (platform, block) in ((None, "xla"), ("tpu", "splash"))


def test_a_run_prints_and_stores_its_plan(tmp_path, spy, capsys):
  c = get_config()
  c.data.data_dir = str(tmp_path / "data")
  c.train.update(dict(steps=2, eval_batches=1, tensorboard=False))
  c.mesh.update(dict(rules="sp", data=1, sequence=8))
  cfg = validate(c)
  loop.train(cfg, str(tmp_path / "run"))
  plan = make_plan(cfg)
  printed = capsys.readouterr()
  for line in plan.describe():
    assert line in printed.out + printed.err
  reader = ckpt_lib.Checkpointer(str(tmp_path / "run" / "checkpoints"), read_only=True)
  stored = reader.read_meta()["plan"]
  reader.close()
  assert json.loads(json.dumps(plan.meta())) == stored
  ran = {(kernel, layout) for _, kernel, layout in spy}
  assert ran == {(stored["attention"]["sequence blocks"]["implementation"], stored["sequence"]["layout"])}
