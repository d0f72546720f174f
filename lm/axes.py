"""Logical axis names for activations, and the one hook through which sharding rules reach them.

The model only *names* axes (`batch`, `length`, `embed`, `heads`, `kv_heads`, `kv`, `mlp`, `vocab`,
`layers`); `sharding/` decides where each name lives on a mesh by installing a constraint function
with `use_constraint`. Without one installed, `constrain` is the identity, so the model runs
unchanged on one device and in tests.
"""

import contextlib
import contextvars
from typing import Callable, Sequence

import jax

LogicalNames = Sequence[str | None]
ConstraintFn = Callable[[jax.Array, LogicalNames], jax.Array]

_constraint: contextvars.ContextVar[ConstraintFn | None] = contextvars.ContextVar(
    "lm_activation_constraint", default=None)


def constrain(x: jax.Array, names: LogicalNames) -> jax.Array:
  """Returns `x` tagged with one logical name per dimension (identity when no rules are installed)."""
  if len(names) != x.ndim:
    raise ValueError(f"{len(names)} logical names {tuple(names)} for an array of shape {x.shape}.")
  fn = _constraint.get()
  return x if fn is None else fn(x, names)


@contextlib.contextmanager
def use_constraint(fn: ConstraintFn | None):
  """Within this context (while tracing), `constrain(x, names)` calls `fn(x, names)`."""
  token = _constraint.set(fn)
  try:
    yield
  finally:
    _constraint.reset(token)
