"""The typed `distill.*` and `prune.*` config sections and their checks, beside the code that reads them.

The defaults and the meaning of every key are written once, in configs/base.py; launch/run/config.py
builds these sections from it and calls `compression_errors` with the rest of its checks.
"""

import dataclasses

# prune.method: none, unstructured magnitude, n of every m weights along the input (compress/prune.py),
# or structured (a smaller model: compress/structured.py).
PRUNE_METHODS = ("none", "magnitude", "n_m", "structured")
# The prune.* keys that give a structured pruning's target shape (0 keeps the model's).
STRUCTURED_TARGET_KEYS = ("num_layers", "d_model", "num_heads", "num_kv_heads", "mlp_dim")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  teacher_checkpoint: str
  alpha: float
  temperature: float
  hidden_weight: float


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  method: str
  sparsity: float
  n: int
  m: int
  init_checkpoint: str
  start_step: int
  end_step: int
  frequency: int
  # structured pruning's target shape (0: keep) and calibration (compress/structured.py)
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  calibration_batches: int


def compression_errors(kd: DistillConfig, p: PruneConfig, train_steps: int,
                       train_init_checkpoint: str) -> list[str]:
  """Messages for impossible distill.* and prune.* values (docs/compression.md); [] when all is well.

  `train_steps` / `train_init_checkpoint`: the run's train.steps and train.init_checkpoint, which a
  pruning schedule and prune.init_checkpoint are checked against.
  """
  errors = []
  if kd.temperature <= 0:
    errors.append(f"distill.temperature={kd.temperature}: must be > 0 (1 is the plain softmax; "
                  "2 to 4 is usual).")
  if not 0 <= kd.alpha <= 1:
    errors.append(f"distill.alpha={kd.alpha}: must be in [0, 1] (1: only the teacher, 0: only the tokens).")
  if kd.hidden_weight < 0:
    errors.append(f"distill.hidden_weight={kd.hidden_weight}: must be >= 0 (0 disables it).")
  if p.method not in PRUNE_METHODS:
    errors.append(f"prune.method={p.method!r}: choose one of {list(PRUNE_METHODS)}.")
  if not 0 <= p.sparsity < 1:
    errors.append(f"prune.sparsity={p.sparsity}: must be in [0, 1), e.g. 0.5 for half the weights zero.")
  if not (p.m >= 2 and 0 < p.n < p.m):
    errors.append(f"prune.n={p.n}, prune.m={p.m}: need 0 < n < m (2 and 4 for 2:4 sparsity).")
  if p.frequency < 1 or not 0 <= p.start_step <= p.end_step:
    errors.append(f"prune.start_step={p.start_step}, prune.end_step={p.end_step}, prune.frequency="
                  f"{p.frequency}: need 0 <= start_step <= end_step and frequency >= 1.")
  if p.init_checkpoint and train_init_checkpoint:
    errors.append(f"prune.init_checkpoint={p.init_checkpoint!r} and train.init_checkpoint="
                  f"{train_init_checkpoint!r} both name a starting point; set only one.")
  for key in STRUCTURED_TARGET_KEYS:
    if getattr(p, key) < 0:
      errors.append(f"prune.{key}={getattr(p, key)}: must be >= 0 (0 keeps the model's value).")
  if p.calibration_batches < 1:
    errors.append(f"prune.calibration_batches={p.calibration_batches}: must be >= 1 (8 is plenty).")
  if p.method not in ("none", "structured") and p.end_step >= train_steps:
    errors.append(f"prune.end_step={p.end_step} is not before train.steps={train_steps}: the "
                  "sparsity would never reach its target; lower end_step or raise train.steps.")
  return errors
