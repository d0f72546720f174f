"""Content checksums of (sharded) arrays, computed on their devices in one jitted pass.

A checkpoint stores one checksum per array in its meta JSON, and every restore recomputes it from the
arrays it read, so a byte changed on disk is an error naming the array instead of a NaN loss later.
The same pass reports which floating-point arrays hold NaN or inf, so a save can refuse them.

The checksum of an array is two uint32 sums over its elements' bit patterns w_i (i = flat index):
sum(w_i) and sum(mix(w_i) * (2i + 1)), where mix is a bijection of uint32. Integer sums are exact in
any order, so the value does not depend on the mesh, the sharding or the platform; any change to one
element changes the second sum (an odd multiplier is invertible mod 2^32). It is not cryptographic.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def _words(x: jax.Array) -> jax.Array:
  """The bit patterns of `x`'s elements as uint32 (8-byte types give a trailing axis of 2)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size >= 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 1: jnp.uint8}[size]).astype(jnp.uint32)


def _mix(w):
  """A bijection of uint32 (murmur3's finalizer) so that the weighted sum sees every bit."""
  w = w ^ (w >> 16)
  w = w * jnp.uint32(0x85EBCA6B)
  w = w ^ (w >> 13)
  w = w * jnp.uint32(0xC2B2AE35)
  return w ^ (w >> 16)


def _one(x):
  """Returns (uint32[2] checksum, bool all-finite) of one array."""
  w = _words(x)
  index = jnp.zeros(w.shape, jnp.uint32)  # flat index from per-axis iotas: no reshape, so no resharding
  stride = 1
  for axis in reversed(range(w.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= w.shape[axis]
  sums = jnp.stack([jnp.sum(w, dtype=jnp.uint32),
                    jnp.sum(_mix(w) * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)])
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
  return sums, finite


@functools.lru_cache(maxsize=None)
def _jitted(out_sharding):
  return jax.jit(lambda leaves: [_one(x) for x in leaves], out_shardings=out_sharding)


def fingerprints(tree: Any) -> tuple[dict[str, list[str]], list[str]]:
  """Checksums every array leaf of `tree` on its devices (a collective in multi-process runs).

  Returns ({keystr path: [16 hex digits, dtype name]}, [paths of float arrays holding NaN or inf]).
  """
  paths_and_leaves = jax.tree_util.tree_leaves_with_path(tree)
  if not paths_and_leaves:
    return {}, []
  paths = [jax.tree_util.keystr(p) for p, _ in paths_and_leaves]
  leaves = [jnp.asarray(x) for _, x in paths_and_leaves]
  sharding = leaves[0].sharding
  # Replicated outputs can be read on every process, even when the inputs span several hosts.
  out = NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else None
  results = jax.device_get(_jitted(out)(leaves))
  sums = {path: [f"{int(s[0]):08x}{int(s[1]):08x}", str(x.dtype)]
          for path, x, (s, _) in zip(paths, leaves, results)}
  nonfinite = [path for path, (_, ok) in zip(paths, results) if not bool(np.asarray(ok))]
  return sums, nonfinite
