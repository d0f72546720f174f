"""The jitted train and eval steps: pure functions of (state, batch)."""

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from lm import attention as attention_lib
from lm import axes
from lm.loss import chunked_cross_entropy
from lm.transformer import positions_in_documents
from launch.run.state import ModelDef, TrainState
from sharding import rules as rules_lib
from sharding import ring_attention
from sharding import sequence as sequence_lib

# {"inputs": int32 [B, L], "targets": int32 [B, L], "segment_ids": int32 [B, L], "loss_weights":
# float32 [B, L]}; segment_ids (the document index of each token within its packed row) may be absent:
# then one row is one document; loss_weights (0 on instruction prompts) may be absent: all count.
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LossHook:
  """A replacement training loss that reads frozen inputs, e.g. a teacher's parameters (compress/).

  `fn(params, batch, extra) -> (mean loss, (loss_sum, tokens))` like `_loss`. `extra` enters the
  jitted step as an argument placed with `extra_shardings`, never as a constant baked into the program.
  """
  fn: Callable
  extra: Any
  extra_shardings: Any


def _loss(params, batch: Batch, mdef: ModelDef, zigzag_shards: int = 0):
  model = mdef.bind(params)
  positions_BxL = None
  if zigzag_shards > 1:
    order_L = ring_attention.zigzag_order(batch["inputs"].shape[1], zigzag_shards)
    batch, positions_BxL = reorder_sequence(batch, order_L)
  layout = sequence_lib.zigzag_layout() if zigzag_shards > 1 else contextlib.nullcontext()
  with layout:
    hidden_BxLxD, _ = model.hidden_states(batch["inputs"], positions_BxL,
                                          segment_ids_BxL=batch.get("segment_ids"))
  loss_sum, tokens = chunked_cross_entropy(hidden_BxLxD, batch["targets"], model.logits,
                                           mdef.cfg.logits_chunk_size, batch.get("loss_weights"))
  return loss_sum / tokens, (loss_sum, tokens)


def reorder_sequence(batch: Batch, order_L: np.ndarray) -> tuple[Batch, jax.Array]:
  """The batch's [B, L] arrays reordered along length (new index i holds old index order_L[i]), and
  each token's position [B, L] computed before reordering (offset in its document, or its index).

  The loss is a sum over tokens, so it does not change; attention masks by position (sharding/sequence.py).
  """
  segments_BxL = batch.get("segment_ids")
  if segments_BxL is None:
    positions_BxL = jnp.broadcast_to(jnp.arange(batch["inputs"].shape[1], dtype=jnp.int32),
                                     batch["inputs"].shape)
  else:
    positions_BxL = positions_in_documents(segments_BxL)
  reorder = lambda x_BxL: jnp.take(x_BxL, jnp.asarray(order_L), axis=1)
  return jax.tree.map(reorder, dict(batch)), reorder(positions_BxL)


def zigzag_shards(mesh: Mesh, strategy: str) -> int:
  """Over how many sequence shards the steps lay each sequence out in ring attention's zigzag
  order (so every device does equal causal work): the mesh's sequence size under the ring
  strategy, else 0 (natural order)."""
  shards = mesh.shape.get(sequence_lib.AXIS, 1)
  return shards if shards > 1 and strategy == "ring" else 0


def train_step(state: TrainState, batch: Batch, extra=None, *, mdef: ModelDef,
               tx: optax.GradientTransformation, schedule: optax.Schedule, accum_steps: int,
               loss_fn: Callable | None = None, skip_nonfinite: bool = False,
               zigzag_shards: int = 0) -> tuple[TrainState, dict]:
  """One optimizer update over the global batch, split into `accum_steps` micro-batches.

  `zigzag_shards` > 1: the cross-entropy loss reads each sequence in the zigzag order over that many
  sequence shards (see `zigzag_shards`); loss hooks read the natural order.

  `loss_fn(params, batch, extra)` (a LossHook's) replaces the cross-entropy when given. With
  `skip_nonfinite`, a step whose loss or gradient norm is NaN/inf leaves params and optimizer state
  unchanged (train.nonfinite=skip_step); the step counter still advances (the batch is consumed).
  Returns (new state, metrics dict of float32 scalars: loss, grad_norm, learning_rate, tokens,
  nonfinite (1.0 when loss or grad_norm is NaN/inf; the host reads it one step late, like the rest)).
  """
  loss = (functools.partial(_loss, mdef=mdef, zigzag_shards=zigzag_shards) if loss_fn is None
          else lambda params, b: loss_fn(params, b, extra))
  grad_fn = jax.value_and_grad(loss, has_aux=True)
  if accum_steps == 1:
    (_, (loss_sum, tokens)), grads = grad_fn(state.params, batch)
  else:
    # Row i*accum + j goes to micro-batch j, so every device keeps its rows (no resharding).
    def split(x_BxL):
      micro = x_BxL.shape[0] // accum_steps
      x = x_BxL.reshape(micro, accum_steps, *x_BxL.shape[1:]).swapaxes(0, 1)
      return axes.constrain(x, (None, "batch", "length"))
    micro_batches = jax.tree.map(split, batch)

    def accumulate(carry, micro_batch):
      grad_sum, loss_sum, tokens = carry
      (_, (l, n)), g = grad_fn(state.params, micro_batch)
      return (jax.tree.map(jnp.add, grad_sum, g), loss_sum + l, tokens + n), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss_sum, tokens), _ = jax.lax.scan(
        accumulate, (zeros, jnp.float32(0), jnp.float32(0)), micro_batches)
    grads = jax.tree.map(lambda g: g / accum_steps, grads)  # mean of per-micro-batch mean grads

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss_sum / tokens) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     (params, opt_state), (state.params, state.opt_state))
  metrics = {"loss": loss_sum / tokens, "grad_norm": grad_norm,
             "learning_rate": schedule(state.step), "tokens": tokens,
             "nonfinite": 1.0 - finite.astype(jnp.float32)}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: Batch, *, mdef: ModelDef, zigzag_shards: int = 0) -> dict:
  """Returns {"loss_sum", "tokens"} for one batch (sums, so batches combine exactly)."""
  _, (loss_sum, tokens) = _loss(params, batch, mdef, zigzag_shards)
  return {"loss_sum": loss_sum, "tokens": tokens}


def batch_sharding(mesh: Mesh, rules: rules_lib.Rules) -> NamedSharding:
  """Sharding of a [batch, length] token array: rows split over the data axes.

  The jitted steps take it for the whole batch dict, so every [B, L] entry (inputs, targets,
  segment_ids) is placed alike, whichever of them a batch carries.
  """
  return NamedSharding(mesh, rules_lib.logical_to_spec(("batch", "length"), rules))


def global_batch(local_batch: dict, sharding: NamedSharding) -> Batch:
  """Assembles global arrays from this process's rows (the same call works single- or multi-host)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def activation_constraint(mesh: Mesh, rules: rules_lib.Rules):
  """The constraint function lm.axes.constrain calls while the steps are traced."""
  def constrain(x, names):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, rules_lib.logical_to_spec(names, rules)))
  return constrain


def per_shard_map(mesh: Mesh, rules: rules_lib.Rules):
  """The wrapper lm.axes.per_shard calls while the steps are traced: a shard_map by logical names.

  Kernels GSPMD cannot split (Pallas splash attention) run once per device on its block.
  """
  def wrap(fn, in_names, out_names):
    specs = lambda names: rules_lib.logical_to_spec(names, rules)
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs(n) for n in in_names),
                         out_specs=specs(out_names), check_vma=False)
  return wrap


def jit_train_step(mdef: ModelDef, tx, schedule, accum_steps: int, mesh: Mesh, rules, state_shardings,
                   loss_hook: LossHook | None = None, skip_nonfinite: bool = False,
                   sequence_attention: str = "ring"):
  """Returns the compiled-on-first-call train step with explicit shardings and the state donated.

  `skip_nonfinite`: see train_step (train.nonfinite=skip_step). `sequence_attention`
  (mesh.sequence_attention: ring | all_gather) matters only on a mesh with a sequence axis: how
  attention crosses its shards, and (ring) the zigzag order of each sequence.

  Either way it is called as step(state, batch); a `loss_hook`'s extra inputs are passed for you.
  """
  step = functools.partial(train_step, mdef=mdef, tx=tx, schedule=schedule, accum_steps=accum_steps,
                           loss_fn=loss_hook and loss_hook.fn, skip_nonfinite=skip_nonfinite,
                           zigzag_shards=zigzag_shards(mesh, sequence_attention))
  data = batch_sharding(mesh, rules)
  in_shardings = (state_shardings, data)
  if loss_hook is not None:
    in_shardings += (loss_hook.extra_shardings,)
  jitted = jax.jit(step, in_shardings=in_shardings, out_shardings=(state_shardings, None),
                   donate_argnums=(0,))
  return _traced_under(jitted, mesh, rules, () if loss_hook is None else (loss_hook.extra,),
                       sequence_attention, attention=mdef.cfg.attention)


def jit_eval_step(mdef: ModelDef, mesh: Mesh, rules, param_shardings, sequence_attention: str = "ring"):
  """Returns the jitted eval step over sharded parameters and a sharded batch (`sequence_attention`:
  see jit_train_step)."""
  data = batch_sharding(mesh, rules)
  jitted = jax.jit(functools.partial(eval_step, mdef=mdef,
                                     zigzag_shards=zigzag_shards(mesh, sequence_attention)),
                   in_shardings=(param_shardings, data))
  return _traced_under(jitted, mesh, rules, sequence_attention=sequence_attention,
                       attention=mdef.cfg.attention)


class _traced_under:
  """Calls a jitted function with the activation-sharding rules installed (they matter at trace time),
  and, on a mesh that splits sequences, attention across sequence shards (`sequence_attention`, its
  blocks through the kernel `sequence_lib.ring_block_kernel` picks for model.attention=`attention`
  on the mesh's platform, or on `platform` when given; `interpret`: see sequence_attention_fn)."""

  def __init__(self, jitted, mesh, rules, bound_args: tuple = (), sequence_attention: str = "ring",
               attention: str = "auto", platform: str | None = None, interpret: bool = False):
    self.jitted, self.constraint = jitted, activation_constraint(mesh, rules)
    self.per_shard = per_shard_map(mesh, rules)
    platform = platform or attention_lib.platform_of(mesh.devices.flat[0])
    self.across_shards = (None if mesh.shape.get(sequence_lib.AXIS, 1) == 1 else
                          sequence_lib.sequence_attention_fn(mesh, rules, sequence_attention,
                                                             attention_lib.xla_attention,
                                                             requested=attention, platform=platform,
                                                             interpret=interpret))
    self.bound_args = bound_args  # trailing arguments passed on every call (a LossHook's extra)

  def _hooks(self):
    stack = contextlib.ExitStack()
    stack.enter_context(axes.use_constraint(self.constraint))
    stack.enter_context(axes.use_per_shard(self.per_shard))
    stack.enter_context(axes.use_sequence_attention(self.across_shards))
    return stack

  def __call__(self, *args):
    with self._hooks():
      return self.jitted(*args, *self.bound_args)

  def lower(self, *args):
    with self._hooks():
      return self.jitted.lower(*args, *self.bound_args)
