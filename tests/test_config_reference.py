"""launch/run/config_reference.py: docs/config.md is what it renders from the key declarations, so the
reference never goes stale (python -m launch.config_docs --write regenerates it)."""

from configs import keys
from launch.run import config_reference
from launch.run.sections import Config


def test_docs_config_md_is_up_to_date():
  assert config_reference.PATH.read_text() == config_reference.render(), (
      f"docs/config.md is stale: regenerate it with `{config_reference.COMMAND}`")


def test_every_declared_key_has_a_row():
  text = config_reference.render()
  for name, cls in {"top level": Config, **keys.sections(Config)}.items():
    table = text.split(f"### `{name}`" if name != "top level" else "### top level")[1].split("\n### ")[0]
    for k in keys.keys(cls):
      assert f"| `{k.name}` | {k.type.__name__} |" in table, f"{name}.{k.name}"


def test_cells_escape_pipes_and_tags():
  assert config_reference._cell("KL(a || b) in <workdir>, < n") == "KL(a \\|\\| b) in &lt;workdir>, < n"
