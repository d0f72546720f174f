"""configs/keys.py: a key declared once gives its default, its description and its choice check."""

import dataclasses

import pytest

from configs import keys
from configs.keys import key


@dataclasses.dataclass(frozen=True)
class Inner:
  """A section of two keys."""
  mode: str = key("fast", "how it runs", choices=("fast", "slow"))
  size: int = key(3, "how big")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outer:
  """A config: one top-level key and one section."""
  seed: int = key(0, "the seed")
  inner: Inner


def test_defaults_nest_sections_in_field_order():
  assert keys.defaults(Outer) == {"seed": 0, "inner": {"mode": "fast", "size": 3}}
  assert list(keys.defaults(Inner)) == ["mode", "size"]
  assert keys.sections(Outer) == {"inner": Inner}


def test_keys_read_back_type_default_doc_and_choices():
  mode, size = keys.keys(Inner)
  assert (mode.name, mode.type, mode.default, mode.doc, mode.choices) == ("mode", str, "fast", "how it runs",
                                                                          ("fast", "slow"))
  assert (size.type, size.choices) == (int, None)
  assert [k.name for k in keys.keys(Outer)] == ["seed"]  # the section is not a key


def test_a_value_outside_the_choices_is_one_line_naming_key_value_and_choices():
  assert keys.choice_errors("inner", Inner()) == []
  assert keys.choice_errors("inner", Inner(mode="warp")) == [
      "inner.mode='warp': choose one of ['fast', 'slow']."]


def test_a_description_is_one_line():
  with pytest.raises(ValueError, match="one non-empty line"):
    key(1, "first line\nsecond line")
  with pytest.raises(ValueError, match="one non-empty line"):
    key(1, "")


def test_a_field_not_declared_with_key_is_refused():
  @dataclasses.dataclass(frozen=True)
  class Bare:
    size: int = 3

  with pytest.raises(TypeError, match=r"Bare.size is a config key; declare it with configs.keys.key"):
    keys.keys(Bare)
