"""The jitted train and eval steps: pure functions of (state, batch)."""

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from lm import axes
from lm.loss import cross_entropy
from launch.train_state import ModelDef, TrainState
from sharding import rules as rules_lib

Batch = dict[str, jax.Array]  # {"inputs": int32 [B, L], "targets": int32 [B, L]}


def _loss(params, batch: Batch, mdef: ModelDef):
  logits_BxLxV = mdef.bind(params)(batch["inputs"])
  loss_sum, tokens = cross_entropy(logits_BxLxV, batch["targets"])
  return loss_sum / tokens, (loss_sum, tokens)


def train_step(state: TrainState, batch: Batch, *, mdef: ModelDef, tx: optax.GradientTransformation,
               schedule: optax.Schedule, accum_steps: int) -> tuple[TrainState, dict]:
  """One optimizer update over the global batch, split into `accum_steps` micro-batches.

  Returns (new state, metrics dict of float32 scalars: loss, grad_norm, learning_rate, tokens).
  """
  grad_fn = jax.value_and_grad(functools.partial(_loss, mdef=mdef), has_aux=True)
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
  metrics = {"loss": loss_sum / tokens, "grad_norm": optax.global_norm(grads),
             "learning_rate": schedule(state.step), "tokens": tokens}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: Batch, *, mdef: ModelDef) -> dict:
  """Returns {"loss_sum", "tokens"} for one batch (sums, so batches combine exactly)."""
  _, (loss_sum, tokens) = _loss(params, batch, mdef)
  return {"loss_sum": loss_sum, "tokens": tokens}


def batch_sharding(mesh: Mesh, rules: rules_lib.Rules) -> NamedSharding:
  """Sharding of a [batch, length] token array: rows split over the data axes."""
  return NamedSharding(mesh, rules_lib.logical_to_spec(("batch", "length"), rules))


def activation_constraint(mesh: Mesh, rules: rules_lib.Rules):
  """The constraint function lm.axes.constrain calls while the steps are traced."""
  def constrain(x, names):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, rules_lib.logical_to_spec(names, rules)))
  return constrain


def jit_train_step(mdef: ModelDef, tx, schedule, accum_steps: int, mesh: Mesh, rules, state_shardings):
  """Returns the compiled-on-first-call train step with explicit shardings and the state donated."""
  step = functools.partial(train_step, mdef=mdef, tx=tx, schedule=schedule, accum_steps=accum_steps)
  data = batch_sharding(mesh, rules)
  jitted = jax.jit(step, in_shardings=(state_shardings, {"inputs": data, "targets": data}),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))
  return _traced_under(jitted, mesh, rules)


def jit_eval_step(mdef: ModelDef, mesh: Mesh, rules, param_shardings):
  """Returns the jitted eval step over sharded parameters and a sharded batch."""
  data = batch_sharding(mesh, rules)
  jitted = jax.jit(functools.partial(eval_step, mdef=mdef),
                   in_shardings=(param_shardings, {"inputs": data, "targets": data}))
  return _traced_under(jitted, mesh, rules)


class _traced_under:
  """Calls a jitted function with the activation-sharding rules installed (they matter at trace time)."""

  def __init__(self, jitted, mesh, rules):
    self.jitted, self.constraint = jitted, activation_constraint(mesh, rules)

  def __call__(self, *args):
    with axes.use_constraint(self.constraint):
      return self.jitted(*args)

  def lower(self, *args):
    with axes.use_constraint(self.constraint):
      return self.jitted.lower(*args)
