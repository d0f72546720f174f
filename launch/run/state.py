"""The training state, and creating it directly in its sharded layout (never whole on one device)."""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm.attention_plan import AttentionPlan
from lm.config import ModelConfig
from lm.model_def import ModelDef, define
from lm.transformer import Transformer
from sharding import pipeline as pipeline_lib
from sharding import remat as remat_lib
from sharding import rules as rules_lib

Params = dict[str, Any]

# Logical names live on the Param variables; sharding is decided by rule tables, never at creation.
nnx.use_eager_sharding(False)


class TrainState(struct.PyTreeNode):
  """Everything a step updates: step counter, parameters (a nested dict) and optimizer state."""
  step: jax.Array
  params: Params
  opt_state: Any


def model_def(cfg: ModelConfig, pipeline: pipeline_lib.Pipeline | None = None,
              attention: AttentionPlan | None = None, per_layer: bool = False) -> ModelDef:
  """Traces the model's shapes without allocating; cfg.remat picks the remat policy, `pipeline` (when
  the mesh has stages) how the layer stack runs, `attention` (a run plan's) the kernel per place,
  which the graphdef then carries to every model rebuilt from it. Parameters are the same either way,
  except `per_layer` (the serving layout: one tree per layer, lm/serving.py)."""
  runner = None if pipeline is None else functools.partial(pipeline_lib.run_pipelined, pipeline)
  return define(cfg, attention, remat_lib.remat_wrapper(cfg.remat), runner, per_layer)


def init_params(mdef: ModelDef, rng: jax.Array) -> Params:
  """Creates fresh parameters (a nested dict) from `rng`; call inside jit to place them sharded."""
  model = Transformer(mdef.cfg, rngs=nnx.Rngs(params=rng))
  return nnx.to_pure_dict(nnx.state(model))


def param_shardings(mdef: ModelDef, mesh: Mesh, rules: rules_lib.Rules) -> Params:
  """Returns a NamedSharding per parameter from the rule table; raises ValueError if one does not divide."""
  return rules_lib.tree_shardings(mdef.logical_names, mdef.abstract_params, mesh, rules)


def state_shardings(mdef: ModelDef, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: rules_lib.Rules) -> TrainState:
  """Shardings of the whole TrainState: optimizer moments follow their parameter, scalars replicate."""
  p_shard = param_shardings(mdef, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_opt = jax.eval_shape(tx.init, mdef.abstract_params)
  opt_shard = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, p_shard,
                                    transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=p_shard, opt_state=opt_shard)


def abstract_params(mdef: ModelDef, shardings: Params) -> Params:
  """The parameters as jax.ShapeDtypeStructs carrying `shardings` (a restore target)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      mdef.abstract_params, shardings)


def abstract_state(mdef: ModelDef, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
  """The TrainState as jax.ShapeDtypeStructs carrying their shardings (a restore target)."""
  shapes = jax.eval_shape(lambda: TrainState(jnp.zeros((), jnp.int32), mdef.abstract_params,
                                             tx.init(mdef.abstract_params)))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def _fresh(params: Params, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def init_train_state(mdef: ModelDef, tx: optax.GradientTransformation, shardings: TrainState,
                     seed: int) -> TrainState:
  """Initializes parameters and optimizer state inside jit, each array born in its sharded layout."""
  init = lambda rng: _fresh(init_params(mdef, rng), tx)
  return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def train_state_from_params(params: Params, tx: optax.GradientTransformation,
                            shardings: TrainState) -> TrainState:
  """A step-0 TrainState around `params` (e.g. restored ones) with a fresh optimizer state, sharded.

  `params` are donated: their buffers become the state's.
  """
  return jax.jit(functools.partial(_fresh, tx=tx), out_shardings=shardings, donate_argnums=0)(params)
