"""The decode benchmark's CPU model: Llama-shaped (GQA 8/2, tied 32k vocabulary), d_model 512, 8 layers,
47M parameters (189 MB in float32, more than this CPU's 32 MB L3, so weights stream from memory).

  python -m launch.bench_decode --config configs/bench_decode.py --out docs/results/decode
"""

from configs.base import base_config


def get_config():
  c = base_config()
  c.model.vocab_size = 32_768
  c.model.d_model = 512
  c.model.num_layers = 8
  c.model.num_heads = 8
  c.model.num_kv_heads = 2
  c.model.head_dim = 64
  c.model.mlp_dim = 2048
  c.model.max_seq_len = 2304
  c.model.tie_embeddings = True
  c.mesh.data = 1
  c.mesh.num_devices = 1
  return c
