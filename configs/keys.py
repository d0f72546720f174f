"""One declaration per config key: a dataclass field made by `key(default, doc, choices=...)`.

The frozen dataclasses that hold the config sections (lm/config.py: model; launch/run/sections.py:
data, train, checkpoint, mesh and the whole `Config`; compress/config.py: distill, prune) declare
every key once with it: its type (the annotation), default, allowed values (for an enum) and a
one-line description. From those declarations configs/base.py derives the defaults,
launch/run/config.py the type and choice checks, and launch/config_docs.py docs/config.md.

Imports nothing of ours, so every layer (lm/ included) may use it.
"""

import dataclasses
import typing
from collections.abc import Sequence
from typing import Any


def key(default: Any, doc: str, *, choices: Sequence[str] | None = None) -> Any:
  """A dataclass field for one config key: its default, a one-line description and, for an enum, the
  values it may take (checked by `choice_errors`)."""
  if not doc or "\n" in doc:
    raise ValueError(f"the description of a config key is one non-empty line, not {doc!r}")
  return dataclasses.field(default=default, metadata={
      "doc": doc, "choices": None if choices is None else tuple(choices)})


@dataclasses.dataclass(frozen=True)
class Key:
  """What a `key(...)` field declares, read back: name, type, default, description, allowed values."""
  name: str
  type: type
  default: Any
  doc: str
  choices: tuple[str, ...] | None


def _is_section(tp) -> bool:
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def keys(cls) -> list[Key]:
  """The keys a dataclass declares, in field order (fields that are sections themselves are left out).

  Raises TypeError for a field not declared with `key(...)`.
  """
  hints = typing.get_type_hints(cls)
  out = []
  for field in dataclasses.fields(cls):
    if _is_section(hints[field.name]):
      continue
    if "doc" not in field.metadata:
      raise TypeError(f"{cls.__name__}.{field.name} is a config key; declare it with configs.keys.key(...)")
    out.append(Key(field.name, hints[field.name], field.default, field.metadata["doc"],
                   field.metadata["choices"]))
  return out


def sections(cls) -> dict[str, type]:
  """The fields of dataclass `cls` that are sections (dataclasses of keys), by name, in field order."""
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls) if _is_section(hints[f.name])}


def defaults(cls) -> dict[str, Any]:
  """Nested plain dicts of the declared defaults of `cls`: each key's default, each section's dict."""
  declared = {k.name: k.default for k in keys(cls)}
  nested = {name: defaults(section) for name, section in sections(cls).items()}
  return {f.name: nested[f.name] if f.name in nested else declared[f.name] for f in dataclasses.fields(cls)}


def choice_errors(section: str, obj) -> list[str]:
  """One message, "section.key='value': choose one of [...]", for every enum key of dataclass instance
  `obj` whose value is not among its declared choices; [] when all are."""
  errors = []
  for k in keys(type(obj)):
    value = getattr(obj, k.name)
    if k.choices is not None and value not in k.choices:
      errors.append(f"{section}.{k.name}={value!r}: choose one of {list(k.choices)}.")
  return errors
