"""Loads and runs an artifact written by compress/export.py with nothing but jax and numpy.

This file imports no model code on purpose: copy it next to an artifact and serve.

  python compress/servable.py ARTIFACT_DIR 1,2,3,4   # prints the argmax next token after each position
                                                    # (and, if exported, the generated continuation)
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
    self.generator = None
    if os.path.exists(os.path.join(directory, "generate.stablehlo")):
      with open(os.path.join(directory, "generate.stablehlo"), "rb") as f:
        self.generator = jax.export.deserialize(bytearray(f.read()))
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

  def generate(self, prompt_BxP, prompt_lengths_B=None, seed: int = 0) -> jax.Array:
    """Continues left-padded int prompts [B, seq_len] (row b's tokens in its last prompt_lengths_B[b]
    columns; default: all) by `generate_tokens` tokens; returns int32 tokens [B, seq_len + generate_tokens]."""
    if self.generator is None:
      raise ValueError("this artifact has no generate.stablehlo; export with --generate_tokens N.")
    prompt_BxP = jnp.asarray(prompt_BxP, jnp.int32)
    batch, seq_len = self.info["batch"], self.info["seq_len"]
    if prompt_BxP.ndim != 2 or prompt_BxP.shape[1] != seq_len or batch not in (None, prompt_BxP.shape[0]):
      raise ValueError(f"prompts have shape {prompt_BxP.shape}; this artifact takes "
                       f"[{batch or 'any batch'}, {seq_len}] (left-pad shorter prompts).")
    if prompt_lengths_B is None:
      prompt_lengths_B = np.full((prompt_BxP.shape[0],), seq_len, np.int32)
    return self.generator.call(*self.params, prompt_BxP, jnp.asarray(prompt_lengths_B, jnp.int32),
                               jnp.int32(seed))


if __name__ == "__main__":
  servable = Servable(sys.argv[1])
  tokens = [int(t) for t in sys.argv[2].split(",")]
  padded = np.zeros((1, servable.info["seq_len"]), np.int32)
  padded[0, :len(tokens)] = tokens
  print(np.asarray(servable(padded)[0, :len(tokens)].argmax(-1)).tolist())
  if servable.generator is not None:
    left = np.zeros((1, servable.info["seq_len"]), np.int32)
    left[0, servable.info["seq_len"] - len(tokens):] = tokens
    print(np.asarray(servable.generate(left, [len(tokens)])[0, servable.info["seq_len"]:]).tolist())
