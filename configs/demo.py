"""The demo: a 4-layer Llama-style LM on the bundled Shakespeare corpus, data parallel on 8 CPU devices.

  make demo
  # which runs: python -m launch.demo --config configs/demo.py --workdir runs/demo

About 4M parameters (1M of them the 4096-token SentencePiece embedding), 128-token sequences, 16
sequences per step; a few minutes on a 2-core CPU.
"""

from configs.base import base_config


def get_config():
  c = base_config()
  c.model.vocab_size = 4096
  c.model.d_model = 256
  c.model.num_layers = 4
  c.model.num_heads = 8
  c.model.num_kv_heads = 4
  c.model.head_dim = 32
  c.model.mlp_dim = 768
  c.model.max_seq_len = 128
  c.data.seq_len = 128
  c.data.data_dir = "runs/data"
  c.train.steps = 400
  c.train.global_batch_size = 16
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 40
  c.train.log_every = 25
  c.train.eval_every = 200
  c.train.eval_batches = 0
  c.checkpoint.save_every = 100
  c.mesh.data = -1
  c.mesh.rules = "dp"
  return c
