"""~70B-parameter model with the Llama 3 70B shape (80 layers, GQA 64/8, d_model 8192, untied 128k vocabulary).

  python -m launch.compile --config configs/llama_70b.py --topology v5p:8x8x4
  python -m launch.memory --config configs/llama_70b.py --topology v5p:8x8x4 --config.model.remat=none

The published Llama 3 70B shape (d_model 8192, 80 layers, 64 query heads of 128, 8 kv heads, MLP
28672, vocabulary 128256, RoPE theta 500000, sequences of 8192). bf16 compute, fp32 parameters,
FSDP x tensor parallel over 256 chips, full remat: sized for a v5p slice of 256 chips, checked
offline by the TPU compiler (docs/tpu.md). Shapes and divisibility are checked by tests/test_configs.py.
"""

from configs import llama_8b


def get_config():
  """llama_8b's run (tokenizer, sequence length, mesh, remat, schedule) with the 70B shape."""
  c = llama_8b.get_config()
  c.model.d_model = 8192
  c.model.num_layers = 80
  c.model.num_heads = 64
  c.model.mlp_dim = 28_672
  c.train.learning_rate = 1.5e-4
  return c
