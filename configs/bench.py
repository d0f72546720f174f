"""The speed benchmark's model: d_model 256, 4 layers, 4 heads, MLP 1024, sequence 256, batch 16,
a 32k vocabulary, float32, one device (override mesh.* for the parallel presets).

  python -m launch.bench --config configs/bench.py --out docs/results/bench
  python -m launch.bench --config configs/bench.py --config.model.dtype=bfloat16

Benchmarks feed random tokens, so no tokenizer with 32k entries is needed.
"""

from configs.base import base_config


def get_config():
  c = base_config()
  c.model.vocab_size = 32_768
  c.model.d_model = 256
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 4
  c.model.head_dim = 64
  c.model.mlp_dim = 1024
  c.model.max_seq_len = 256
  c.model.tie_embeddings = True
  c.data.seq_len = 256
  c.train.global_batch_size = 16
  c.mesh.data = 1
  c.mesh.num_devices = 1
  return c
