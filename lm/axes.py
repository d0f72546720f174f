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


PerShardFn = Callable[..., Callable]
_per_shard: contextvars.ContextVar[PerShardFn | None] = contextvars.ContextVar(
    "lm_per_shard", default=None)


def per_shard(fn: Callable, in_names: Sequence[LogicalNames], out_names: LogicalNames) -> Callable:
  """Returns `fn` run on each device's block of its inputs (a kernel GSPMD cannot partition).

  `in_names` holds one logical-name tuple per positional argument, `out_names` one for the result;
  a None name keeps that dimension whole on every device. Without sharding rules installed
  (`use_per_shard`), `fn` itself is returned: one device sees everything.
  """
  wrap = _per_shard.get()
  return fn if wrap is None else wrap(fn, tuple(in_names), out_names)


@contextlib.contextmanager
def use_per_shard(wrap: PerShardFn | None):
  """Within this context (while tracing), `per_shard(fn, in_names, out_names)` calls `wrap(...)`."""
  token = _per_shard.set(wrap)
  try:
    yield
  finally:
    _per_shard.reset(token)
