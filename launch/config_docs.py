"""Generate docs/config.md, the config reference, from the key declarations (configs/keys.py).

  python -m launch.config_docs --write     # rewrite docs/config.md
  python -m launch.config_docs             # print it

The tables and the prose around them come from launch/run/config_reference.py;
tests/test_config_reference.py fails when docs/config.md differs from what this prints.
"""

from absl import app
from absl import flags

from launch.run import config_reference

flags.DEFINE_bool("write", False, "Write docs/config.md instead of printing it.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  text = config_reference.render()
  if FLAGS.write:
    config_reference.PATH.write_text(text)
    print(f"wrote {config_reference.PATH}")
  else:
    print(text, end="")


if __name__ == "__main__":
  app.run(main)
