"""Logical axis names for activations, and the one hook through which sharding rules reach them.

The model only *names* axes (`batch`, `length`, `embed`, `heads`, `kv_heads`, `kv`, `mlp`, `vocab`,
`layers`); `sharding/` decides where each name lives on a mesh by installing a constraint function
with `use_constraint`. Without one installed, `constrain` is the identity, so the model runs
unchanged on one device and in tests. Two more hooks work the same way: `per_shard` (a kernel run on
each device's block) and `sequence_attention` (attention across a sequence split over devices).

These hooks carry *functions*, never decisions: how to reach the mesh (the rule table's constraint,
a shard_map by logical names, a shard_map over the sequence axis), built from the run plan's mesh and
rules and installed by the program builders (`launch.run.programs.Program`). What a kernel, a
sequence strategy or a layout is, the model reads from its own attention plan and passes in. Nothing
here has a default that could disagree with the config: with nothing installed, the model runs
unsharded (and a model whose plan splits the sequence refuses to).
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


# Attention of a sequence split over devices (mesh.sequence > 1): (q [B, L, N, K], k, v [B, L, G, K],
# positions [B, L], segment ids [B, L] or None, *, strategy, block_kernel, layout, interpret,
# recompute) -> [B, L, N, K], the keyword arguments the calling model's attention plan. Each token's
# position orders it (the causal mask), because the step may have reordered the sequence.
SequenceAttentionFn = Callable[..., jax.Array]
_sequence_attention: contextvars.ContextVar[SequenceAttentionFn | None] = contextvars.ContextVar(
    "lm_sequence_attention", default=None)


def sequence_attention() -> SequenceAttentionFn | None:
  """The installed attention across sequence shards, or None (the sequence is whole on each device).

  Called as fn(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, positions_BxL, segment_ids_BxL, strategy=...,
  block_kernel=..., layout=..., interpret=..., recompute=...) with the model's own attention plan,
  and returns out_BxLxNxK, causal by position and within one segment.
  """
  return _sequence_attention.get()


@contextlib.contextmanager
def use_sequence_attention(fn: SequenceAttentionFn | None):
  """Within this context (while tracing), full-sequence attention runs through `fn`."""
  token = _sequence_attention.set(fn)
  try:
    yield
  finally:
    _sequence_attention.reset(token)
