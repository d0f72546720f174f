"""Fine-tune a converted Hugging Face checkpoint on your own text (docs/huggingface.md, the walkthrough).

  python -m launch.convert --from-hf /models/llama-3.2-1b --out runs/llama-3.2-1b/converted
  python -m launch.train --config configs/finetune_hf.py --workdir runs/llama-3.2-1b-ft \
      --config.train.init_checkpoint=runs/llama-3.2-1b/converted \
      --config.data.path='/data/my_notes/*.jsonl'

The model section is Llama-3.2-1B's config.json (as published; not downloaded here). For another
model, replace it with the `--config.model.*` flags `launch.convert` prints (a field that differs
from the checkpoint stops the run before compiling, with the flag to set). The tokenizer is left
unset: a run with `train.init_checkpoint` then reads its text with the tokenizer the converted
checkpoint carries (<converted>/tokenizer/tokenizer.json). Instruction data (records with a prompt and
a response, loss on the response only): add --config.data.prompt_field=prompt --config.data.field=response.
"""

from configs.base import base_config


def get_config():
  c = base_config()
  # Llama-3.2-1B (config.json): 1.24B parameters, tied embeddings, llama3 rope scaling.
  c.model.update(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                 mlp_dim=8192, max_seq_len=131072, rope_theta=500000.0, rope_scaling="llama3",
                 rope_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                 rope_original_max_len=8192, norm_eps=1e-5, tie_embeddings=True)
  c.model.remat = "full"             # activations of 16 layers x 1024 tokens would not fit otherwise
  c.model.logits_chunk_size = 256    # 128k-entry vocabulary: score 256 positions at a time
  # Your documents: JSONL with a "text" field (or corpus="text" and a glob of .txt files); docs/data.md.
  # prompt_field="prompt" (and field="response") scores only the responses of instruction records.
  c.data.update(corpus="jsonl", path="/data/my_notes/*.jsonl", field="text", data_dir="runs/data-finetune",
                seq_len=1024)
  # A fine-tune: small learning rate, short warmup, no weight decay, evaluation every 100 steps.
  c.train.update(steps=1000, global_batch_size=16, learning_rate=2e-5, warmup_steps=50, min_lr_ratio=0.1,
                 weight_decay=0.0, eval_every=100, eval_batches=16)
  c.checkpoint.update(save_every=200, keep=2)
  c.mesh.update(rules="fsdp", data=1, fsdp=-1)   # parameters and optimizer state sharded over all devices
  return c
