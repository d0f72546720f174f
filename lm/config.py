"""The model's typed, frozen configuration, validated once where it is built."""

import dataclasses

import jax.numpy as jnp

from configs.keys import choice_errors, key
from lm.attention_plan import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# "observe" is the float model recording its dense layers' input ranges (calibration, lm/quant.py).
QUANT_MODES = ("none", "w8a16", "w8a8", "observe")
# How the KV cache stores keys and values (lm/kv_cache.py): in the compute dtype, or int8 with a
# float32 scale per (token, kv head).
KV_CACHE_DTYPES = ("compute", "int8")
# How the rotary inverse frequencies are rescaled (lm/layers.rope_inv_freq; Hugging Face's rope types).
ROPE_SCALINGS = ("none", "linear", "llama3")
# What a decoder block keeps for the backward pass, by name. The names live here so the model's config
# can check them without importing sharding/; sharding/remat.py maps each to a jax checkpoint policy
# (tests/test_sharding.py keeps the two in step).
REMAT_POLICY_NAMES = ("none", "full", "dots", "dots_no_batch", "save_qkv_mlp", "offload_qkv_mlp")
# The dense layers `model.quant_skip` may name; each name covers that layer in every block.
DENSE_LAYERS = ("attention.query", "attention.key", "attention.value", "attention.out",
                "mlp.gate", "mlp.up", "mlp.down", "unembed")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The network's shapes and numerics (a decoder-only transformer).

  Each field declares one `model.*` key (configs/keys.py): configs/base.py and docs/config.md are
  derived from these declarations. model.dtype "auto" stays "auto" until the run plan settles it for
  the target devices (`launch.run.plan.make_plan`; `compute_dtype` refuses it before then);
  `launch.run.config.model_config(**changes)` builds one for a model run without a plan (float32).
  """
  vocab_size: int = key(2048, "must equal the tokenizer's vocabulary size")
  d_model: int = key(128, "residual stream width (embed)")
  num_layers: int = key(2, "decoder blocks")
  num_heads: int = key(4, "query heads")
  num_kv_heads: int = key(4, "key/value heads; < num_heads gives grouped-query attention")
  head_dim: int = key(32, "per-head width; d_model need not equal num_heads * head_dim")
  mlp_dim: int = key(512, "SwiGLU hidden width")
  max_seq_len: int = key(128, "longest sequence rotary tables and the KV cache are sized for")
  rope_theta: float = key(10_000.0, "rotary embedding base wavelength")
  rope_scaling: str = key("none", "rescaled rotary frequencies (llama3: Llama 3.1+)", choices=ROPE_SCALINGS)
  rope_factor: float = key(1.0, "linear, llama3: how much longer the context is than the original")
  rope_low_freq_factor: float = key(
      1.0, "llama3: wavelengths above original_max_len / this are divided by factor")
  rope_high_freq_factor: float = key(4.0, "llama3: wavelengths below original_max_len / this are kept")
  rope_original_max_len: int = key(8192, "llama3: the context length before scaling")
  qkv_bias: bool = key(False, "a bias on the query/key/value projections (Qwen2, Qwen2.5)")
  norm_eps: float = key(1e-5, "RMSNorm epsilon")
  tie_embeddings: bool = key(True, "output projection shares the input embedding matrix")
  dtype: str = key("auto", "matmul compute dtype; auto: the run plan picks for the target devices, "
                   "bfloat16 on GPU/TPU, float32 on CPU", choices=("auto", *DTYPES))
  param_dtype: str = key("float32", "storage dtype of parameters", choices=tuple(DTYPES))
  remat: str = key("none", "what a block recomputes in the backward pass (sharding/remat.py); "
                   "offload_qkv_mlp: GPU/TPU only", choices=REMAT_POLICY_NAMES)
  attention: str = key("auto", "attention kernel (chosen by lm/attention_plan.py); auto: cuDNN on NVIDIA "
                       "GPUs, splash on TPU, XLA on CPU", choices=ATTENTION_IMPLEMENTATIONS)
  scan_unroll: int = key(1, "layers per scan iteration")
  logits_chunk_size: int = key(
      0, ">0: score the sequence this many positions at a time (big vocabularies)")
  quant: str = key("none", "int8 inference (set by python -m launch.quantize; observe: calibration)",
                   choices=QUANT_MODES)
  quant_embedding: bool = key(False, "also int8 the embedding table (and so a tied output projection)")
  quant_skip: str = key("", 'dense layers left in float, comma-separated: "mlp.down,unembed"')
  kv_cache_dtype: str = key("compute", "KV cache in the compute dtype, or int8 + a scale per (token, kv "
                            "head); changes no weight", choices=KV_CACHE_DTYPES)

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
  errors += choice_errors("model", cfg)
  if cfg.rope_theta <= 0:
    errors.append(f"model.rope_theta={cfg.rope_theta}: must be positive.")
  if cfg.rope_scaling in ("linear", "llama3") and not cfg.rope_factor >= 1:
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
  known = DENSE_LAYERS[:-1] if cfg.tie_embeddings else DENSE_LAYERS
  for name in cfg.quant_skip_layers:
    if name not in known:
      errors.append(f"model.quant_skip names {name!r}, which is not a dense layer of this model; "
                    f"choose from {list(known)} (comma-separated).")
  return errors
