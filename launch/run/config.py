"""Validation at the edge: a raw `ConfigDict` becomes a frozen, typed `Config` before anything compiles.

Every error names the key, the bad value and what to do instead.
"""

import dataclasses
import difflib
from typing import Any

import ml_collections

from compress.config import compression_errors
from configs import keys
from configs.base import base_config
from launch.run.sections import Config, DataConfig
from lm.config import ModelConfig
from lm.data.sources import KINDS as FILE_CORPORA
from sharding.rules import parse_rules

# Every section (model, data, train, ...) by name, each a dataclass of keys (configs/keys.py).
_SECTIONS = keys.sections(Config)


def _dotted_keys(tree: dict, prefix: str = "") -> list[str]:
  return [k for key, v in tree.items()
          for k in (_dotted_keys(v, f"{prefix}{key}.") if isinstance(v, dict) else [f"{prefix}{key}"])]


def unknown_key_error(key: str, where: str = "") -> ValueError:
  """The ValueError for config key `key` (dotted) that configs/base.py does not have, naming the closest one.

  `where` (e.g. the override as written) is quoted after the key.
  """
  close = difflib.get_close_matches(key, _dotted_keys(base_config().to_dict()), n=1, cutoff=0.5)
  hint = f" Did you mean --config.{close[0]}?" if close else ""
  where = f" in {where!r}" if where else ""
  return ValueError(f"Unknown config key '{key}'{where}.{hint} Every key is listed in docs/config.md.")


def _check_keys(raw: dict, reference: dict, prefix: str = "") -> None:
  """Raises ValueError for keys in `raw` that the reference (configs/base.py) does not have."""
  for key, value in raw.items():
    path = f"{prefix}{key}"
    if key not in reference:
      raise unknown_key_error(path)
    if isinstance(reference[key], dict) != isinstance(value, dict):
      raise ValueError(f"Config key '{path}' must be {'a section' if isinstance(reference[key], dict) else 'a value'}.")
    if isinstance(value, dict):
      _check_keys(value, reference[key], path + ".")
  for key in reference:
    if key not in raw:
      raise ValueError(f"Config key '{prefix}{key}' is missing; start the config from "
                       "configs.base.base_config() so every key has a default.")


def _typed(section: str, cls, values: dict):
  """Builds dataclass `cls` from `values`, converting ints to floats and checking bool/int/str types."""
  kwargs = {}
  for field in dataclasses.fields(cls):
    value = values[field.name]
    expected = field.type if isinstance(field.type, type) else eval(field.type)  # noqa: S307
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if expected is int and isinstance(value, float) and value.is_integer():
      value = int(value)
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if not ok:
      raise ValueError(f"{section}.{field.name}={value!r} has type {type(value).__name__}; "
                       f"it must be {expected.__name__}.")
    kwargs[field.name] = value
  return cls(**kwargs)


def with_overrides(raw: ml_collections.ConfigDict | dict, changes: dict[str, Any]) -> dict:
  """Returns a copy of `raw` as nested dicts with dotted-key `changes` applied, e.g. {"mesh.rules": "fsdp"}.

  Raises ValueError for a key that is not in the config (every key is listed in docs/config.md).
  """
  out = raw.to_dict() if isinstance(raw, ml_collections.ConfigDict) else raw
  out = {k: dict(v) if isinstance(v, dict) else v for k, v in out.items()}
  for key, value in changes.items():
    section, _, name = key.partition(".")
    if section not in out or (name and (not isinstance(out[section], dict) or name not in out[section])):
      raise unknown_key_error(key)
    if name:
      out[section][name] = value
    else:
      out[section] = value
  return out


def model_config(**changes) -> ModelConfig:
  """A ModelConfig from the defaults of configs/base.py with `changes`, for a model built without a
  run plan (tests, tools): dtype "auto" computes in float32 unless `changes` name a dtype."""
  fields = {**base_config().model.to_dict(), **changes}
  if fields["dtype"] == "auto":
    fields["dtype"] = "float32"
  return ModelConfig(**fields)


def validate(raw: ml_collections.ConfigDict | dict) -> Config:
  """Checks a raw config completely and returns the frozen `Config`; raises ValueError on any problem."""
  raw_dict = raw.to_dict() if isinstance(raw, ml_collections.ConfigDict) else dict(raw)
  _check_keys(raw_dict, base_config().to_dict())
  sections = {name: _typed(name, cls, raw_dict[name]) for name, cls in _SECTIONS.items()}
  seed = raw_dict["seed"]
  if not isinstance(seed, int):
    raise ValueError(f"seed={seed!r} must be an integer.")
  cfg = Config(seed=seed, **sections)
  errors = [e for name, section in sections.items() for e in keys.choice_errors(name, section)]
  errors += _cross_checks(cfg)
  if errors:
    raise ValueError("Invalid config:\n  " + "\n  ".join(errors))
  return cfg


def _cross_checks(cfg: Config) -> list[str]:
  """Returns messages for values that are impossible together, or out of range (a key outside its
  declared choices is reported by `configs.keys.choice_errors`, before these)."""
  errors = []
  m, d, t, c, mesh = cfg.model, cfg.data, cfg.train, cfg.checkpoint, cfg.mesh
  errors += _corpus_source_errors(d)
  if d.seq_len < 2:
    errors.append(f"data.seq_len={d.seq_len}: must be at least 2.")
  if m.logits_chunk_size and d.seq_len % m.logits_chunk_size:
    errors.append(f"data.seq_len={d.seq_len} is not a multiple of model.logits_chunk_size="
                  f"{m.logits_chunk_size}; pick a chunk size that divides it (or 0 to disable).")
  if d.seq_len > m.max_seq_len:
    errors.append(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
                  "raise model.max_seq_len or shorten data.seq_len.")
  for key in ("steps", "global_batch_size", "grad_accum_steps", "log_every"):
    if getattr(t, key) < 1:
      errors.append(f"train.{key}={getattr(t, key)}: must be at least 1.")
  for key in ("warmup_steps", "eval_every", "eval_batches"):
    if getattr(t, key) < 0:
      errors.append(f"train.{key}={getattr(t, key)}: must be >= 0.")
  if t.global_batch_size % max(t.grad_accum_steps, 1):
    errors.append(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                  f"train.grad_accum_steps={t.grad_accum_steps}.")
  if t.learning_rate <= 0:
    errors.append(f"train.learning_rate={t.learning_rate}: must be positive.")
  if not 0 <= t.min_lr_ratio <= 1:
    errors.append(f"train.min_lr_ratio={t.min_lr_ratio}: must be in [0, 1].")
  if not (0 <= t.b1 < 1 and 0 <= t.b2 < 1):
    errors.append(f"train.b1={t.b1}, train.b2={t.b2}: Adam betas must be in [0, 1).")
  if t.nonfinite_skip_limit < 1:
    errors.append(f"train.nonfinite_skip_limit={t.nonfinite_skip_limit}: must be at least 1.")
  if t.clip_grad_norm < 0 or t.weight_decay < 0:
    errors.append("train.clip_grad_norm and train.weight_decay must be >= 0.")
  if c.save_every < 1 or c.keep < 1:
    errors.append(f"checkpoint.save_every={c.save_every}, checkpoint.keep={c.keep}: both must be >= 1.")
  if mesh.custom_rules:
    try:
      parse_rules(mesh.custom_rules)
    except ValueError as e:
      errors.append(str(e))
  for name, size in mesh.dcn_shape().items():
    if size < 1:
      errors.append(f"mesh.dcn_{name}={size}: must be a positive integer (1 for a single slice).")
  if mesh.num_devices < 0:
    errors.append(f"mesh.num_devices={mesh.num_devices}: use 0 for all devices or a positive count.")
  return errors + compression_errors(cfg.distill, cfg.prune, t.steps, t.init_checkpoint)


def _corpus_source_errors(d: DataConfig) -> list[str]:
  """Messages for data.path / field / validation / tokenizer_path settings that cannot work."""
  errors = []
  if d.corpus == "shakespeare" and (d.path or d.validation_path):
    errors.append(f"data.path={d.path!r} / data.validation_path={d.validation_path!r} are read only "
                  "for data.corpus = text | jsonl | parquet; set data.corpus or clear them.")
  if d.corpus in FILE_CORPORA:
    if not d.path:
      errors.append(f"data.corpus={d.corpus!r} needs data.path, a glob of your files "
                    "(e.g. '/data/books/*.txt').")
    if d.corpus != "text" and not d.field:
      errors.append(f"data.corpus={d.corpus!r} needs data.field, the key or column holding the text.")
    if not d.validation_path and not 0 < d.validation_fraction < 1:
      errors.append(f"data.validation_fraction={d.validation_fraction}: must be in (0, 1) when "
                    "data.validation_path is '' (e.g. 0.05).")
  if d.prompt_field and d.corpus not in ("jsonl", "parquet"):
    errors.append(f"data.prompt_field={d.prompt_field!r} is read from JSONL / Parquet records; set "
                  "data.corpus='jsonl' (or 'parquet') and data.path, or clear data.prompt_field.")
  elif d.prompt_field and d.prompt_field == d.field:
    errors.append(f"data.prompt_field and data.field are both {d.field!r}; name the prompt's key in "
                  "data.prompt_field and the response's in data.field.")
  if d.tokenizer == "huggingface" and not d.tokenizer_path:
    errors.append("data.tokenizer='huggingface' needs data.tokenizer_path (a tokenizer.json).")
  if d.tokenizer == "byte" and d.tokenizer_path:
    errors.append(f"data.tokenizer='byte' reads no file; clear data.tokenizer_path={d.tokenizer_path!r}.")
  return errors
