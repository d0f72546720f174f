"""The zigzag (balanced) layout of a sequence split over the `sequence` mesh axis: its one home.

With N sequence shards, the sequence is cut into 2N equal chunks and shard i holds chunks i and
2N-1-i, so under causal attention every shard does the same work (ring attention,
sharding/ring_attention.py). The run plan decides whether a step uses this layout
(`launch.run.plan.SequencePlan.layout`); the step reorders its batch with `zigzag_order`, and the ring
reads the layout from the plan.
"""

import numpy as np

LAYOUTS = ("natural", "zigzag")


def zigzag_order(length: int, num_shards: int) -> np.ndarray:
  """Permutation [length] of positions: x[:, order] puts chunks i and 2N-1-i of 2N on shard i.

  Raises ValueError when `length` is not divisible by 2 x num_shards.
  """
  if num_shards < 1 or length % (2 * num_shards):
    raise ValueError(
        f"sequence length L must be divisible by 2 x mesh.sequence = 2 x {num_shards} = "
        f"{2 * num_shards} for the balanced (zigzag) ring layout; got L={length}. Choose "
        f"--config.data.seq_len as a multiple of {2 * num_shards}, or a smaller sequence axis.")
  chunk = length // (2 * num_shards)
  chunks = np.arange(length).reshape(2 * num_shards, chunk)
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * num_shards - 1 - i]])
                         for i in range(num_shards)])


def zigzag_inverse(length: int, num_shards: int) -> np.ndarray:
  """The inverse permutation of `zigzag_order`: x_zig[:, inverse] is back in natural order."""
  return np.argsort(zigzag_order(length, num_shards))


def to_zigzag(x, num_shards: int, axis: int = 1):
  """`x` reordered along `axis` (the length axis) into the zigzag layout; works on jax and numpy."""
  order = zigzag_order(x.shape[axis], num_shards)
  return x[(slice(None),) * (axis % x.ndim) + (order,)]


def from_zigzag(x, num_shards: int, axis: int = 1):
  """`x` in the zigzag layout along `axis` put back in natural order."""
  inverse = zigzag_inverse(x.shape[axis], num_shards)
  return x[(slice(None),) * (axis % x.ndim) + (inverse,)]
