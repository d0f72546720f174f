"""Loads and runs an artifact written by compress/export.py with nothing but jax and numpy.

This file imports no model code on purpose: copy it next to an artifact and serve.

  python compress/servable.py ARTIFACT_DIR 1,2,3,4   # prints the argmax next token after each position
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np


class Servable:
  """`Servable(directory)(tokens_BxL)` returns float32 logits [B, L, V] from the exported forward."""

  def __init__(self, directory: str):
    if not os.path.isdir(directory):
      raise ValueError(f"No servable artifact at {directory}; write one with python -m launch.export.")
    with open(os.path.join(directory, "servable.json")) as f:
      self.info = json.load(f)
    with open(os.path.join(directory, "forward.stablehlo"), "rb") as f:
      self.exported = jax.export.deserialize(bytearray(f.read()))
    arrays = np.load(os.path.join(directory, "params.npz"))
    dtypes = self.info["param_dtypes"]
    self.params = [jnp.asarray(arrays[f"p{i:05d}"], dtype=dtypes[i]) for i in range(len(dtypes))]

  def __call__(self, tokens_BxL) -> jax.Array:
    tokens_BxL = jnp.asarray(tokens_BxL, jnp.int32)
    batch, seq_len = self.info["batch"], self.info["seq_len"]
    if tokens_BxL.ndim != 2 or tokens_BxL.shape[1] != seq_len or batch not in (None, tokens_BxL.shape[0]):
      raise ValueError(f"tokens have shape {tokens_BxL.shape}; this artifact takes "
                       f"[{batch or 'any batch'}, {seq_len}].")
    return self.exported.call(*self.params, tokens_BxL)


if __name__ == "__main__":
  servable = Servable(sys.argv[1])
  tokens = [int(t) for t in sys.argv[2].split(",")]
  padded = np.zeros((1, servable.info["seq_len"]), np.int32)
  padded[0, :len(tokens)] = tokens
  print(np.asarray(servable(padded)[0, :len(tokens)].argmax(-1)).tolist())
