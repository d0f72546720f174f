"""The run's own failures that are not bad input: the user can act on them, so they get one line, no traceback.

Bad input (a config, a flag, a missing or corrupt checkpoint) is a ValueError (CheckpointError is one)
and exits 2; a run that started but cannot go on is a RunError and exits 1 (launch/run/cli.py:run).
"""

import errno

# OSError numbers that mean "the disk or its permissions refused the write", with the words we print.
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                  errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                  errno.EROFS: "read-only file system"}


class RunError(Exception):
  """A run that cannot go on (diverged, disk full, workdir in use), with what to do about it."""


class NonFiniteError(RunError):
  """The loss or gradient norm became NaN or inf (train.nonfinite)."""


class SaveError(RunError):
  """A checkpoint could not be written (disk full, permission denied); older ones are intact."""


class WorkdirLocked(RunError):
  """Another live run holds the workdir's lock."""


def storage_reason(error: BaseException) -> str | None:
  """The storage failure behind `error` ("no space left on device", ...) or None.

  Follows the exception chain, and also reads the message text, because orbax and tensorstore often
  re-raise an OSError as a plain exception whose only trace of the errno is its text.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
      return STORAGE_ERRNOS[error.errno]
    text = str(error).lower()
    for reason in STORAGE_ERRNOS.values():
      if reason in text:
        return reason
    error = error.__cause__ or error.__context__
  return None
