"""The typed `distill.*` and `prune.*` config sections and their checks, beside the code that reads them.

Each field declares one key (configs/keys.py): configs/base.py derives the defaults from these
declarations, and launch/run/config.py checks them and calls `compression_errors` with the rest of
its checks.
"""

import dataclasses

from configs.keys import key

# prune.method: none, unstructured magnitude, n of every m weights along the input (compress/prune.py),
# or structured (a smaller model: compress/structured.py).
PRUNE_METHODS = ("none", "magnitude", "n_m", "structured")
# The prune.* keys that give a structured pruning's target shape (0 keeps the model's).
STRUCTURED_TARGET_KEYS = ("num_layers", "d_model", "num_heads", "num_kv_heads", "mlp_dim")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Knowledge distillation (python -m launch.distill)."""
  teacher_checkpoint: str = key("", 'the teacher run\'s <workdir>/checkpoints ("": no distillation)')
  alpha: float = key(0.5, "weight of T^2 * KL(teacher || student); 1 - alpha weighs the CE")
  temperature: float = key(2.0, "T > 0 softens both distributions")
  hidden_weight: float = key(0.0, "MSE on final hidden states (same d_model only); 0 disables")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """Magnitude, N:M or structured pruning (python -m launch.prune)."""
  method: str = key("none", "magnitude: unstructured; n_m: n of every m along the input; structured: "
                    "remove layers/heads/neurons/channels (a smaller model)", choices=PRUNE_METHODS)
  sparsity: float = key(0.5, "final fraction of zeros in each kernel (magnitude only)")
  n: int = key(2, "n_m: weights kept in every group of m")
  m: int = key(4, "n_m: the group size")
  init_checkpoint: str = key("", 'start from this run\'s checkpoint ("": fresh init)')
  start_step: int = key(0, "optimizer update where sparsity starts rising (cubic schedule)")
  end_step: int = key(0, "update where it reaches its target (0 with start 0: one shot)")
  frequency: int = key(10, "updates between mask recomputations")
  # structured pruning's target shape (0: keep the model's; heads go with their KV head) and its
  # calibration (compress/structured.py)
  num_layers: int = key(0, "structured: layers kept (those whose removal raises calibration loss most)")
  d_model: int = key(0, "structured: embedding channels kept")
  num_heads: int = key(0, "structured: query heads kept (0 with num_kv_heads set: keep the group ratio)")
  num_kv_heads: int = key(0, "structured: KV heads (query groups) kept")
  mlp_dim: int = key(0, "structured: MLP neurons kept per layer")
  calibration_batches: int = key(8, "structured: training batches whose activations rank what is kept")


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
