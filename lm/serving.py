"""The decoder's weights laid out for serving: each layer's its own arrays, already in the compute dtype.

Training stacks the layers' weights ([layers, ...]) and scans over them. In a decode step that layout
costs more than the matmuls: XLA copies each layer's slice out of the stack before its matmul (a
`dynamic-slice` fusion on CPU; on GPU the gemm cannot read a sliced operand either), and float32
stored weights are cast to the compute dtype on every call. So the weights are re-laid out once at
load: `serving_params` casts float matrices to the compute dtype and splits the stack into one tree
per layer, the parameters of the same `Transformer` built with `per_layer=True` (lm/transformer.py),
which runs its Blocks in a Python loop with one KV cache array per layer (written in place, read
without a slice). The layout has the same logical names as training's, minus `layers`, so any rule
table places it (launch/run/programs.py shards it by the run plan's).
"""

from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]


def serving_params(params: Params, dtype=None, unstack: bool = True) -> Params:
  """Returns `params` (a Transformer's nested dict) ready to serve; run it once, at load.

  Float weight matrices (every `kernel` and embedding `table`) are cast to `dtype` (None: left as
  they are); norm scales and int8 scales / smoothing stay float32 (tiny, and they set every output's
  precision); int8 kernels stay int8. With `unstack`, `params["blocks"]` (leaves [layers, ...]) is
  replaced by `params["layers"]`, {layer index: that layer's tree}: the parameters of a
  `Transformer(..., per_layer=True)`.
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
  return {**rest, "layers": {i: jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(num_layers)}}
