"""Where a checkpoint's step directories live: a local directory or a bucket, each with its own rules.

A checkpoint directory holds one sub-directory per step, written by orbax. What makes a step safe to
list, delete and set aside depends on the storage, and is decided once, from the directory's URL
(`open_step_store`); the Checkpointer (launch/run/checkpoint.py) asks its store and never the URL.

  * A local directory (`LocalStepStore`): orbax writes each step into a temporary directory and
    renames it into place when complete (rename is atomic), so a listed step is committed; orbax
    deletes the steps beyond `keep` itself, renaming each into `<dir>/.deleting/` first (the store
    removes them from there), and a step is set aside by one rename.
  * A bucket (`BucketStepStore`): there is no rename. orbax writes a step in place and writes
    `commit_success.txt` last, so a step without it is not committed. The store deletes the steps
    beyond `keep` (orbax would delete object by object, in any order), each with its markers first,
    so a kill during a deletion leaves a step without its marker, which is never listed. A step is set
    aside by a whole copy first, then the same deletion of the original.
"""

import os
import shutil
from typing import Callable, Protocol

from launch.storage import paths

COMMIT = "commit_success.txt"  # orbax's marker of a finished step or item on object storage
STEP_MARKERS = (COMMIT, "_CHECKPOINT_METADATA")  # removed first when a step is deleted from a bucket


class StepStore(Protocol):
  """The storage rules a Checkpointer follows for the step directories under `directory`."""

  directory: str

  def manager_options(self, keep: int | None, read_only: bool) -> dict:
    """The orbax CheckpointManagerOptions fields that depend on the storage: {"max_to_keep": int | None,
    "todelete_subdir": str | None}, for keeping the newest `keep` steps (None: all)."""

  def committed(self, step: int) -> bool:
    """True when the storage marks `step` as completely written (the items' own markers aside)."""

  def prune(self, whole_steps: Callable[[], list[int]], keep: int | None) -> bool:
    """Removes what is no longer kept (`whole_steps()` lists the whole steps, oldest first, when the
    store needs it); returns True when steps were deleted, so the caller must list them again."""

  def remove_partial(self, is_whole: Callable[[int], bool]) -> bool:
    """Deletes the steps an interrupted save left behind (`is_whole(step)` False) where orbax does not;
    returns True when steps were deleted, so the caller must list them again."""

  def move(self, step: int, dest: str) -> None:
    """Moves the step directory of `step` to the path `dest` (which does not exist); deletes nothing
    that `dest` does not then hold."""


class LocalStepStore:
  """A local checkpoint directory: rename is atomic, and orbax deletes old steps through `trash`."""

  def __init__(self, directory: str, *, trash: str):
    """`directory`: an absolute local path; `trash`: the sub-directory orbax renames old steps into."""
    self.directory = directory
    self.trash = trash

  def manager_options(self, keep: int | None, read_only: bool) -> dict:
    """orbax keeps `keep` steps and renames the older ones into the trash (none when read-only)."""
    return {"max_to_keep": keep, "todelete_subdir": None if read_only else self.trash}

  def committed(self, step: int) -> bool:
    """Always True: a step directory appears under its own name only once orbax renamed it into place."""
    return True

  def prune(self, whole_steps: Callable[[], list[int]], keep: int | None) -> bool:
    """Removes the steps orbax renamed into the trash; returns False (the listing did not change)."""
    trash = os.path.join(self.directory, self.trash)
    if os.path.isdir(trash):
      for name in os.listdir(trash):
        shutil.rmtree(os.path.join(trash, name), ignore_errors=True)
    return False

  def remove_partial(self, is_whole: Callable[[int], bool]) -> bool:
    """Nothing to do: orbax removes its temporary step directories itself; returns False."""
    return False

  def move(self, step: int, dest: str) -> None:
    """One atomic rename of the step directory to `dest`."""
    os.rename(paths.join(self.directory, str(step)), dest)


class BucketStepStore:
  """A checkpoint directory in a bucket: no rename, a step is committed by its marker, we delete."""

  def __init__(self, directory: str):
    """`directory`: a normalized gs:// URL."""
    self.directory = directory

  def manager_options(self, keep: int | None, read_only: bool) -> dict:
    """orbax keeps every step and renames nothing: `prune` deletes old steps, marker first."""
    return {"max_to_keep": None, "todelete_subdir": None}

  def committed(self, step: int) -> bool:
    """True when the step's `commit_success.txt`, which orbax writes last, is there."""
    return paths.exists(paths.join(self.directory, str(step), COMMIT))

  def prune(self, whole_steps: Callable[[], list[int]], keep: int | None) -> bool:
    """Deletes the whole steps beyond the newest `keep` (none when `keep` is None), each marker first;
    returns True when it deleted any."""
    whole = whole_steps()
    old = whole[:-keep] if keep else []
    for step in old:
      self._delete(paths.join(self.directory, str(step)))
    return bool(old)

  def remove_partial(self, is_whole: Callable[[int], bool]) -> bool:
    """Deletes every step directory that is not whole (what an interrupted save left), as orbax removes
    its temporary directories on disk, so the step can be saved again cleanly; True when it deleted any."""
    partial = [name for name in (paths.listdir(self.directory) if paths.isdir(self.directory) else [])
               if name.isdigit() and not is_whole(int(name))]
    for name in partial:
      self._delete(paths.join(self.directory, name))
    return bool(partial)

  def move(self, step: int, dest: str) -> None:
    """Copies the step whole to `dest`, then deletes the original, markers first."""
    source = paths.join(self.directory, str(step))
    paths.copy_tree(source, dest)
    self._delete(source)

  @staticmethod
  def _delete(step_dir: str) -> None:
    """Deletes a step on object storage so that no listing ever sees it half-deleted but whole."""
    for marker in STEP_MARKERS:
      paths.remove(paths.join(step_dir, marker))
    paths.rmtree(step_dir)


def open_step_store(directory: str, *, trash: str) -> StepStore:
  """The store for the checkpoint directory `directory` (normalized: local absolute path or gs:// URL):
  a BucketStepStore for a URL, else a LocalStepStore whose old steps go through `trash`."""
  if paths.is_url(directory):
    return BucketStepStore(directory)
  return LocalStepStore(directory, trash=trash)
