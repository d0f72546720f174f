"""Self-describing checkpoints: parameters, optimizer state, step, data position and config.

One step directory holds three items: `params` and `opt_state` (sharded arrays, restorable onto any
mesh), and `meta` (JSON: step, data-iterator state, the config that made the run). orbax writes each
step into a temporary directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoints intact and the half-written one invisible.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ("params", "opt_state", "meta")
PARAMS_ONLY = "params_only"  # meta key of a step saved by save_params


class CheckpointError(ValueError):
  """A checkpoint that is missing, incomplete or unreadable, with what to do about it."""


class Checkpointer:
  """Saves and restores run state under `directory` (one sub-directory per step)."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f"No checkpoint directory at {self.directory}; pass the run's checkpoint "
                            "directory (<workdir>/checkpoints) or train first.")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def steps(self) -> list[int]:
    """Steps with a complete checkpoint, oldest first."""
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    """Starts saving `state` (a TrainState) and `meta` at `step`; returns before the write ends if async."""
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.JsonSave({**meta, "step": int(step)})), force=True)

  def save_params(self, step: int, params, meta: dict[str, Any]) -> None:
    """Saves parameters and `meta` only (no optimizer state), e.g. a converted Hugging Face model.

    Such a step restores with `restore_params` (generation, evaluation, train.init_checkpoint) but
    not with `restore_state` (--resume), which says so.
    """
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave({**meta, "step": int(step), PARAMS_ONLY: True})), force=True)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def _step_or_latest(self, step: int | None) -> int:
    steps = self.steps()
    if not steps:
      raise CheckpointError(f"No complete checkpoint in {self.directory} (an interrupted save "
                            "leaves none); train first or point at another directory.")
    if step is None:
      return steps[-1]
    if step not in steps:
      raise CheckpointError(f"No checkpoint for step {step} in {self.directory}; available: {steps}.")
    return step

  def _restore(self, step: int, **items):
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types; the user needs the path and the way out.
      others = [s for s in self.steps() if s != step]
      raise CheckpointError(
          f"Checkpoint step {step} in {self.directory} is corrupt or incomplete "
          f"({type(e).__name__}: {str(e)[:300]}). Other steps here: {others or 'none'}; restore one "
          "of them (e.g. --step N), or delete this step's directory to resume from the previous one.") from e

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """Returns the JSON metadata (step, data_state, config) of `step` (default: latest)."""
    step = self._step_or_latest(step)
    return dict(self._restore(step, meta=ocp.args.JsonRestore())["meta"])

  def restore_params(self, abstract_params, step: int | None = None):
    """Restores only the parameters onto the shardings in `abstract_params` (ShapeDtypeStructs)."""
    step = self._step_or_latest(step)
    restored = self._restore(step, params=ocp.args.StandardRestore(abstract_params),
                             meta=ocp.args.JsonRestore())
    _check_shapes(restored["params"], abstract_params, self.directory, step)
    return restored["params"], dict(restored["meta"])

  def restore_state(self, abstract_state, step: int | None = None):
    """Restores a full TrainState (params, optimizer state, step) plus its metadata.

    `abstract_state` is a TrainState of ShapeDtypeStructs with shardings; arrays are resharded
    onto them, so a checkpoint saved under one mesh restores under another.
    """
    step = self._step_or_latest(step)
    if self.read_meta(step).get(PARAMS_ONLY):
      raise CheckpointError(
          f"Checkpoint step {step} in {self.directory} holds parameters only (no optimizer state), "
          "e.g. a converted Hugging Face model, so it cannot be resumed; start a new run from it with "
          f"--config.train.init_checkpoint={self.directory}.")
    restored = self._restore(step, params=ocp.args.StandardRestore(abstract_state.params),
                             opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
                             meta=ocp.args.JsonRestore())
    _check_shapes(restored["params"], abstract_state.params, self.directory, step)
    meta = dict(restored["meta"])
    state = abstract_state.replace(
        step=jax.device_put(jax.numpy.asarray(meta["step"], jax.numpy.int32), abstract_state.step.sharding),
        params=restored["params"], opt_state=restored["opt_state"])
    return state, meta


def _check_shapes(restored, target, directory: str, step: int) -> None:
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(target)):
    if got.shape != want.shape:
      raise CheckpointError(
          f"Checkpoint step {step} in {directory}: {jax.tree_util.keystr(path)} has shape {got.shape} but "
          f"the model config needs {want.shape}; restore it with the config it was saved with.")
