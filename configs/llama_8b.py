"""~8B-parameter model with the Llama 3 8B shape (32 layers, GQA 32/8, untied 128k vocabulary).

  python -m launch.train --config configs/llama_8b.py --workdir runs/8b
  # 64 GPUs (8 nodes x 8): --config.mesh.fsdp=8 --config.mesh.tensor=8 ... or 3-D:
  # --config.mesh.data=2 --config.mesh.fsdp=16 --config.mesh.tensor=4 --config.mesh.rules=dp_fsdp_tp

bf16 compute, fp32 parameters, FSDP x tensor parallel, full remat. Shapes and divisibility are
checked by tests/test_configs.py.
"""

from configs.base import base_config


def get_config():
  c = base_config()
  c.model.vocab_size = 128_256
  c.model.d_model = 4096
  c.model.num_layers = 32
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.head_dim = 128
  c.model.mlp_dim = 14_336
  c.model.max_seq_len = 8192
  c.model.rope_theta = 500_000.0
  c.model.tie_embeddings = False
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.data.seq_len = 8192
  c.train.steps = 100_000
  c.train.global_batch_size = 512
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2000
  c.train.log_every = 20
  c.train.eval_every = 2000
  c.train.eval_batches = 20
  c.checkpoint.save_every = 500
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 8
  c.mesh.rules = "fsdp_tp"
  return c
