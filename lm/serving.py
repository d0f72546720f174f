"""The decoder laid out for serving: each layer's weights their own arrays, already in the compute dtype.

Training stacks the layers' weights ([layers, ...]) and scans over them. In a decode step that layout
costs more than the matmuls: XLA copies each layer's slice out of the stack before its matmul (a
`dynamic-slice` fusion on CPU; on GPU the gemm cannot read a sliced operand either), and float32
stored weights are cast to the compute dtype on every call. So the weights are re-laid out once at
load: `serving_params` casts float matrices to the compute dtype and splits the stack into one tree
per layer, and `ServingModel` runs the same `Block`s in a Python loop over those trees, with one KV
cache array per layer (written in place, read without a slice).

`ServingModel` has `Transformer.decode`'s interface (and `cfg`), so `lm.decoding` runs either;
`make_generate_fn(cfg, ...)` (a ModelConfig instead of a graphdef) builds it from serving params.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lm import kv_cache
from lm.attention import AttentionPlan
from lm.config import ModelConfig
from lm.model_def import define
from lm.transformer import KVCache, Transformer, cache_mask, padding_segments, rotary_inputs

Params = dict[str, Any]


def serving_params(params: Params, dtype=None, unstack: bool = True) -> Params:
  """Returns `params` (a Transformer's nested dict) ready to serve; run it once, at load.

  Float weight matrices (every `kernel` and embedding `table`) are cast to `dtype` (None: left as
  they are); norm scales and int8 scales / smoothing stay float32 (tiny, and they set every output's
  precision); int8 kernels stay int8. With `unstack`, `params["blocks"]` (leaves [layers, ...]) is
  replaced by `params["layers"]`, a list with one tree per layer: the input of `ServingModel`.
  """
  def cast(path, x):
    name = getattr(path[-1], "key", None)
    if dtype is not None and name in ("kernel", "table") and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x

  params = jax.tree_util.tree_map_with_path(cast, params)
  if not unstack:
    return params
  blocks = params["blocks"]
  num_layers = jax.tree.leaves(blocks)[0].shape[0]
  rest = {k: v for k, v in params.items() if k != "blocks"}
  return {**rest, "layers": [jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(num_layers)]}


@functools.lru_cache(maxsize=16)
def _graphdefs(cfg: ModelConfig, attention: AttentionPlan | None) -> dict[str, Any]:
  """The graphdefs of the Transformer's parts (one block, embedding, final norm, output projection)."""
  abstract = define(cfg, attention).abstract
  parts = {"block": abstract.blocks, "embed": abstract.embed, "final_norm": abstract.final_norm}
  if abstract.unembed is not None:
    parts["unembed"] = abstract.unembed
  return {name: nnx.split(module)[0] for name, module in parts.items()}


def init_serving_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
  """A zero KV cache of one array per layer: {"k": [L x [1, B, max_len, G, K]], "v": same} (and
  the int8 cache's "k_scale", "v_scale" lists, lm/kv_cache.py).

  Each layer's array keeps a leading size-1 `layers` axis, so `Attention` writes it at layer 0.
  """
  per_layer = [kv_cache.empty(cfg, 1, batch, max_len) for _ in range(cfg.num_layers)]
  return {name: [layer[name] for layer in per_layer] for name in per_layer[0]}


class ServingModel:
  """`Transformer.decode` over per-layer weights from `serving_params`; build it inside jit.

  Holds no state of its own: each call rebuilds the parts from their graphdefs and `params`.
  `attention` is a run plan's attention plan (the prefill kernel; None: `lm.attention.unplanned`).
  """

  def __init__(self, cfg: ModelConfig, params: Params, attention: AttentionPlan | None = None):
    if "layers" not in params:
      raise ValueError("ServingModel takes serving params (lm.serving.serving_params), with a per-layer "
                       "'layers' list; got a Transformer's stacked 'blocks'.")
    self.cfg, self.params, self.attention = cfg, params, attention

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    return init_serving_cache(self.cfg, batch, max_len)

  def decode(self, tokens_BxL, cache: KVCache, cache_index, positions_BxL=None, key_start_B=None,
             last_only: bool = False):
    """As `Transformer.decode`: returns (float32 logits [B, L, V] (or [B, 1, V] with `last_only`),
    the updated per-layer cache)."""
    cfg, graphdefs, params = self.cfg, _graphdefs(self.cfg, self.attention), self.params
    batch, length = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(cache_index + jnp.arange(length, dtype=jnp.int32), (batch, length))
    sin, cos = rotary_inputs(cfg, positions_BxL)
    # `Transformer.logits` reads only `.embed` and `.unembed`: the parts stand in for the whole model.
    self.embed = nnx.merge(graphdefs["embed"], params["embed"])
    self.unembed = nnx.merge(graphdefs["unembed"], params["unembed"]) if "unembed" in graphdefs else None
    x_BxLxD = self.embed(tokens_BxL)
    mask_BxLxS = cache_mask(cache["k"][0].shape[2], cache_index, length, key_start_B)
    segments_BxL = padding_segments(cache_index, length, key_start_B)
    new_cache = {name: list(arrays) for name, arrays in cache.items()}
    for i, layer_params in enumerate(params["layers"]):
      block = nnx.merge(graphdefs["block"], layer_params)
      x_BxLxD, layer_cache = block(x_BxLxD, sin, cos, segments_BxL, mask_BxLxS,
                                   {name: arrays[i] for name, arrays in cache.items()}, cache_index, 0)
      for name, array in layer_cache.items():
        new_cache[name][i] = array
    hidden_BxLxD = nnx.merge(graphdefs["final_norm"], params["final_norm"])(x_BxLxD)
    return Transformer.logits(self, hidden_BxLxD[:, -1:] if last_only else hidden_BxLxD), new_cache
