"""The train and eval steps as pure functions of (state, batch); launch/run/programs.py jits them
from the run plan."""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from lm import axes
from lm.loss import chunked_cross_entropy
from lm.transformer import positions_in_documents
from launch.run.state import ModelDef, TrainState
from sharding import rules as rules_lib
from sharding import zigzag

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


def _loss(params, batch: Batch, mdef: ModelDef):
  """(mean loss, (loss_sum, tokens)); the sequence order is the model's own plan's (`ring_layout`):
  under the ring's zigzag layout the batch is reordered here, so order and mask cannot disagree."""
  model = mdef.bind(params)
  positions_BxL = None
  # No plan (a shapes-only model, which raises when its attention runs): natural order.
  zigzag_shards = 0 if mdef.attention is None else mdef.attention.zigzag_shards
  if zigzag_shards > 1:
    order_L = zigzag.zigzag_order(batch["inputs"].shape[1], zigzag_shards)
    batch, positions_BxL = reorder_sequence(batch, order_L)
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


def train_step(state: TrainState, batch: Batch, extra=None, *, mdef: ModelDef,
               tx: optax.GradientTransformation, schedule: optax.Schedule, accum_steps: int,
               loss_fn: Callable | None = None, skip_nonfinite: bool = False) -> tuple[TrainState, dict]:
  """One optimizer update over the global batch, split into `accum_steps` micro-batches.

  The cross-entropy loss reads each sequence in the order `mdef`'s attention plan names (zigzag
  under the ring); a loss hook's model calls read the natural order (their mdef's plan says so).

  `loss_fn(params, batch, extra)` (a LossHook's) replaces the cross-entropy when given. With
  `skip_nonfinite`, a step whose loss or gradient norm is NaN/inf leaves params and optimizer state
  unchanged (train.nonfinite=skip_step); the step counter still advances (the batch is consumed).
  Returns (new state, metrics dict of float32 scalars: loss, grad_norm, learning_rate, tokens,
  nonfinite (1.0 when loss or grad_norm is NaN/inf; the host reads it one step late, like the rest)).
  """
  loss = (functools.partial(_loss, mdef=mdef) if loss_fn is None
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


def eval_step(params, batch: Batch, *, mdef: ModelDef) -> dict:
  """Returns {"loss_sum", "tokens"} for one batch (sums, so batches combine exactly)."""
  _, (loss_sum, tokens) = _loss(params, batch, mdef)
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
