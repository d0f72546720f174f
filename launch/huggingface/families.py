"""Hugging Face config.json <-> our `model.*` fields, for the decoder families we convert.

  family   architectures            what differs from Llama (for us)
  llama    LlamaForCausalLM         -  (rope scaling `llama3` for 3.1/3.2/3.3, `linear`)
  mistral  MistralForCausalLM       `sliding_window`: refused when shorter than max_position_embeddings
  qwen2    Qwen2ForCausalLM         q/k/v biases (model.qkv_bias); sliding window off by default

Every field that would change the function the weights compute and that we do not implement is
refused, all of them named in one HfConfigError, before anything is read or written.
"""

import json
import os
from typing import Any

from configs.base import base_config
from lm.config import ModelConfig

# model_type -> architecture class name. Qwen2 is Qwen2.5 too (same class).
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Hugging Face rope type -> ours, and the fields each needs (HF name -> model.* name).
_ROPE_FIELDS = {
    "default": ("none", {}),
    "linear": ("linear", {"factor": "rope_factor"}),
    "llama3": ("llama3", {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
                          "high_freq_factor": "rope_high_freq_factor",
                          "original_max_position_embeddings": "rope_original_max_len"}),
}
_ROPE_HF_TYPE = {ours: hf for hf, (ours, _) in _ROPE_FIELDS.items()}


class HfConfigError(ValueError):
  """A Hugging Face config.json or tensor set this converter does not support, with the field named."""


def read_hf_config(directory: str) -> dict[str, Any]:
  """Returns config.json of a HF checkpoint directory as a dict; HfConfigError if it cannot be read."""
  if not os.path.exists(directory):
    raise HfConfigError(f"{directory} does not exist; pass the directory `hf download ... --local-dir` "
                        "wrote (it holds config.json and *.safetensors).")
  if not os.path.isdir(directory):
    raise HfConfigError(f"{directory} is a file, not a directory; pass the model directory that holds it.")
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise HfConfigError(f"{directory} has no config.json; pass a Hugging Face model directory "
                        "(save_pretrained output or a hub snapshot).")
  try:
    with open(path) as fh:
      return json.load(fh)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise HfConfigError(f"{path} is not valid JSON ({e}); download it again.") from e


def _rope_type(d: dict) -> str:
  return d.get("rope_type", d.get("type", "default"))


def _rope_fields(hf: dict, errors: list[str]) -> dict[str, Any]:
  """Our rope_* fields from `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (4)."""
  scaling, params = hf.get("rope_scaling") or {}, hf.get("rope_parameters") or {}
  if params and "rope_type" not in params and all(isinstance(v, dict) for v in params.values()):
    errors.append(f"rope_parameters={params!r}: per-layer-type rope parameters are not supported.")
    return {}
  if scaling and params:
    strip = lambda d: {k: v for k, v in d.items() if k not in ("type", "rope_type", "rope_theta")}
    if (_rope_type(scaling), strip(scaling)) != (_rope_type(params), strip(params)):
      errors.append(f"rope_scaling={scaling!r} and rope_parameters={params!r} disagree; keep the one "
                    "the model was trained with and delete the other from config.json.")
      return {}
  if "rope_theta" in hf and "rope_theta" in params and float(hf["rope_theta"]) != float(params["rope_theta"]):
    errors.append(f"rope_theta={hf['rope_theta']!r} and rope_parameters.rope_theta={params['rope_theta']!r} "
                  "disagree; keep one in config.json.")
  field, rope = ("rope_parameters", params) if params else ("rope_scaling", scaling)
  defaults = base_config().model
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  out = dict(rope_theta=theta, rope_scaling="none", rope_factor=defaults.rope_factor,
             rope_low_freq_factor=defaults.rope_low_freq_factor,
             rope_high_freq_factor=defaults.rope_high_freq_factor,
             rope_original_max_len=defaults.rope_original_max_len)
  kind = _rope_type(rope)
  if kind not in _ROPE_FIELDS:
    errors.append(f"{field}.rope_type={kind!r} is not supported (dynamic NTK and yarn rescale attention "
                  f"or positions at run time); supported: {sorted(_ROPE_FIELDS)}.")
    return out
  out["rope_scaling"], needed = _ROPE_FIELDS[kind]
  for hf_key, ours in needed.items():
    if not isinstance(rope.get(hf_key), (int, float)):
      errors.append(f"{field}.{hf_key}={rope.get(hf_key)!r}: rope type {kind!r} needs a number here.")
    else:
      out[ours] = type(out[ours])(rope[hf_key])
  known = set(needed) | {"type", "rope_type", "rope_theta"}
  for key, value in rope.items():
    if key not in known and value not in (None, 1, 1.0):  # e.g. attention_factor, partial_rotary_factor
      errors.append(f"{field}.{key}={value!r} is not supported with rope type {kind!r}.")
  return out


def _sliding_window_errors(hf: dict, family: str, num_layers: int, max_len: int) -> list[str]:
  """A sliding window shorter than the context changes attention; our attention is full causal."""
  window = hf.get("sliding_window")
  layer_types = hf.get("layer_types")
  if family == "qwen2" and layer_types is None:  # transformers derives them from use_sliding_window
    first = hf.get("max_window_layers", num_layers) if hf.get("use_sliding_window") else num_layers
    layer_types = ["full_attention"] * min(first, num_layers) + ["sliding_attention"] * (num_layers - first)
  elif family == "mistral" and layer_types is None:
    layer_types = ["sliding_attention" if window else "full_attention"] * num_layers
  sliding = [i for i, t in enumerate(layer_types or []) if t != "full_attention"]
  if not sliding or window is None or window >= max_len:
    return []
  field = "use_sliding_window" if family == "qwen2" and "layer_types" not in hf else "sliding_window"
  return [f"{field}={hf.get(field)!r}: layers {sliding[:4]}{'...' if len(sliding) > 4 else ''} attend "
          f"to the last sliding_window={window} tokens only, shorter than max_position_embeddings="
          f"{max_len}; our attention is full causal (a model whose window covers its context converts)."]


def model_fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """Maps a config.json (a dict) of a supported family to our `model.*` fields.

  Raises HfConfigError naming every unsupported field at once. Reads both the transformers 4
  spelling (`rope_theta`, `rope_scaling`) and the 5 one (`rope_parameters`).
  """
  errors = []
  def bad(field, why):
    errors.append(f"{field}={hf.get(field)!r} is not supported: {why}")

  family = hf.get("model_type", "llama")
  if family not in FAMILIES:
    bad("model_type", f"the families that convert are {sorted(FAMILIES)}.")
    family = "llama"
  archs = hf.get("architectures") or [FAMILIES[family]]
  if archs != [FAMILIES[family]]:
    bad("architectures", f"model_type {family!r} converts as {FAMILIES[family]} (a causal LM).")
  if hf.get("hidden_act", "silu") != "silu":
    bad("hidden_act", "our MLP is SwiGLU (silu); convert only silu models.")
  if hf.get("attention_bias") and family != "qwen2":
    bad("attention_bias", "it adds biases to q/k/v and to o_proj; we have q/k/v biases (Qwen2) only.")
  if hf.get("mlp_bias"):
    bad("mlp_bias", "our MLP has no biases.")
  for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
    if not isinstance(hf.get(field), int):
      bad(field, "this size is required (a positive integer).")
  if errors:
    raise HfConfigError("config.json: " + " ".join(errors))
  max_len = hf.get("max_position_embeddings", 2048)
  rope = _rope_fields(hf, errors)
  errors += _sliding_window_errors(hf, family, hf["num_hidden_layers"], max_len)
  if errors:
    raise HfConfigError("config.json: " + " ".join(errors))
  heads = hf["num_attention_heads"]
  return dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, mlp_dim=hf["intermediate_size"],
      max_seq_len=max_len, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=family == "qwen2", **rope)


def hf_config_from_model(cfg: ModelConfig, dtype: str, base: dict[str, Any] | None = None) -> dict:
  """Returns a config.json dict for `cfg`; `base` (the imported config.json) keeps token ids etc.

  The family is the imported one (Qwen2 whenever the model has q/k/v biases, Llama when unknown).
  Rope settings are written in both spellings, with the same content (transformers 4 reads
  rope_theta + rope_scaling, 5 reads rope_parameters).
  """
  base = dict(base or {})
  family = "qwen2" if cfg.qkv_bias else base.get("model_type") if base.get("model_type") in ("llama", "mistral") \
      else "llama"
  hf = {k: v for k, v in base.items() if k not in ("rope_scaling", "rope_parameters", "transformers_version")}
  rope = {"rope_type": _ROPE_HF_TYPE[cfg.rope_scaling]}
  for hf_key, ours in _ROPE_FIELDS[rope["rope_type"]][1].items():
    rope[hf_key] = getattr(cfg, ours)
  hf.update(
      architectures=[FAMILIES[family]], model_type=family, hidden_act="silu", vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.mlp_dim,
      max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, dtype=dtype, torch_dtype=dtype,  # 5 and 4 spellings
      rope_theta=cfg.rope_theta, rope_parameters={**rope, "rope_theta": cfg.rope_theta},
      rope_scaling=rope if cfg.rope_scaling != "none" else None)
  if family == "llama":
    hf.update(attention_bias=False, mlp_bias=False)
  elif family == "mistral":
    hf.update(sliding_window=None)
  else:
    hf.update(use_sliding_window=False)
    hf.pop("layer_types", None)
  return hf
