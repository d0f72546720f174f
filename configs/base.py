"""Defaults shared by every experiment; each preset file starts from `base_config()` and overrides.

Every key that exists is listed here, so this file is also the config reference (see docs/config.md).
A key that is not here is rejected at start-up with the list of valid keys.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Returns the full default config: a tiny model on the bundled Shakespeare corpus, one device."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 2048          # must equal the tokenizer's vocabulary size
  c.model.d_model = 128              # residual stream width (embed)
  c.model.num_layers = 2
  c.model.num_heads = 4              # query heads
  c.model.num_kv_heads = 4           # key/value heads; < num_heads gives grouped-query attention
  c.model.head_dim = 32              # per-head width; d_model need not equal num_heads * head_dim
  c.model.mlp_dim = 512              # SwiGLU hidden width
  c.model.max_seq_len = 128          # longest sequence rotary tables and the KV cache are sized for
  c.model.rope_theta = 10_000.0
  c.model.rope_scaling = "none"      # none | linear | llama3 (Llama 3.1+): rescaled rotary frequencies
  c.model.rope_factor = 1.0          # linear, llama3: how much longer the context is than the original
  c.model.rope_low_freq_factor = 1.0   # llama3: wavelengths above original_max_len / this are divided by factor
  c.model.rope_high_freq_factor = 4.0  # llama3: wavelengths below original_max_len / this are kept
  c.model.rope_original_max_len = 8192  # llama3: the context length before scaling
  c.model.qkv_bias = False           # a bias on the query/key/value projections (Qwen2, Qwen2.5)
  c.model.norm_eps = 1e-5
  c.model.tie_embeddings = True      # output projection shares the input embedding matrix
  c.model.dtype = "auto"             # matmul compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU
  c.model.param_dtype = "float32"    # storage dtype of parameters
  c.model.remat = "none"             # none | full | dots | dots_no_batch | save_qkv_mlp | offload_qkv_mlp
  c.model.attention = "auto"         # auto | xla | cudnn | splash; auto: cuDNN on NVIDIA GPUs, splash on TPU, XLA on CPU
  c.model.scan_unroll = 1            # layers per scan iteration
  c.model.logits_chunk_size = 0      # >0: score the sequence this many positions at a time (big vocabularies)
  c.model.quant = "none"             # none | w8a16 | w8a8: int8 inference (set by python -m launch.quantize)
  c.model.quant_embedding = False    # also int8 the embedding table (and so a tied output projection)
  c.model.quant_skip = ""            # dense layers left in float, comma-separated: "mlp.down,unembed"
  c.model.kv_cache_dtype = "compute" # compute | int8: KV cache in the compute dtype, or int8 + a scale per (token, kv head)

  c.data = ml_collections.ConfigDict()
  c.data.corpus = "shakespeare"      # shakespeare (bundled) | text | jsonl | parquet (your files; docs/data.md)
  c.data.path = ""                   # glob of your files, e.g. "/data/books/**/*.txt" (not for shakespeare)
  c.data.field = "text"              # JSONL key / Parquet column holding each document's text
  c.data.prompt_field = ""           # instruction data: the key / column of each record's prompt (not scored)
  c.data.validation_path = ""        # glob of held-out files in the same format; "" splits a fraction off
  c.data.validation_fraction = 0.05  # share of documents held out when validation_path is ""
  c.data.data_dir = "runs/data"      # prepared tfds shards, manifest and tokenizer; one corpus per directory;
                                     # gs://...: published in the bucket, cached locally (docs/data.md)
  c.data.tokenizer = "sentencepiece" # sentencepiece | byte | huggingface
  c.data.tokenizer_path = ""         # "": train SentencePiece on the train split; else a .model or tokenizer.json
  c.data.seq_len = 128               # tokens per training example
  c.data.shuffle_buffer_docs = True  # shuffle documents each epoch before packing
  c.data.num_workers = 0             # grain worker processes (0: in the main process)
  c.data.process_sharding = "documents"  # documents: each process reads its own documents | rows:
                                     # all processes pack the same stream (identical for any process count)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.global_batch_size = 16     # sequences per optimizer step, over all devices and accumulation
  c.train.grad_accum_steps = 1       # micro-batches per step; global_batch_size must divide evenly
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 10
  c.train.min_lr_ratio = 0.1         # cosine decays to learning_rate * min_lr_ratio
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.clip_grad_norm = 1.0       # 0 disables clipping
  c.train.log_every = 10
  c.train.eval_every = 0             # 0: evaluate only at the end
  c.train.eval_batches = 8           # validation batches per evaluation (0: the whole split)
  c.train.tensorboard = True
  c.train.init_checkpoint = ""       # start from this checkpoint's params, fresh optimizer (docs/huggingface.md)
  c.train.microbatches = 1           # pipeline (mesh.stage > 1): micro-batches each step is split into
  c.train.pipeline_schedule = "gpipe"  # gpipe | circular (each stage holds pipeline_repeats layer groups)
  c.train.pipeline_repeats = 1       # circular: non-consecutive layer groups per stage (cuts the bubble)
  c.train.nonfinite = "stop"         # NaN/inf loss or grad norm: stop (exit 1, nothing saved) | skip_step (update dropped)
  c.train.nonfinite_skip_limit = 10  # skip_step: stop after this many non-finite steps in a row
  c.train.resume_fallback = True     # --resume: if the newest step is unreadable, continue from the newest readable one

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.save_every = 50       # steps between checkpoints (the last step is always saved)
  c.checkpoint.keep = 3              # newest checkpoints kept on disk
  c.checkpoint.async_save = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.stage = 1                   # pipeline stages: the layer stack split over devices (docs/sharding.md)
  c.mesh.data = -1                   # -1 absorbs the devices the other axes leave
  c.mesh.fsdp = 1
  c.mesh.sequence = 1                # sequence (context) parallelism: each sequence split into blocks over devices
  c.mesh.tensor = 1
  c.mesh.sequence_attention = "ring"  # mesh.sequence > 1: ring (K/V blocks passed around) | all_gather
  c.mesh.rules = "dp"                # logical-axis rule table: dp | fsdp | tp | fsdp_tp | dp_fsdp_tp | sp | fsdp_sp | fsdp_sp_tp
  c.mesh.custom_rules = ""           # overrides `rules`: "batch=data+fsdp,embed=fsdp,heads=tensor,..."
  c.mesh.dcn_stage = 1               # multi-slice / multi-host: the stage, data, fsdp, sequence, tensor sizes above are
  c.mesh.dcn_data = 1                # within a slice (ICI); each axis is further multiplied by its
  c.mesh.dcn_fsdp = 1                # dcn_* size across slices or hosts (DCN)
  c.mesh.dcn_sequence = 1
  c.mesh.dcn_tensor = 1
  c.mesh.num_devices = 0             # 0: all visible devices; n: the first n (for single-device references)

  # Knowledge distillation (python -m launch.distill); docs/compression.md.
  c.distill = ml_collections.ConfigDict()
  c.distill.teacher_checkpoint = ""  # the teacher run's <workdir>/checkpoints ("": no distillation)
  c.distill.alpha = 0.5              # weight of T^2 * KL(teacher || student); 1 - alpha weighs the CE
  c.distill.temperature = 2.0        # T > 0 softens both distributions
  c.distill.hidden_weight = 0.0      # MSE on final hidden states (same d_model only); 0 disables

  # Pruning (python -m launch.prune); docs/compression.md.
  c.prune = ml_collections.ConfigDict()
  c.prune.method = "none"            # none | magnitude (unstructured) | n_m (n of every m along the input)
                                     # | structured (remove layers/heads/neurons/channels: a smaller model)
  c.prune.sparsity = 0.5             # final fraction of zeros in each kernel (magnitude only)
  c.prune.n = 2                      # n_m: weights kept in every group of m
  c.prune.m = 4
  c.prune.init_checkpoint = ""       # start from this run's checkpoint ("": fresh init)
  c.prune.start_step = 0             # optimizer update where sparsity starts rising (cubic schedule)
  c.prune.end_step = 0               # update where it reaches its target (0 with start 0: one shot)
  c.prune.frequency = 10             # updates between mask recomputations
  # structured only: the pruned model's shape (0 keeps the model's; heads go with their KV head)
  c.prune.num_layers = 0             # layers kept (those whose removal raises calibration loss most)
  c.prune.d_model = 0                # embedding channels kept
  c.prune.num_heads = 0              # query heads kept (0 with num_kv_heads set: keep the group ratio)
  c.prune.num_kv_heads = 0           # KV heads (query groups) kept
  c.prune.mlp_dim = 0                # MLP neurons kept per layer
  c.prune.calibration_batches = 8    # training batches whose activations rank what is kept
  return c
