"""~70B-parameter model with the Llama 3 70B shape (80 layers, GQA 64/8, d_model 8192, untied 128k vocabulary).

  python -m launch.compile --config configs/llama_70b.py --topology v5p:8x8x4
  python -m launch.memory --config configs/llama_70b.py --topology v5p:8x8x4 --config.model.remat=none

The published Llama 3 70B shape (d_model 8192, 80 layers, 64 query heads of 128, 8 kv heads, MLP
28672, vocabulary 128256, RoPE theta 500000, sequences of 8192). bf16 compute, fp32 parameters,
FSDP x tensor parallel over 256 chips, full remat: sized for a v5p slice of 256 chips, checked
offline by the TPU compiler (docs/tpu.md). Shapes and divisibility are checked by tests/test_configs.py.
"""

from configs.base import base_config


def get_config():
  c = base_config()
  c.model.vocab_size = 128_256
  c.model.d_model = 8192
  c.model.num_layers = 80
  c.model.num_heads = 64
  c.model.num_kv_heads = 8
  c.model.head_dim = 128
  c.model.mlp_dim = 28_672
  c.model.max_seq_len = 8192
  c.model.rope_theta = 500_000.0
  c.model.tie_embeddings = False
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.data.seq_len = 8192
  c.train.steps = 100_000
  c.train.global_batch_size = 512
  c.train.learning_rate = 1.5e-4
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
