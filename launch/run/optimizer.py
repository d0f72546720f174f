"""AdamW with linear warmup, cosine decay and global-norm clipping, as one optax transformation.

Each function takes the run's `train` section (launch.run.config.TrainConfig).
"""

import jax
import optax


def learning_rate_schedule(t) -> optax.Schedule:
  """Returns step -> learning rate: linear warmup to t.learning_rate, cosine decay to min_lr_ratio of it."""
  warmup = min(t.warmup_steps, max(t.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=warmup,
      decay_steps=max(t.steps, warmup + 1), end_value=t.learning_rate * t.min_lr_ratio)


def _decay_mask(params):
  """Weight decay on matmul kernels and the embedding, not on norm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in ("kernel", "table"), params)


def make_optimizer(t) -> optax.GradientTransformation:
  """Returns clip-by-global-norm (if t.clip_grad_norm > 0) followed by AdamW."""
  adamw = optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                      weight_decay=t.weight_decay, mask=_decay_mask)
  if t.clip_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(t.clip_grad_norm), adamw)
  return adamw
