"""The model's static structure, traced once per config without allocating: what every caller that
needs the parameter tree, its logical names or a graphdef to rebuild the model asks for."""

import dataclasses
import functools
from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from lm.attention_plan import AttentionPlan
from lm.config import ModelConfig
from lm.transformer import LayerStack, RematWrapper, Transformer

Params = dict[str, Any]

# Logical names live on the Param variables; sharding is decided by rule tables, never at creation.
nnx.use_eager_sharding(False)


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """The model's static structure.

  `abstract`: the Transformer with jax.ShapeDtypeStruct leaves (its submodules, for code that walks
  them); `graphdef`: what `nnx.merge` rebuilds it from; `abstract_params`: every variable as a nested
  dict of ShapeDtypeStructs; `logical_names`: the same tree with a tuple of logical axis names per leaf;
  `attention`: the kernels per place the model runs (its graph carries them; callers read the
  sequence layout from here, so a step's token order and the model's mask cannot disagree), None for
  a model built for its shapes only (running it raises ValueError).
  """
  cfg: ModelConfig
  graphdef: Any
  abstract_params: Params
  logical_names: Params
  attention: AttentionPlan | None
  abstract: Any = dataclasses.field(default=None, compare=False, repr=False)

  def bind(self, params: Params) -> Transformer:
    """Returns a Transformer module whose parameters are `params` (usable inside jit)."""
    return nnx.merge(self.graphdef, params)


def for_shapes(cfg: ModelConfig) -> ModelConfig:
  """`cfg` to trace parameter shapes only (a restore target, logical names): the compute dtype shapes
  no parameter, so a model.dtype of "auto" (which the run plan settles per target) traces as float32.
  Never run a model built from it: build that from a run plan."""
  return dataclasses.replace(cfg, dtype="float32") if cfg.dtype == "auto" else cfg


@functools.lru_cache(maxsize=32)
def define(cfg: ModelConfig, attention: AttentionPlan | None = None, remat_wrapper: RematWrapper | None = None,
           layer_stack: LayerStack | None = None, per_layer: bool = False) -> ModelDef:
  """Traces Transformer(cfg, ...) with `nnx.eval_shape` (nothing allocated) and returns its ModelDef.

  `attention` (a run plan's kernels per place; None: shapes only, running it raises), `remat_wrapper`
  and `layer_stack` (a pipeline) are the Transformer's own arguments; the graphdef carries them to
  every model rebuilt from it. The parameters are the same whatever they are, except that `per_layer` (the serving
  layout, lm/serving.py) holds one tree per layer. Cached per argument tuple.
  """
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), remat_wrapper=remat_wrapper,
                                                layer_stack=layer_stack, attention=attention,
                                                per_layer=per_layer))
  graphdef, state = nnx.split(abstract)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
  names = jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  return ModelDef(cfg, graphdef, nnx.to_pure_dict(state), names, attention, abstract)
