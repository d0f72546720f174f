"""Defaults shared by every experiment; each preset file starts from `base_config()` and overrides.

Every key is declared once, with its type, default, allowed values and meaning, on the dataclass of its
section: `model` in lm/config.py; `seed`, `data`, `train`, `checkpoint`, `mesh` in launch/run/sections.py;
`distill`, `prune` in compress/config.py. This file derives the defaults from those declarations;
docs/config.md lists every key (python -m launch.config_docs --write regenerates it). A key that is not
declared is rejected at start-up with the closest valid one.
"""

import ml_collections

from configs.keys import defaults
from launch.run.sections import Config


def base_config() -> ml_collections.ConfigDict:
  """Returns the full default config: a tiny model on the bundled Shakespeare corpus, one device."""
  return ml_collections.ConfigDict(defaults(Config))
