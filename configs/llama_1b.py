"""~1.2B-parameter model with the Llama 3.2 1B shape (GQA 32/8, tied 128k vocabulary), bf16, FSDP.

  python -m launch.train --config configs/llama_1b.py --workdir runs/1b
  # 8 GPUs: --config.mesh.fsdp=8 ; TPU v5p-32: --config.mesh.fsdp=16 --config.mesh.data=-1 ...

Shapes and divisibility are checked by tests/test_configs.py.
"""

from configs.base import base_config


def get_config():
  c = base_config()
  c.model.vocab_size = 128_256
  c.model.d_model = 2048
  c.model.num_layers = 16
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.head_dim = 64
  c.model.mlp_dim = 8192
  c.model.max_seq_len = 4096
  c.model.rope_theta = 500_000.0
  c.model.tie_embeddings = True
  c.model.dtype = "bfloat16"
  c.model.remat = "dots_no_batch"
  c.data.seq_len = 4096
  c.train.steps = 50_000
  c.train.global_batch_size = 256
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2000
  c.train.log_every = 50
  c.train.eval_every = 2000
  c.train.eval_batches = 50
  c.checkpoint.save_every = 1000
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.rules = "fsdp"
  return c
