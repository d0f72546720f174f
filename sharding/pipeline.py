"""Pipeline parallelism over the `stage` mesh axis: the scanned layer stack split into stages.

The stacked block parameters [L, ...] are viewed as [P, L/P, ...] (GPipe) or [R, P, L/(R*P), ...]
(circular: each stage holds R non-consecutive groups of layers). The global batch is split into M
micro-batches. Every iteration, all P stages run at once (a `vmap` over the stage dimension, which
GSPMD partitions over the `stage` mesh axis) and their outputs move one stage on (a roll along the
stage dimension, which becomes a collective permute). Autodiff through the iterations gives the
backward pass: all forwards, then all backwards (GPipe). Nothing here is a second model: a stage
runs the same per-layer function the plain scan runs.

Shape suffixes: P stages, R repeats (circular groups per stage), C layers per group, M micro-batches,
b rows per micro-batch, L sequence length, D d_model.

Iterations: GPipe M + P - 1; circular M*R + P - 1 (M >= P). The idle share of a stage (the bubble)
is (P - 1) / (M + P - 1) for GPipe and (P - 1) / (M*R + P - 1) for circular. Under GSPMD a stage in
its bubble still computes, on zeros, so on a shared host the step time grows by exactly the bubble.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

STAGE_AXIS = "stage"          # the mesh axis (and logical name) stages are split over
SCHEDULES = ("gpipe", "circular")


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """How the layer stack is pipelined: `stages` (P), `microbatches` (M), schedule, circular `repeats` (R)."""
  stages: int
  microbatches: int
  schedule: str = "gpipe"
  repeats: int = 1

  @property
  def groups(self) -> int:
    """Layer groups the stack is cut into: P for GPipe, R * P for circular."""
    return self.stages * (self.repeats if self.schedule == "circular" else 1)

  @property
  def iterations(self) -> int:
    """Pipeline iterations per forward pass (each runs every stage once)."""
    rounds = self.microbatches * (self.repeats if self.schedule == "circular" else 1)
    return rounds + self.stages - 1

  @property
  def bubble(self) -> float:
    """The share of iterations a stage idles: (P - 1) / iterations."""
    return (self.stages - 1) / self.iterations


def pipeline_errors(pipe: Pipeline, num_layers: int, micro_batch_rows: int, data_shards: int) -> list[str]:
  """Messages for a pipeline that cannot run: layers not divisible into groups, a batch that does not
  split into micro-batches over the data axes, a circular schedule with fewer micro-batches than stages."""
  errors = []
  if pipe.schedule not in SCHEDULES:
    errors.append(f"train.pipeline_schedule={pipe.schedule!r}: choose one of {list(SCHEDULES)}.")
    return errors
  if pipe.microbatches < 1 or pipe.repeats < 1:
    errors.append(f"train.microbatches={pipe.microbatches}, train.pipeline_repeats={pipe.repeats}: "
                  "both must be >= 1.")
    return errors
  if num_layers % pipe.groups:
    what = (f"mesh.stage={pipe.stages}" if pipe.schedule == "gpipe" else
            f"mesh.stage x train.pipeline_repeats = {pipe.stages} x {pipe.repeats} = {pipe.groups}")
    errors.append(f"model.num_layers={num_layers} is not divisible by {what}; each stage needs whole "
                  "layers: pick a stage count (and repeats) that divides the layers.")
  if micro_batch_rows % (pipe.microbatches * data_shards):
    errors.append(f"the {micro_batch_rows} sequences of a step (global_batch_size / grad_accum_steps) do not "
                  f"split into train.microbatches={pipe.microbatches} micro-batches over the "
                  f"{data_shards} data shards (mesh.data x mesh.fsdp); use a batch that is a multiple of "
                  f"{pipe.microbatches * data_shards}.")
  if pipe.schedule == "circular" and pipe.microbatches < pipe.stages:
    errors.append(f"train.pipeline_schedule='circular' needs train.microbatches >= mesh.stage "
                  f"({pipe.microbatches} < {pipe.stages}): a micro-batch must be back at stage 0 "
                  "before its next layer group runs there.")
  return errors


def _to_micro(x_Bx: jax.Array, m: int) -> jax.Array:
  # Row i*M + j goes to micro-batch j, so every data shard keeps its rows (no resharding).
  return x_Bx.reshape(x_Bx.shape[0] // m, m, *x_Bx.shape[1:]).swapaxes(0, 1)


def _from_micro(x_Mxb: jax.Array) -> jax.Array:
  return x_Mxb.swapaxes(0, 1).reshape(-1, *x_Mxb.shape[2:])


def _stage_vmap(fn: Callable, in_axes) -> Callable:
  # spmd_axis_name: sharding constraints inside the stage function keep the stage dimension on the
  # stage mesh axis (without it they would force every stage's activations onto every device).
  return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=STAGE_AXIS)


def run_pipelined(pipe: Pipeline, layer_fn: Callable, blocks: nnx.Module, x_BxLxD: jax.Array,
                  row_inputs: tuple[jax.Array, ...], constrain: Callable) -> jax.Array:
  """Runs the stacked `blocks` over `x_BxLxD` as a pipeline; returns the output [B, L, D].

  `layer_fn(x_bxLxD, block, *rows)` applies one layer (remat already applied); `row_inputs` are
  per-row arrays [B, ...] the layers read (rotary tables, segment ids), carried with their rows.
  `constrain(x, names)` places stage buffers by logical names ("stage", "batch", ...).
  The result equals `nnx.scan(layer_fn)` over all layers in order.
  """
  p, m = pipe.stages, pipe.microbatches
  graphdef, params = nnx.split(blocks)
  num_layers = jax.tree.leaves(params)[0].shape[0]
  per_group = num_layers // pipe.groups
  if pipe.schedule == "gpipe":   # [L, ...] -> [1, P, L/P, ...]: repeat, stage, layer
    staged = jax.tree.map(lambda a: a.reshape(1, p, per_group, *a.shape[1:]), params)
  else:                          # [L, ...] -> [R, P, C, ...]: layer (r*P + s)*C + j
    staged = jax.tree.map(lambda a: a.reshape(pipe.repeats, p, per_group, *a.shape[1:]), params)

  def run_stage(stage_params_RxC, repeat, x_bxLxD, *rows):
    group = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, repeat, 0, keepdims=False),
                         stage_params_RxC)
    stage_blocks = nnx.merge(graphdef, group)
    step = lambda x, block: (layer_fn(x, block, *rows), None)
    x_bxLxD, _ = nnx.scan(step, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(x_bxLxD, stage_blocks)
    return x_bxLxD

  run_stages = _stage_vmap(run_stage, in_axes=(1, 0, 0) + (0,) * len(row_inputs))
  names = lambda a: ("stage", "batch") + (None,) * (a.ndim - 2)
  place = lambda tree: jax.tree.map(lambda a: constrain(a, names(a)), tree)

  xs_MxbxLxD = _to_micro(x_BxLxD, m)
  rows_Mxb = tuple(_to_micro(r, m) for r in row_inputs)
  state = place((jnp.zeros((p, *xs_MxbxLxD.shape[1:]), x_BxLxD.dtype),
                 tuple(jnp.zeros((p, *r.shape[1:]), r.dtype) for r in rows_Mxb)))
  outputs_MxbxLxD = jnp.zeros_like(xs_MxbxLxD)
  stage_ids_P = jnp.arange(p)
  staged_repeats = jax.tree.leaves(staged)[0].shape[0]

  def iteration(carry, t):
    (prev_out, prev_rows), outputs = carry
    # Stage 0 takes micro-batch t mod M: fresh on the first round, else what the last stage made of
    # it one round earlier (circular). Every other stage takes its left neighbour's output.
    micro = t % m
    first_round = t < m
    fresh = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, micro, 0, keepdims=False),
                         (xs_MxbxLxD, rows_Mxb))
    looped = (jax.lax.dynamic_index_in_dim(outputs, micro, 0, keepdims=False),
              jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, micro, 0, keepdims=False), rows_Mxb))
    head = jax.tree.map(lambda f, l: jnp.where(first_round, f, l), fresh, looped)
    shifted = jax.tree.map(lambda a: jnp.roll(a, 1, axis=0), (prev_out, prev_rows))
    inputs = jax.tree.map(lambda s, h: s.at[0].set(h), shifted, head)
    inputs = place(inputs)
    repeat_P = jnp.clip((t - stage_ids_P) // m, 0, staged_repeats - 1)
    out = place(run_stages(staged, repeat_P, inputs[0], *inputs[1]))
    # The last stage finished micro-batch (t - P + 1) mod M (of some round); keep it for the next round
    # (circular) or as the result (the last round overwrites earlier ones).
    done = t - (p - 1)
    slot = jnp.clip(done, 0, None) % m
    last = jnp.where(done >= 0, out[p - 1], jax.lax.dynamic_index_in_dim(outputs, slot, 0, keepdims=False))
    outputs = jax.lax.dynamic_update_index_in_dim(outputs, last, slot, 0)
    return ((out, inputs[1]), outputs), None

  (_, outputs_MxbxLxD), _ = jax.lax.scan(iteration, (state, outputs_MxbxLxD), jnp.arange(pipe.iterations))
  return _from_micro(outputs_MxbxLxD)


def stage_of_layer(pipe: Pipeline, layer: int, num_layers: int) -> int:
  """The stage that runs `layer` (for pictures and docs)."""
  return (layer // (num_layers // pipe.groups)) % pipe.stages

