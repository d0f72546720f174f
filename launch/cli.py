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
