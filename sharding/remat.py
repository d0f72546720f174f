"""Rematerialization policies by name: what a decoder block keeps for the backward pass."""

from typing import Callable

import jax
from flax import nnx

# Names tagged with `checkpoint_name` in lm/transformer.py.
_BLOCK_ACTIVATIONS = ("query", "key", "value", "attention", "mlp_hidden")

REMAT_POLICIES: dict[str, object] = {
    "none": None,                                                     # keep everything
    "full": jax.checkpoint_policies.nothing_saveable,                 # recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,                  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_mlp": jax.checkpoint_policies.save_only_these_names(*_BLOCK_ACTIVATIONS),
    "offload_qkv_mlp": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=_BLOCK_ACTIVATIONS,
        offload_src="device", offload_dst="pinned_host"),
}


def remat_wrapper(name: str) -> Callable | None:
  """Returns a function that wraps a per-layer function with `nnx.remat` under policy `name`.

  Returns None for "none" (no rematerialization). Raises ValueError for an unknown name.
  """
  if name not in REMAT_POLICIES:
    raise ValueError(f"model.remat={name!r} is not a remat policy; choose one of {sorted(REMAT_POLICIES)}.")
  if name == "none":
    return None
  policy = REMAT_POLICIES[name]
  # prevent_cse=False is safe (and faster) because the block runs inside scan.
  return lambda fn: nnx.remat(fn, policy=policy, prevent_cse=False)


def check_remat_supported(name: str, platform: str) -> None:
  """Raises ValueError when policy `name` needs a feature `platform` ("cpu", "gpu", "tpu") lacks."""
  if name.startswith("offload") and platform == "cpu":
    raise ValueError(
        f"model.remat={name!r} offloads activations to pinned host memory, which the CPU backend "
        "does not have; use it on GPU/TPU, or choose 'full', 'dots' or 'dots_no_batch' here.")
