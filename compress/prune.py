"""Magnitude pruning: unstructured and N:M masks, a cubic schedule, and an optax transformation.

Written here because `jaxpruner` does not install on this stack (see docs/compression.md). Only
matmul kernels are pruned (every `Linear`: attention q/k/v/out, MLP gate/up/down, an untied output
projection); the embedding table and the norm scales are never touched. Masks live in the optimizer
state, so they are sharded like their parameter, checkpointed with it, and restored on --resume.

Kernel layout: a `Linear` kernel is [*lead, *in, *out] with lead = (layers,) for the scanned blocks.
"Per layer" below means per leading index; N:M groups run along the flattened input dimensions.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lm import layers
from lm.config import ModelConfig
from lm.model_def import define, for_shapes

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  """How one parameter is laid out: `lead` stacked dims, then `num_in` input dims, then outputs."""
  prunable: bool
  lead: int = 0
  num_in: int = 0


def kernel_layouts(cfg: ModelConfig, m: int | None = None) -> Params:
  """Returns a tree shaped like the model's parameters with a KernelLayout per leaf.

  With `m`, raises ValueError if a kernel's input size is not a multiple of m (N:M groups).
  """
  mdef = define(for_shapes(cfg))
  num_in = {tuple(path): node.num_in for path, node in nnx.iter_graph(mdef.abstract)
            if isinstance(node, layers.Linear)}
  names, shapes = mdef.logical_names, mdef.abstract_params

  def layout(path, spec, shape):
    keys = tuple(getattr(k, "key", k) for k in path)
    if keys[-1] != "kernel" or keys[:-1] not in num_in:
      return KernelLayout(prunable=False)
    lead = 1 if tuple(spec)[0] == "layers" else 0
    result = KernelLayout(prunable=True, lead=lead, num_in=num_in[keys[:-1]])
    in_size = int(np.prod(shape.shape[lead:lead + result.num_in]))
    if m is not None and in_size % m:
      raise ValueError(f"{'/'.join(map(str, keys))} has input size {in_size}, not a multiple of "
                       f"prune.m={m}; pick an m that divides every kernel's input size (4 usually does).")
    return result

  # Walk the shapes (the names' leaves are tuples, which would be walked into).
  return jax.tree_util.tree_map_with_path(lambda path, shape, spec: layout(path, spec, shape), shapes, names,
                                          is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def schedule_progress(step: jax.Array, start: int, end: int) -> jax.Array:
  """Zhu & Gupta's cubic ramp: 0 before `start`, 1 from `end` on, 1 - (1 - t)^3 in between."""
  t = jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0)
  return jnp.where(step >= end, 1.0, 1.0 - (1.0 - t) ** 3).astype(jnp.float32)


def _ranks(x: jax.Array, axis: int) -> jax.Array:
  """Rank of each entry along `axis` (0 = smallest); ties broken by position, so counts are exact."""
  return jnp.argsort(jnp.argsort(x, axis=axis, stable=True), axis=axis, stable=True)


def magnitude_mask(score: jax.Array, sparsity: jax.Array, layout: KernelLayout) -> jax.Array:
  """Keeps all but the floor(sparsity * n) smallest scores of each layer's kernel; bool, score's shape."""
  slices = int(np.prod(score.shape[:layout.lead]))
  flat_SxN = score.reshape(slices, -1)
  k = jnp.floor(sparsity * flat_SxN.shape[1]).astype(jnp.int32)
  return (_ranks(flat_SxN, axis=1) >= k).reshape(score.shape)


def n_m_mask(score: jax.Array, n: int, m: int, layout: KernelLayout, fraction: jax.Array = 1.0) -> jax.Array:
  """N:M mask: in every group of m consecutive input rows (per output column) keep the n largest.

  `fraction` < 1 constrains only that fraction of each layer's groups, those whose pruning loses the
  least magnitude, so the pattern can be phased in gradually. Returns bool of score's shape.
  """
  shape = score.shape
  slices = int(np.prod(shape[:layout.lead]))
  in_size = int(np.prod(shape[layout.lead:layout.lead + layout.num_in]))
  g_SxGxMxO = score.reshape(slices, in_size // m, m, -1)
  keep_SxGxMxO = _ranks(-g_SxGxMxO, axis=2) < n
  lost_SxGxO = jnp.sum(jnp.where(keep_SxGxMxO, 0.0, g_SxGxMxO), axis=2)
  lost_SxQ = lost_SxGxO.reshape(slices, -1)
  count = jnp.floor(fraction * lost_SxQ.shape[1]).astype(jnp.int32)
  constrained_SxGxO = (_ranks(lost_SxQ, axis=1) < count).reshape(lost_SxGxO.shape)
  return (keep_SxGxMxO | ~constrained_SxGxO[:, :, None, :]).reshape(shape)


def compute_masks(scores: Params, layouts: Params, prune_cfg, progress: jax.Array, old_masks: Params):
  """Masks for every leaf at schedule `progress` in [0, 1]; unprunable leaves keep `old_masks`."""
  def one(score, layout, old):
    if not layout.prunable:
      return old
    if prune_cfg.method == "n_m":
      return n_m_mask(score, prune_cfg.n, prune_cfg.m, layout, progress)
    return magnitude_mask(score, prune_cfg.sparsity * progress, layout)
  return jax.tree.map(one, scores, layouts, old_masks)


class PruneState(NamedTuple):
  count: jax.Array   # int32 scalar: optimizer updates seen
  masks: Params      # bool, shaped like the parameters (True = kept)


def pruning(prune_cfg, layouts: Params) -> optax.GradientTransformation:
  """An optax transformation, chained after the optimizer, that prunes on a schedule.

  At update t (counting from 0) with start <= t <= end and (t - start) % frequency == 0, or t == end,
  masks are recomputed from |params + updates| (pruned weights score 0, so sparsity only grows).
  Every update is then replaced by -params where the mask is False, so pruned weights become and
  stay exactly 0.0 (x + -x == 0 in IEEE arithmetic), whatever Adam or weight decay propose.
  """
  start, end, freq = prune_cfg.start_step, prune_cfg.end_step, prune_cfg.frequency

  def init(params):
    # jax.tree.map, not a per-leaf filter: the mask tree must mirror params so shardings follow them.
    masks = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), jnp.bool_), params)
    return PruneState(count=jnp.zeros([], jnp.int32), masks=masks)

  def update(updates, state, params):
    if params is None:
      raise ValueError("pruning() needs the parameters: call tx.update(grads, state, params).")
    t = state.count
    due = (t >= start) & (t <= end) & (((t - start) % freq == 0) | (t == end))
    scores = jax.tree.map(lambda p, u, mk: jnp.where(mk, jnp.abs(p + u), 0.0),
                          params, updates, state.masks)
    masks = jax.lax.cond(
        due, lambda: compute_masks(scores, layouts, prune_cfg, schedule_progress(t, start, end),
                                   state.masks),
        lambda: state.masks)
    updates = jax.tree.map(lambda u, p, mk: jnp.where(mk, u, -p).astype(u.dtype), updates, params, masks)
    return updates, PruneState(count=t + 1, masks=masks)

  return optax.GradientTransformation(init, update)


def one_shot(params: Params, layouts: Params, prune_cfg) -> tuple[Params, Params]:
  """Prunes `params` to the final sparsity at once (no training); returns (pruned params, masks)."""
  ones = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.bool_), params)
  scores = jax.tree.map(jnp.abs, params)
  masks = compute_masks(scores, layouts, prune_cfg, jnp.float32(1.0), ones)
  return jax.tree.map(lambda p, mk: jnp.where(mk, p, 0).astype(p.dtype), params, masks), masks


def sparsity_report(params: Params, layouts: Params) -> dict[str, float]:
  """Measured fractions of exact zeros (host arrays): per pruned kernel, all pruned kernels, all params.

  Keys: "<path>" per kernel, "pruned_kernels", "all_params", and "pruned_kernel_params" (a count).
  """
  report, zeros, size, all_zeros, all_size = {}, 0, 0, 0, 0
  for (path, p), layout in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(layouts)):
    p = np.asarray(jax.device_get(p))
    z = int(np.sum(p == 0))
    all_zeros, all_size = all_zeros + z, all_size + p.size
    if layout.prunable:
      report["/".join(str(getattr(k, "key", k)) for k in path)] = z / p.size
      zeros, size = zeros + z, size + p.size
  report.update(pruned_kernels=zeros / max(size, 1), all_params=all_zeros / max(all_size, 1),
                pruned_kernel_params=float(size))
  return report


def n_m_violations(params: Params, layouts: Params, n: int, m: int) -> int:
  """Counts groups of m consecutive inputs (per layer, per output) holding more than n non-zeros."""
  bad = 0
  for p, layout in zip(jax.tree.leaves(params), jax.tree.leaves(layouts)):
    if layout.prunable:
      p = np.asarray(jax.device_get(p))
      in_size = int(np.prod(p.shape[layout.lead:layout.lead + layout.num_in]))
      groups = p.reshape(int(np.prod(p.shape[:layout.lead])), in_size // m, m, -1)
      bad += int(np.sum(np.sum(groups != 0, axis=2) > n))
  return bad
