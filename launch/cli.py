"""Command-line plumbing shared by the entry points: `--config file.py --config.a.b=value` overrides."""

from absl import flags, logging
from ml_collections import config_flags

from launch.config import Config, validate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file with get_config(); override keys with --config.section.key=value.",
    lock_config=True)


def load_config() -> Config:
  """Returns the validated Config from --config (after absl parsed the flags)."""
  if _CONFIG.value is None:
    raise ValueError("--config is required, e.g. --config configs/demo.py")
  return validate(_CONFIG.value)


FLAGS = flags.FLAGS


def quiet_logs() -> None:
  """Keeps the console for our progress bar and tables: library INFO and WARNING logs (orbax, absl) are hidden."""
  logging.set_verbosity(logging.ERROR)


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

  For launchers that forward the config to other processes (launch.sweep, launch.cluster) and parse
  their own flags. Raises ValueError naming an override key the config does not have, or a bad value.
  """
  try:
    plain = _parse_config_args(["launcher", f"--config={path}"])
  except flags.Error as e:
    raise ValueError(f"--config={path}: {e}") from e
  for item in overrides:
    key = item.split("=", 1)[0].removeprefix("--config.")
    node = plain
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node:
        raise ValueError(f"Unknown config key '{key}' in {item!r}; every key is listed in configs/base.py.")
      node = node[part]
  try:
    return _parse_config_args(["launcher", f"--config={path}", *overrides])
  except flags.Error as e:
    raise ValueError(f"Bad override value: {e}. Overrides look like --config.model.remat=full.") from e


def define_checkpoint_flags(what: str = "A run's checkpoint directory (<workdir>/checkpoints).") -> None:
  """Defines --checkpoint_dir (described by `what`) and --step, shared by the commands that read one."""
  flags.DEFINE_string("checkpoint_dir", None, what)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
