"""CPU smoke test: a 2-layer model, a few steps, seconds to run.

  python -m launch.train --config configs/smoke.py --workdir runs/smoke
"""

from configs.base import base_config


def get_config():
  c = base_config()
  c.model.vocab_size = 512
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 16
  c.model.mlp_dim = 128
  c.model.max_seq_len = 64
  c.data.seq_len = 64
  c.data.data_dir = "runs/data-smoke"
  c.train.steps = 20
  c.train.global_batch_size = 8
  c.train.warmup_steps = 4
  c.train.log_every = 5
  c.train.eval_batches = 2
  c.checkpoint.save_every = 10
  return c
