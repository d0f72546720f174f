"""Self-describing, verified checkpoints: parameters, optimizer state, step, data position and config.

One step directory holds three items: `params` and `opt_state` (sharded arrays, restorable onto any
mesh), and `meta` (JSON: step, data-iterator state, the config that made the run, and a content
checksum of every array). orbax writes each step into a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoints intact and the half-written one
invisible. Old steps are first renamed into `.deleting/` and only then removed, so a kill during a
deletion never leaves a half-deleted step among the listed ones.

On object storage (a gs:// directory) there is no rename: orbax writes the step in place and marks it
done last with `commit_success.txt`, and a step counts only with every marker present. Old steps are
deleted marker first, so a kill during a deletion leaves a step without its marker, which is never
listed, and set-aside steps are copied whole before their markers go. Those rules are the directory's
step store (launch/storage/step_store.py), chosen once from its URL. Every restore recomputes the
checksums of what it read and refuses a mismatch, naming the array and the step.
"""

import json
import re
from typing import Any

import jax
import orbax.checkpoint as ocp

from launch.run import checksum
from launch.run.errors import NonFiniteError, SaveError, storage_reason
from launch.storage import paths
from launch.storage.step_store import COMMIT, open_step_store

ITEMS = ("params", "opt_state", "meta")
PARAMS_ONLY = "params_only"  # meta key of a step saved by save_params
CHECKSUMS = "checksums"      # meta key: {item: {array path: [hex checksum, dtype]}}
DELETING = ".deleting"       # a local directory's old steps are renamed here (atomic) before they are removed


class CheckpointError(ValueError):
  """A checkpoint that is missing, incomplete or unreadable, with what to do about it."""


class Checkpointer:
  """Saves and restores run state under `directory` (one sub-directory per step).

  `checksums=False` skips computing checksums at save and checking them at restore (only to
  measure their cost: launch/reproduce/checkpoints.py). `keep`: the newest steps kept (None: all);
  `async_save`: saves finish in the background. A training run passes checkpoint.keep and
  checkpoint.async_save; the defaults here are a plain writer's (keep all, write synchronously).
  """

  def __init__(self, directory: str, *, keep: int | None = None, async_save: bool = False, read_only: bool = False,
               checksums: bool = True):
    self.directory = paths.normalize(directory)
    self.store = open_step_store(self.directory, trash=DELETING)
    self.keep = keep
    self.checksums = checksums
    self.read_only = read_only
    self.primary = jax.process_index() == 0
    self._in_flight = None   # the step an async save is still writing
    if read_only and not paths.isdir(self.directory):
      raise CheckpointError(f"No checkpoint directory at {self.directory}; pass the run's checkpoint "
                            "directory (<workdir>/checkpoints) or train first.")
    options = ocp.CheckpointManagerOptions(
        create=not read_only, read_only=read_only, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only, **self.store.manager_options(keep, read_only))
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    if not read_only:
      self._remove_partial_steps()
      self._purge_deleted()

  def steps(self) -> list[int]:
    """Steps with a finalized and whole checkpoint, oldest first."""
    return sorted(s for s in self.manager.all_steps() if self._whole(s))

  def _whole(self, step: int) -> bool:
    """True when every item of `step` has its commit marker and metadata (nothing was removed)."""
    root = paths.join(self.directory, str(step))
    def has(*parts):
      return paths.exists(paths.join(root, *parts))
    if not self.store.committed(step):
      return False
    if not (has("_CHECKPOINT_METADATA") and has("meta", "metadata") and has("meta", COMMIT)):
      return False
    try:
      params_only = json.loads(paths.read_text(paths.join(root, "meta", "metadata"))).get(PARAMS_ONLY, False)
    except (OSError, ValueError):
      return False
    arrays = ("params",) if params_only else ("params", "opt_state")
    return all(has(item, name) for item in arrays for name in ("_METADATA", "manifest.ocdbt", COMMIT))

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    """Starts saving `state` (a TrainState) and `meta` at `step`; returns before the write ends if async.

    Raises NonFiniteError (nothing written) if an array holds NaN or inf, and SaveError when the disk
    or its permissions refuse the write (then no write is left running and older steps are intact).
    """
    self._save(step, {"params": state.params, "opt_state": state.opt_state}, meta)

  def save_params(self, step: int, params, meta: dict[str, Any]) -> None:
    """Saves parameters and `meta` only (no optimizer state), e.g. a converted Hugging Face model.

    Such a step restores with `restore_params` (generation, evaluation, train.init_checkpoint) but
    not with `restore_state` (--resume), which says so.
    """
    self._save(step, {"params": params}, {**meta, PARAMS_ONLY: True})

  def _save(self, step: int, arrays: dict, meta: dict[str, Any]) -> None:
    self._finish_in_flight()
    if self.checksums:
      sums = {item: checksum.fingerprints(tree) for item, tree in arrays.items()}
      nonfinite = [item + path for item, (_, bad) in sums.items() for path in bad]
      if nonfinite:
        raise NonFiniteError(
            f"step {step}: {nonfinite[0]} holds NaN or inf ({len(nonfinite)} arrays do); it was not "
            f"saved. Last good checkpoint: {self._last_good()}.")
      meta = {**meta, CHECKSUMS: {item: values for item, (values, _) in sums.items()}}
    items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
    try:
      self.manager.save(step, args=ocp.args.Composite(
          **items, meta=ocp.args.JsonSave({**meta, "step": int(step)})), force=True)
    except Exception as e:  # noqa: BLE001 (a storage failure becomes SaveError; anything else is ours)
      self._raise_save_error(step, e)
    self._in_flight = step

  def _finish_in_flight(self) -> None:
    """Waits for the async save still writing (its errors surface here) and removes renamed-away steps."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      self._raise_save_error(self._in_flight, e)
    self._in_flight = None
    self._purge_deleted()

  def _raise_save_error(self, step, error: Exception):
    reason = storage_reason(error)
    if reason is None:
      raise error
    try:  # leave nothing half-written running behind us
      self.manager.wait_until_finished()
    except Exception:  # noqa: BLE001 (the first error is the one reported)
      pass
    self.manager.reload()
    raise SaveError(
        f"could not save step {step} to {self.directory}: {reason}; checkpoints "
        f"{self.steps() or '(none)'} are intact (the partial step is ignored and removed at the next "
        "start). Free space or fix the permissions, then continue with --resume.") from error

  def _purge_deleted(self) -> None:
    """Removes the steps no longer kept, as the store's rules say (only process 0 renames or removes):
    locally those orbax renamed into .deleting/, on a bucket the whole steps beyond the newest `keep`."""
    if not self.primary or self.read_only:
      return
    if self.store.prune(self.steps, self.keep):
      self.manager.reload()

  def _remove_partial_steps(self) -> None:
    """Deletes what an interrupted save left where orbax does not (a bucket's step without its markers),
    so the step can be saved again cleanly."""
    if self.primary and self.store.remove_partial(self._whole):
      self.manager.reload()

  def _last_good(self) -> str:
    steps = self.steps()
    return f"step {steps[-1]} in {self.directory}" if steps else f"none in {self.directory}"

  def last_good(self) -> str:
    """'step N in DIR' for the newest complete checkpoint (after pending saves finish), or 'none in DIR'."""
    self._finish_in_flight()
    return self._last_good()

  def set_aside(self, steps: list[int]) -> str:
    """Moves `steps` out of the way (into DIR.set_aside/) so a resumed run can save those steps again.

    Nothing is deleted; returns where they went. Process 0 moves, all processes then re-list.
    """
    target = self.directory + ".set_aside"
    if self.primary:
      paths.makedirs(target)
      for step in steps:
        dest, n = paths.join(target, str(step)), 1
        while paths.exists(dest):
          dest, n = paths.join(target, f"{step}.{n}"), n + 1
        self.store.move(step, dest)  # a bucket has no rename: a whole copy first, then the original
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("shardlm:set_aside")
    self.manager.reload()
    return target

  def close(self) -> None:
    """Waits for the last save (SaveError if the disk refused it) and releases orbax's threads."""
    try:
      self._finish_in_flight()
    finally:
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
    except Exception as e:  # orbax raises many types; the user needs the path, the cause and the way out.
      raise CheckpointError(f"Checkpoint step {step} in {self.directory} is corrupt or incomplete "
                            f"({_root_cause(e)}). {self._way_out(step)}") from e

  def _way_out(self, step: int) -> str:
    others = [s for s in self.steps() if s != step]
    return (f"Other steps here: {others or 'none'}; restore one of them (--step N), or resume with "
            "--resume, which falls back to the newest readable step.")

  def _verify(self, step: int, item: str, tree, meta: dict) -> None:
    """Raises CheckpointError naming the first array of `tree` whose checksum differs from the saved one.

    Checkpoints written before checksums existed carry none and are read unverified; an array
    restored into another dtype than it was saved in (model.param_dtype changed) is not compared.
    """
    saved = (meta.get(CHECKSUMS) or {}).get(item)
    if not self.checksums or not saved:
      return
    now, _ = checksum.fingerprints(tree)
    for path, (value, dtype) in now.items():
      if path in saved and saved[path][1] == dtype and saved[path][0] != value:
        raise CheckpointError(
            f"Checkpoint step {step} in {self.directory}: {item}{path} does not match the checksum "
            f"saved with it (saved {saved[path][0]}, read {value}); its files were changed or damaged "
            f"after the save. {self._way_out(step)}")

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """Returns the JSON metadata (step, data_state, config, checksums) of `step` (default: latest)."""
    step = self._step_or_latest(step)
    return dict(self._restore(step, meta=ocp.args.JsonRestore())["meta"])

  def restore_params(self, abstract_params, step: int | None = None):
    """Restores only the parameters onto the shardings in `abstract_params` (ShapeDtypeStructs).

    Returns (params, meta); raises CheckpointError if they differ from their saved checksums.
    """
    step = self._step_or_latest(step)
    restored = self._restore(step, params=ocp.args.StandardRestore(abstract_params),
                             meta=ocp.args.JsonRestore())
    _check_shapes(restored["params"], abstract_params, self.directory, step)
    meta = dict(restored["meta"])
    self._verify(step, "params", restored["params"], meta)
    return restored["params"], meta

  def restore_state(self, abstract_state, step: int | None = None):
    """Restores a full TrainState (params, optimizer state, step) plus its metadata, verified.

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
    self._verify(step, "params", restored["params"], meta)
    self._verify(step, "opt_state", restored["opt_state"], meta)
    state = abstract_state.replace(
        step=jax.device_put(jax.numpy.asarray(meta["step"], jax.numpy.int32), abstract_state.step.sharding),
        params=restored["params"], opt_state=restored["opt_state"])
    return state, meta


def _root_cause(error: BaseException) -> str:
  """The innermost message of an exception chain, first line only (orbax wraps the real cause)."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  lines = [line for line in str(error).strip().splitlines() if line.strip()]
  first = re.sub(r"\s*\[tensorstore_spec.*", "", lines[0]) if lines else ""  # a page of JSON
  return f"{type(error).__name__}: {first}"[:600]


def _check_shapes(restored, target, directory: str, step: int) -> None:
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(target)):
    if got.shape != want.shape:
      raise CheckpointError(
          f"Checkpoint step {step} in {directory}: {jax.tree_util.keystr(path)} has shape {got.shape} but "
          f"the model config needs {want.shape}; restore it with the config it was saved with.")
