"""The one command line of every command: absl flags, `--config file.py --config.a.b=value`, and the error edge.

Every `python -m launch.<command>` defines its flags with absl and starts with `cli.run(main)`, which
turns the project's own errors into one `error: ...` message on stderr, with no traceback: bad input
(a config, a flag, a missing or corrupt checkpoint, data, a mesh: ValueError) exits 2; a run that
cannot go on (diverged, disk full or permission denied while saving, workdir in use: RunError, or an
OSError of the disk) exits 1. Tracebacks are kept for our bugs, and shown for every error with
--debug or SHARDLM_TRACEBACK=1.
"""

import os
import sys
from typing import Callable, NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from launch.run.config import Config, unknown_key_error, validate
from launch.run.devices import skip_absent_tpu
from launch.run.errors import RunError, storage_reason
from sharding.mesh import MESH_AXES

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file with get_config(); override keys with --config.section.key=value.",
    lock_config=True)

flags.DEFINE_bool("debug", False, "Show the Python traceback of every error (as SHARDLM_TRACEBACK=1 does).")

FLAGS = flags.FLAGS
USAGE_EXIT = 2   # bad input: nothing was started
RUN_EXIT = 1     # the run started but could not go on


def load_config() -> Config:
  """Returns the validated Config from --config (after absl parsed the flags)."""
  if _CONFIG.value is None:
    raise ValueError("--config is required, e.g. --config configs/demo.py")
  return validate(_CONFIG.value)


def config_path() -> str | None:
  """The file --config named (None when it was not given)."""
  return config_flags.get_config_filename(FLAGS["config"]) if FLAGS["config"].present else None


def quiet_logs() -> None:
  """Keeps the console for our progress bar and tables: library logs (orbax, absl) are hidden.

  Even their ERRORs: orbax logs every failed write with several tracebacks, and the failure reaches
  the error edge anyway as one message. --debug (or SHARDLM_TRACEBACK=1) keeps the ERRORs.
  """
  logging.set_verbosity(logging.ERROR if _tracebacks_wanted(sys.argv) else logging.FATAL)


def config_overrides(argv: list[str]) -> list[str]:
  """The `--config.a.b=value` items of `argv`, in order (for launchers that forward them to other processes).

  Raises ValueError for one written without '=' (it could not be forwarded unambiguously).
  """
  found = [a for a in argv if a.startswith("--config.")]
  bad = [a for a in found if "=" not in a]
  if bad:
    raise ValueError(f"config override {bad[0]!r} has no value; write it as {bad[0]}=VALUE.")
  return found


def _parse_config_args(argv: list[str]):
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  if not hasattr(values.config, "keys"):  # config_flags defers a file that failed to load
    raise ValueError(f"{argv[1]}: the config file could not be loaded: {values.config}")
  return values.config


def config_from_file(path: str, overrides: list[str] = ()):
  """Loads `path` with `--config.a.b=value` overrides exactly as --config does; returns the ConfigDict.

  The one parser of override strings. Raises ValueError naming an override key the config does not
  have, or a value of the wrong type.
  """
  if not os.path.isfile(path):
    raise ValueError(f"--config={path}: no such file; pass a config file such as configs/demo.py.")
  try:
    plain = _parse_config_args(["launcher", f"--config={path}"])
  except flags.Error as e:
    raise ValueError(f"--config={path}: {e}") from e
  for item in overrides:
    key = item.split("=", 1)[0].removeprefix("--config.")
    node = plain
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node:
        raise unknown_key_error(key, item)
      node = node[part]
  try:
    return _parse_config_args(["launcher", f"--config={path}", *overrides])
  except flags.Error as e:
    raise ValueError(f"Bad override value: {e}. Overrides look like --config.model.remat=full.") from e


def define_checkpoint_flags(what: str = "A run's checkpoint directory (<workdir>/checkpoints).") -> None:
  """Defines --checkpoint_dir (described by `what`) and --step, shared by the commands that read one."""
  flags.DEFINE_string("checkpoint_dir", None, what)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")


def define_mesh_flags() -> None:
  """Defines --mesh and --rules: run a checkpoint on another mesh than the one it was saved from."""
  flags.DEFINE_string("mesh", "", "Mesh to run on instead of the checkpoint's, as axis=size pairs, e.g. "
                      "'tensor=8' or 'fsdp=2,tensor=4' (axes not named are 1, data absorbs the rest); needs --rules.")
  flags.DEFINE_string("rules", "", "The rule table for --mesh (mesh.rules: dp | fsdp | tp | fsdp_tp | ...).")


def mesh_overrides() -> dict:
  """The config overrides --mesh and --rules stand for ({} without them); ValueError for bad ones."""
  if not FLAGS.mesh:
    if FLAGS.rules:
      return {"mesh.rules": FLAGS.rules, "mesh.custom_rules": ""}
    return {}
  if not FLAGS.rules:
    raise ValueError(f"--mesh={FLAGS.mesh!r} needs --rules, the table that places the parameters on it "
                     "(e.g. --rules=tp for tensor parallelism).")
  sizes = {name: 1 for name in MESH_AXES} | {"data": -1}
  for pair in FLAGS.mesh.split(","):
    name, _, size = pair.strip().partition("=")
    if name not in MESH_AXES or not size.strip().lstrip("-").isdigit():
      raise ValueError(f"--mesh={FLAGS.mesh!r}: {pair.strip()!r} is not axis=size with an axis of "
                       f"{list(MESH_AXES)}.")
    sizes[name] = int(size)
  return ({f"mesh.{name}": size for name, size in sizes.items()}
          | {f"mesh.dcn_{name}": 1 for name in MESH_AXES}
          | {"mesh.rules": FLAGS.rules, "mesh.custom_rules": "", "mesh.num_devices": 0})


def require(*names: str) -> None:
  """Raises app.UsageError naming the first of the flags `names` that was not given."""
  for name in names:
    if FLAGS[name].value in (None, ""):
      raise app.UsageError(f"--{name} is required.")


def _precheck_config_overrides(argv: list[str]) -> None:
  """Checks `--config.a.b=value` keys before absl parses them (its own message is a chained traceback)."""
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  path = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
  if path is None and "--config" in argv[:-1]:
    path = argv[argv.index("--config") + 1]
  if overrides and path:
    config_from_file(path, config_overrides(overrides))


def exit_status(error: BaseException) -> int | None:
  """The exit status for one of the project's own errors (2: bad input, 1: the run could not go on),
  or None for anything else (a bug: it keeps its traceback)."""
  if isinstance(error, (ValueError, app.UsageError, flags.Error)):
    return USAGE_EXIT
  if isinstance(error, RunError) or (isinstance(error, OSError) and storage_reason(error)):
    return RUN_EXIT
  return None


def error_message(error: BaseException) -> str:
  """The one `error: ...` text for a project error (an OSError of the disk names the file and the reason)."""
  if isinstance(error, OSError) and not isinstance(error, RunError):
    return f"error: could not write {error.filename or 'a file'}: {storage_reason(error)}"
  return f"error: {error}"


def _tracebacks_wanted(argv: list[str]) -> bool:
  return bool(os.environ.get("SHARDLM_TRACEBACK")) or any(a in ("--debug", "--debug=true", "--debug=True")
                                                          for a in argv)


def _report(error: BaseException, argv: list[str]) -> NoReturn | None:
  """Prints a project error as one line and exits; returns (so the caller re-raises) for bugs or --debug."""
  status = exit_status(error)
  if status is None or _tracebacks_wanted(argv):
    return None
  print(error_message(error), file=sys.stderr)
  sys.exit(status)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with its errors (unknown flag, bad value) as one `error:` line, exit 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _report(ValueError(f"{e} (--helpshort lists this command's flags)"), argv)
    raise


def _quiet_unraisable(unraisable) -> None:
  """Drops the 'Event loop is closed' RuntimeErrors that tensorstore callbacks raise after orbax gave up
  on a corrupt checkpoint (one traceback per array, printed before our message); prints the rest."""
  if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
    return
  sys.__unraisablehook__(unraisable)


def run(main: Callable[[list[str]], int | None]) -> None:
  """Runs `main(argv)` under absl with the error edge: every project error (see `exit_status`) prints
  one `error: ...` line on stderr and exits 2 (bad input) or 1 (the run could not go on). Where
  libtpu is installed but no TPU is attached, jax is kept on CPU first (`devices.skip_absent_tpu`)."""
  def guarded(argv):
    try:
      return main(argv)
    except BaseException as e:  # noqa: BLE001 (_report exits for our errors; the rest re-raise)
      if not isinstance(e, SystemExit):
        _report(e, sys.argv)
      raise

  skip_absent_tpu()  # libtpu installed for compiling ahead of time, no TPU here: no warnings
  if not _tracebacks_wanted(sys.argv):
    sys.unraisablehook = _quiet_unraisable
  try:
    _precheck_config_overrides(sys.argv)
  except ValueError as e:
    _report(e, sys.argv)
    raise
  app.run(guarded, flags_parser=_parse_flags)
