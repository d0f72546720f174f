"""docs/config.md is what launch.config_docs generates from the key declarations, so it never goes stale."""

from configs import keys
from launch import config_docs
from launch.run.sections import Config


def test_docs_config_md_is_up_to_date():
  assert config_docs.PATH.read_text() == config_docs.render(), (
      f"docs/config.md is stale: regenerate it with `{config_docs.COMMAND}`")


def test_every_declared_key_has_a_row():
  text = config_docs.render()
  for name, cls in {"top level": Config, **keys.sections(Config)}.items():
    table = text.split(f"### `{name}`" if name != "top level" else "### top level")[1].split("\n### ")[0]
    for k in keys.keys(cls):
      assert f"| `{k.name}` | {k.type.__name__} |" in table, f"{name}.{k.name}"


def test_cells_escape_pipes_and_tags():
  assert config_docs._cell("KL(a || b) in <workdir>, < n") == "KL(a \\|\\| b) in &lt;workdir>, < n"
