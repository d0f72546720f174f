"""~125M-parameter Llama-style model (GPT-3 Small widths), bf16 compute, FSDP over all devices.

  python -m launch.train --config configs/llama_125m.py --workdir runs/125m
  # e.g. one GPU node: --config.mesh.fsdp=-1 ; a v5e-16 slice: --config.mesh.fsdp=16

Sized for one accelerator node; shapes and divisibility are checked by tests/test_configs.py.
Training it needs a corpus and tokenizer with 32768 tokens (see docs/config.md).
"""

from configs.base import base_config


def get_config():
  c = base_config()
  c.model.vocab_size = 32768
  c.model.d_model = 768
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.num_kv_heads = 12
  c.model.head_dim = 64
  c.model.mlp_dim = 2048
  c.model.max_seq_len = 2048
  c.model.tie_embeddings = True
  c.model.dtype = "bfloat16"
  c.model.remat = "dots_no_batch"
  c.data.seq_len = 2048
  c.train.steps = 20_000
  c.train.global_batch_size = 256
  c.train.learning_rate = 6e-4
  c.train.warmup_steps = 1000
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.eval_batches = 50
  c.checkpoint.save_every = 1000
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.rules = "fsdp"
  return c
