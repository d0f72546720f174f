"""Model FLOPs per token, the numerator of MFU.

Training costs 6 FLOPs per matmul weight per token (2 forward, 4 backward), over every weight that
takes part in a matmul: all block weights and the output projection (tied or not), but not the
embedding lookup. Attention scores and the weighted sum add 12 * layers * (heads * head_dim) * seq_len
per token (forward 2 matmuls of 2 * s * h * k each, times 3 for the backward), counted without
the causal mask's saving, as in PaLM's MFU definition (Chowdhery et al. 2022, appendix B).
MaxText's `calculate_tflops_training_per_device` halves that term for causal attention, so on the
same step its MFU is lower than ours by 6 * layers * heads * head_dim * seq_len / (our FLOPs per
token): about 11% of ours for llama_8b at 8192 tokens, 4% for Llama 2 70B at 4096.
"""

from lm.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
  """Weights that take part in a matmul per token: the blocks plus the output projection."""
  d, hd = cfg.d_model, cfg.head_dim
  attention = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  mlp = 3 * d * cfg.mlp_dim
  return cfg.num_layers * (attention + mlp) + cfg.vocab_size * d


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Returns forward+backward FLOPs per trained token: 6 * N_matmul + 12 * layers * heads * head_dim * seq_len."""
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  return 6.0 * matmul_params(cfg) + attention

