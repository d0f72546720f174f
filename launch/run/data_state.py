"""Data-iterator positions across processes: each process has its own; a checkpoint keeps all of them."""

import json

import jax
import numpy as np


def gather_states(local_state) -> list:
  """Returns every process's iterator state, in process order (a collective: all processes call it)."""
  if jax.process_count() == 1:
    return [local_state]
  from jax.experimental import multihost_utils
  encoded = np.frombuffer(json.dumps(local_state).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([encoded.size], np.int32))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:encoded.size] = encoded
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(gathered[i, :lengths[i]])) for i in range(len(lengths))]


def local_state(saved) -> object:
  """Picks this process's state from a checkpoint's `data_state` (a list per process, or one state).

  Raises ValueError when the checkpoint was written by a different number of processes.
  """
  if saved is None:
    return None
  states = saved if isinstance(saved, list) else [saved]
  if len(states) != jax.process_count():
    raise ValueError(
        f"The checkpoint's data positions were saved by {len(states)} process(es) but this run has "
        f"{jax.process_count()}; resume with {len(states)} processes (parameters alone restore on any "
        "count: launch.eval / launch.generate, or train.init_checkpoint for a new run).")
  return states[jax.process_index()]
