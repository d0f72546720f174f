"""The typed, frozen `data`, `train`, `checkpoint` and `mesh` sections and the whole `Config`.

Each field declares one config key (configs/keys.py): its type, default, allowed values and meaning.
configs/base.py derives the defaults from these declarations, launch/run/config.py checks a raw
config against them, and docs/config.md is generated from them (python -m launch.config_docs --write).
"""

import dataclasses
from typing import Any

from compress.config import DistillConfig, PruneConfig
from configs.keys import key
from lm.config import ModelConfig
from lm.data.sources import KINDS as FILE_CORPORA
from lm.data.tokenizer import KINDS as TOKENIZERS
from sharding.mesh import MESH_AXES
from sharding.pipeline import SCHEDULES as PIPELINE_SCHEDULES
from sharding.rules import RULE_PRESETS
from sharding.sequence import STRATEGIES as SEQUENCE_STRATEGIES

CORPORA = ("shakespeare", *FILE_CORPORA)
# data.process_sharding: how processes split the data (lm/data/loader.train_iterator).
PROCESS_SHARDINGS = ("documents", "rows")
# train.nonfinite: what a step with a NaN/inf loss or gradient norm does (docs/training.md).
NONFINITE_POLICIES = ("stop", "skip_step")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Corpus, tokenizer, sequence length."""
  corpus: str = key("shakespeare", "shakespeare is bundled; text, jsonl, parquet read your files (docs/data.md)",
                    choices=CORPORA)
  path: str = key("", 'glob of your files, e.g. "/data/books/**/*.txt" (not for shakespeare)')
  field: str = key("text", "JSONL key / Parquet column holding each document's text")
  prompt_field: str = key("", "instruction data: the key / column of each record's prompt (not scored)")
  validation_path: str = key("", 'glob of held-out files in the same format; "" splits a fraction off')
  validation_fraction: float = key(0.05, 'share of documents held out when validation_path is ""')
  data_dir: str = key("runs/data", "prepared tfds shards, manifest and tokenizer, one corpus per directory; "
                      "gs://...: published in the bucket, cached locally (docs/data.md)")
  tokenizer: str = key("sentencepiece", "how text becomes tokens", choices=TOKENIZERS)
  tokenizer_path: str = key("", '"": train SentencePiece on the train split; else a .model or tokenizer.json')
  seq_len: int = key(128, "tokens per training example")
  shuffle_buffer_docs: bool = key(True, "shuffle documents each epoch before packing")
  num_workers: int = key(0, "grain worker processes (0: in the main process)")
  process_sharding: str = key("documents", "documents: each process reads its own documents; rows: all "
                              "processes pack the same stream (identical for any process count)",
                              choices=PROCESS_SHARDINGS)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimizer, schedule, batch, logging, evaluation."""
  steps: int = key(100, "optimizer updates to run")
  global_batch_size: int = key(16, "sequences per optimizer step, over all devices and accumulation")
  grad_accum_steps: int = key(1, "micro-batches per step; global_batch_size must divide evenly")
  learning_rate: float = key(3e-3, "peak learning rate, reached after warmup_steps")
  warmup_steps: int = key(10, "updates of linear warmup from 0")
  min_lr_ratio: float = key(0.1, "cosine decays to learning_rate * min_lr_ratio")
  weight_decay: float = key(0.1, "AdamW weight decay")
  b1: float = key(0.9, "Adam first-moment decay")
  b2: float = key(0.95, "Adam second-moment decay")
  eps: float = key(1e-8, "Adam epsilon")
  clip_grad_norm: float = key(1.0, "global gradient norm clipped to this; 0 disables clipping")
  log_every: int = key(10, "steps between training log lines")
  eval_every: int = key(0, "steps between evaluations; 0: evaluate only at the end")
  eval_batches: int = key(8, "validation batches per evaluation (0: the whole split)")
  tensorboard: bool = key(True, "write TensorBoard summaries to the workdir")
  init_checkpoint: str = key("", "start from this checkpoint's params, fresh optimizer (docs/huggingface.md)")
  microbatches: int = key(1, "pipeline (mesh.stage > 1): micro-batches each step is split into")
  pipeline_schedule: str = key("gpipe", "circular: each stage holds pipeline_repeats layer groups",
                               choices=PIPELINE_SCHEDULES)
  pipeline_repeats: int = key(1, "circular: non-consecutive layer groups per stage (cuts the bubble)")
  nonfinite: str = key("stop", "NaN/inf loss or grad norm: stop (exit 1, nothing saved) or skip_step "
                       "(update dropped)", choices=NONFINITE_POLICIES)
  nonfinite_skip_limit: int = key(10, "skip_step: stop after this many non-finite steps in a row")
  resume_fallback: bool = key(True, "--resume: if the newest step is unreadable, continue from the newest "
                              "readable one")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """How often checkpoints are saved and how many are kept."""
  save_every: int = key(50, "steps between checkpoints (the last step is always saved)")
  keep: int = key(3, "newest checkpoints kept on disk")
  async_save: bool = key(True, "write checkpoints in the background while training goes on")


def _dcn(axis: str) -> str:
  return (f"multi-slice / multi-host: mesh.{axis} (within a slice, ICI) is further multiplied by this "
          "across slices or hosts (DCN)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Devices and parallelism."""
  stage: int = key(1, "pipeline stages: the layer stack split over devices (docs/sharding.md)")
  data: int = key(-1, "data parallelism; -1 absorbs the devices the other axes leave")
  fsdp: int = key(1, "fully sharded data parallelism: parameters split over it under fsdp rules")
  sequence: int = key(1, "sequence (context) parallelism: each sequence split into blocks over devices")
  tensor: int = key(1, "tensor parallelism: heads and MLP width split over it under tp rules")
  sequence_attention: str = key("ring", "mesh.sequence > 1: ring (K/V blocks passed around) or all_gather",
                                choices=SEQUENCE_STRATEGIES)
  rules: str = key("dp", "logical-axis rule table (sharding/rules.py)", choices=tuple(RULE_PRESETS))
  num_devices: int = key(0, "0: all visible devices; n: the first n (for single-device references)")
  custom_rules: str = key("", 'overrides `rules`: "batch=data+fsdp,embed=fsdp,heads=tensor,..."')
  dcn_stage: int = key(1, _dcn("stage"))
  dcn_data: int = key(1, _dcn("data"))
  dcn_fsdp: int = key(1, _dcn("fsdp"))
  dcn_sequence: int = key(1, _dcn("sequence"))
  dcn_tensor: int = key(1, _dcn("tensor"))

  def requested_shape(self) -> dict[str, int]:
    """Axis sizes within a slice (ICI); one may be -1."""
    return {name: getattr(self, name) for name in MESH_AXES}

  def dcn_shape(self) -> dict[str, int]:
    """Axis sizes across slices or hosts (DCN); all 1 for a single slice."""
    return {name: getattr(self, f"dcn_{name}") for name in MESH_AXES}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  """A whole run: the seed and one section per dataclass (what `launch.run.config.validate` returns)."""
  seed: int = key(0, "seeds parameter init, data order and sampling")
  model: ModelConfig
  data: DataConfig
  train: TrainConfig
  checkpoint: CheckpointConfig
  mesh: MeshConfig
  distill: DistillConfig
  prune: PruneConfig

  def to_dict(self) -> dict[str, Any]:
    """Returns the config as nested plain dicts (what checkpoints store)."""
    return dataclasses.asdict(self)
