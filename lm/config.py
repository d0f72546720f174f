"""The model's typed, frozen configuration, validated once where it is built."""

import dataclasses

import jax.numpy as jnp

from lm.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# "observe" is the float model recording its dense layers' input ranges (calibration, lm/quant.py).
QUANT_MODES = ("none", "w8a16", "w8a8", "observe")
# How the KV cache stores keys and values (lm/kv_cache.py): in the compute dtype, or int8 with a
# float32 scale per (token, kv head).
KV_CACHE_DTYPES = ("compute", "int8")
# How the rotary inverse frequencies are rescaled (lm/layers.rope_inv_freq; Hugging Face's rope types).
ROPE_SCALINGS = ("none", "linear", "llama3")
# The dense layers `model.quant_skip` may name; each name covers that layer in every block.
DENSE_LAYERS = ("attention.query", "attention.key", "attention.value", "attention.out",
                "mlp.gate", "mlp.up", "mlp.down", "unembed")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a decoder-only transformer.

  Every field is required: the defaults and the meaning of each key are written once, in
  configs/base.py (`launch.run.config.model_config(**changes)` builds one from them).
  """
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_seq_len: int
  rope_theta: float
  rope_scaling: str            # none | linear | llama3: rescaled rotary frequencies (ROPE_SCALINGS)
  rope_factor: float
  rope_low_freq_factor: float
  rope_high_freq_factor: float
  rope_original_max_len: int
  qkv_bias: bool               # a bias on the query, key and value projections (Qwen2)
  norm_eps: float
  tie_embeddings: bool
  dtype: str
  param_dtype: str
  remat: str
  attention: str  # auto | xla | cudnn | splash (lm/attention.py)
  scan_unroll: int
  logits_chunk_size: int
  quant: str
  quant_embedding: bool
  quant_skip: str
  kv_cache_dtype: str          # compute | int8 (KV_CACHE_DTYPES); changes no weight

  @property
  def quant_skip_layers(self) -> tuple[str, ...]:
    return tuple(name.strip() for name in self.quant_skip.split(",") if name.strip())

  def __post_init__(self):
    errors = model_config_errors(self)
    if errors:
      raise ValueError("Invalid model config:\n  " + "\n  ".join(errors))

  @property
  def rope_scaling_kwargs(self) -> dict:
    """The rope scaling arguments of lm.layers.rotary_tables."""
    return dict(scaling=self.rope_scaling, factor=self.rope_factor, low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor, original_max_len=self.rope_original_max_len)

  @property
  def compute_dtype(self):
    if self.dtype == "auto":
      raise ValueError("model.dtype='auto' is settled for the target devices by the run plan "
                       "(launch.run.plan.make_plan); use the plan's config (plan.cfg.model).")
    return DTYPES[self.dtype]

  @property
  def storage_dtype(self):
    return DTYPES[self.param_dtype]

  def num_params(self, include_embedding: bool = True) -> int:
    """Number of parameters; the input embedding is excluded when `include_embedding` is False."""
    d, h, kv, hd = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim
    attention = d * hd * (2 * h + 2 * kv) + (hd * (h + 2 * kv) if self.qkv_bias else 0)
    mlp = 3 * d * self.mlp_dim
    per_layer = attention + mlp + 2 * d
    total = self.num_layers * per_layer + d  # + final norm
    embedding = self.vocab_size * d
    if not self.tie_embeddings:
      total += embedding  # the untied output projection always counts
    if include_embedding:
      total += embedding
    return total


def model_config_errors(cfg: ModelConfig) -> list[str]:
  """Returns a human-readable message for every impossible value in `cfg` (empty when valid)."""
  errors = []
  for key in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim", "max_seq_len", "scan_unroll"):
    value = getattr(cfg, key)
    if not isinstance(value, int) or value <= 0:
      errors.append(f"model.{key}={value!r}: must be a positive integer.")
  if errors:
    return errors
  if cfg.num_heads % cfg.num_kv_heads:
    errors.append(
        f"model.num_heads={cfg.num_heads} is not a multiple of model.num_kv_heads={cfg.num_kv_heads}: "
        "grouped-query attention shares each KV head among num_heads/num_kv_heads query heads; "
        "pick num_kv_heads that divides num_heads.")
  if cfg.head_dim % 2:
    errors.append(f"model.head_dim={cfg.head_dim} must be even (rotary embeddings rotate pairs).")
  if cfg.dtype != "auto" and cfg.dtype not in DTYPES:
    errors.append(f"model.dtype={cfg.dtype!r}: choose one of {['auto', *sorted(DTYPES)]}.")
  if cfg.param_dtype not in DTYPES:
    errors.append(f"model.param_dtype={cfg.param_dtype!r}: choose one of {sorted(DTYPES)}.")
  if cfg.rope_theta <= 0:
    errors.append(f"model.rope_theta={cfg.rope_theta}: must be positive.")
  if cfg.rope_scaling not in ROPE_SCALINGS:
    errors.append(f"model.rope_scaling={cfg.rope_scaling!r}: choose one of {list(ROPE_SCALINGS)}.")
  elif cfg.rope_scaling != "none" and not cfg.rope_factor >= 1:
    errors.append(f"model.rope_factor={cfg.rope_factor}: must be >= 1 with model.rope_scaling="
                  f"{cfg.rope_scaling!r}.")
  elif cfg.rope_scaling == "llama3" and not (
      0 < cfg.rope_low_freq_factor < cfg.rope_high_freq_factor and cfg.rope_original_max_len > 0):
    errors.append(f"model.rope_low_freq_factor={cfg.rope_low_freq_factor}, model.rope_high_freq_factor="
                  f"{cfg.rope_high_freq_factor}, model.rope_original_max_len={cfg.rope_original_max_len}: "
                  "llama3 scaling needs 0 < low < high and a positive original length.")
  if not 0 < cfg.norm_eps < 1:
    errors.append(f"model.norm_eps={cfg.norm_eps}: must be in (0, 1).")
  if cfg.logits_chunk_size < 0:
    errors.append(f"model.logits_chunk_size={cfg.logits_chunk_size}: must be >= 0 (0 disables chunking).")
  if cfg.scan_unroll > cfg.num_layers or (cfg.num_layers % cfg.scan_unroll):
    errors.append(f"model.scan_unroll={cfg.scan_unroll} must divide model.num_layers={cfg.num_layers}.")
  if cfg.attention not in ATTENTION_IMPLEMENTATIONS:
    errors.append(f"model.attention={cfg.attention!r}: choose one of {list(ATTENTION_IMPLEMENTATIONS)}.")
  if cfg.quant not in QUANT_MODES:
    errors.append(f"model.quant={cfg.quant!r}: choose one of {list(QUANT_MODES)}.")
  if cfg.kv_cache_dtype not in KV_CACHE_DTYPES:
    errors.append(f"model.kv_cache_dtype={cfg.kv_cache_dtype!r}: choose one of {list(KV_CACHE_DTYPES)} "
                  "(--config.model.kv_cache_dtype=int8 halves the cache of a bf16 model).")
  known = DENSE_LAYERS[:-1] if cfg.tie_embeddings else DENSE_LAYERS
  for name in cfg.quant_skip_layers:
    if name not in known:
      errors.append(f"model.quant_skip names {name!r}, which is not a dense layer of this model; "
                    f"choose from {list(known)} (comma-separated).")
  return errors
