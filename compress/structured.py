"""Structured pruning (Minitron, Muralidharan et al. 2024): remove whole layers, attention groups, MLP
neurons and embedding channels, ranked by their activations on calibration batches.

The result is a genuinely smaller model of the same architecture (uniform shapes: every layer keeps
the same number of neurons and heads, so `lm/` needs no per-layer widths):

- **Layers** (depth): the calibration loss of the model with layer i removed; the layers whose
  removal costs the least go first (Minitron's perplexity-based depth ranking), one shot.
- **MLP neurons**: mean over calibration tokens of |silu(gate(x)) * up(x)| per neuron, per layer.
- **Attention groups**: a KV head and the num_heads / num_kv_heads query heads that read it go
  together (grouped-query attention keeps its ratio); a group's importance is the sum over its query
  heads of the mean over tokens of the L2 norm of the head's attention output, per layer.
- **Embedding channels** (d_model): mean over tokens of |RMSNorm output| per channel, summed over
  every norm in the model; one set of channels for the whole residual stream. Every norm's scale is
  multiplied by sqrt(D / D') so that RMS statistics computed over fewer channels keep their scale
  (exact when the removed channels carry zeros, up to norm_eps).

Depth is pruned first, then width is ranked on the shallower model. Parameters are sliced on the
host by their logical axis names (`layers`, `mlp`, `heads`, `kv_heads`, `embed`), so the same code
cuts every kernel, norm and the embedding table whatever its layout.
"""

import dataclasses
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from compress.config import STRUCTURED_TARGET_KEYS
from launch.run import programs
from launch.run import state as ts
from lm import layers
from lm.config import ModelConfig
from lm.loss import cross_entropy
from lm.model_def import define
from lm.transformer import Block, rotary_inputs

Params = dict[str, Any]
Batch = dict[str, np.ndarray]  # {"inputs": int [B, L], "targets": int [B, L]}

nnx.use_eager_sharding(False)

TARGET_KEYS = STRUCTURED_TARGET_KEYS  # the prune.* keys of the pruned model's shape


def target_config(model: ModelConfig, prune_cfg) -> ModelConfig:
  """The pruned model's config from `model` and prune.{num_layers, d_model, num_heads, num_kv_heads,
  mlp_dim} (0 keeps the model's value; one of the two head counts may be 0 to derive it from the
  other at the model's num_heads / num_kv_heads ratio). Raises ValueError naming the key and the fix.
  """
  ratio = model.num_heads // model.num_kv_heads
  want = {k: getattr(prune_cfg, k) for k in TARGET_KEYS}
  if want["num_heads"] and not want["num_kv_heads"]:
    if want["num_heads"] % ratio:
      raise ValueError(f"prune.num_heads={want['num_heads']} is not a multiple of the model's "
                       f"num_heads / num_kv_heads = {ratio}: query heads are pruned with their KV head; "
                       f"pick a multiple of {ratio}.")
    want["num_kv_heads"] = want["num_heads"] // ratio
  elif want["num_kv_heads"] and not want["num_heads"]:
    want["num_heads"] = want["num_kv_heads"] * ratio
  new = {k: v if v else getattr(model, k) for k, v in want.items()}
  for k, v in new.items():
    if v > getattr(model, k):
      raise ValueError(f"prune.{k}={v} is larger than the model's {getattr(model, k)}; structured "
                       f"pruning only removes (set --config.prune.{k} <= {getattr(model, k)}, 0 keeps it).")
  if new["num_heads"] != new["num_kv_heads"] * ratio:
    raise ValueError(f"prune.num_heads={new['num_heads']} with prune.num_kv_heads={new['num_kv_heads']} "
                     f"changes the model's {ratio} query heads per KV head; whole groups are pruned, so "
                     f"set prune.num_heads = {ratio} x prune.num_kv_heads (or leave one of them 0).")
  if new == {k: getattr(model, k) for k in TARGET_KEYS}:
    raise ValueError("prune.method='structured' with no smaller target shape; set at least one of "
                     + ", ".join(f"--config.prune.{k}" for k in TARGET_KEYS) + ".")
  unroll = model.scan_unroll if new["num_layers"] % model.scan_unroll == 0 else 1
  return dataclasses.replace(model, **new, scan_unroll=unroll)


def logical_names(cfg: ModelConfig) -> Params:
  """The parameters' logical axis names (a tree of tuples), from the model's own annotations."""
  return define(cfg).logical_names


def slice_params(params: Params, names: Params, keep: dict[str, np.ndarray]) -> Params:
  """Keeps, along every axis whose logical name is in `keep`, the given indices (host NumPy).

  keep[name] is int [k] (the same indices everywhere) or int [layers, k] (per layer; only for
  parameters whose axis 0 is `layers`). Returns a tree of NumPy arrays.
  """
  def cut(x, axis_names):
    x = np.asarray(x)
    for axis, name in enumerate(axis_names):
      if name not in keep:
        continue
      idx = np.asarray(keep[name])
      if idx.ndim == 1:
        x = np.take(x, idx, axis=axis)
      else:
        if axis_names[0] != "layers":
          raise ValueError(f"per-layer indices for axis {name!r} of a parameter without a layers axis")
        shape = [idx.shape[0]] + [1] * (x.ndim - 1)
        shape[axis] = idx.shape[1]
        x = np.take_along_axis(x, idx.reshape(shape), axis=axis)
    return x
  return jax.tree.map(cut, params, names, is_leaf=lambda n: isinstance(n, tuple))


def top_k(importance: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k largest entries along the last axis, in ascending index order (ties: lower index)."""
  order = np.argsort(-np.asarray(importance, np.float64), axis=-1, kind="stable")[..., :k]
  return np.sort(order, axis=-1)


def _attention_heads(block: Block, x_BxLxD, sin, cos) -> jax.Array:
  """The per-head attention output [B, L, N, K] of `block` (before the output projection)."""
  attn = block.attention
  q = layers.apply_rotary(attn.query(x_BxLxD), sin, cos)
  k = layers.apply_rotary(attn.key(x_BxLxD), sin, cos)
  return jax.nn.dot_product_attention(q, k, attn.value(x_BxLxD), is_causal=True)


def make_width_stats(plan, cfg: ModelConfig):
  """The calibration program `fn(params, tokens_BxL) -> stats` of `cfg`'s model on the run plan's
  devices (launch/run/programs.forward; kernels planned for it by `plan.attention_for`).

  stats: {"mlp": [layers, F] sum over tokens of |h|, "heads": [layers, N] sum over tokens of each
  head's output L2 norm, "embed": [D] sum over tokens and norms of |norm output|, "hidden": the
  final hidden states [B, L, D] (to check this forward against the model's), "tokens": count}.
  """
  attention = plan.attention_for(cfg)
  mdef = ts.model_def(cfg, None, attention)
  # One Block's graphdef (the serving layout's first layer), to run each layer's slice through.
  block_def = nnx.split(ts.model_def(cfg, None, attention, per_layer=True).abstract.layers[0])[0]

  def stats(mdef, params, tokens_BxL):
    model = mdef.bind(params)
    batch, length = tokens_BxL.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    sin, cos = rotary_inputs(cfg, positions)  # the model's own tables (rope scaling included)
    x = model.embed(tokens_BxL)
    abs_sum = lambda a: jnp.sum(jnp.abs(a.astype(jnp.float32)), axis=tuple(range(a.ndim - 1)))
    embed_D, mlp, heads = jnp.zeros((cfg.d_model,), jnp.float32), [], []
    for i in range(cfg.num_layers):
      block = nnx.merge(block_def, jax.tree.map(lambda a: a[i], params["blocks"]))
      h = block.attention_norm(x)
      embed_D += abs_sum(h)
      out_BxLxNxK = _attention_heads(block, h, sin, cos)
      heads.append(jnp.sum(jnp.linalg.norm(out_BxLxNxK.astype(jnp.float32), axis=-1), axis=(0, 1)))
      x = x + block.attention.out(out_BxLxNxK)
      h = block.mlp_norm(x)
      embed_D += abs_sum(h)
      hidden_BxLxF = jax.nn.silu(block.mlp.gate(h)) * block.mlp.up(h)
      mlp.append(abs_sum(hidden_BxLxF))
      x = x + block.mlp.down(hidden_BxLxF)
    final = model.final_norm(x)
    embed_D += abs_sum(final)
    return {"mlp": jnp.stack(mlp), "heads": jnp.stack(heads), "embed": embed_D, "hidden": final,
            "tokens": jnp.float32(batch * length)}

  return programs.forward(plan, stats, mdef)


def width_importance(plan, cfg: ModelConfig, params: Params, batches: Iterable[Batch]) -> dict[str, np.ndarray]:
  """Mean activation importance of `cfg`'s model over `batches`, on `plan`'s devices: {"mlp": [layers,
  F], "groups": [layers, G] (a KV head with its query heads), "embed": [D]}. Raises ValueError for
  zero batches."""
  fn, total = make_width_stats(plan, cfg), None
  for batch in batches:
    s = fn(params, jnp.asarray(batch["inputs"], jnp.int32))
    s = {k: np.asarray(v, np.float64) for k, v in s.items() if k != "hidden"}
    total = s if total is None else {k: total[k] + s[k] for k in total}
  if total is None:
    raise ValueError("structured pruning got zero calibration batches; set prune.calibration_batches >= 1.")
  ratio = cfg.num_heads // cfg.num_kv_heads
  heads = total["heads"] / total["tokens"]
  return {"mlp": total["mlp"] / total["tokens"],
          "groups": heads.reshape(cfg.num_layers, cfg.num_kv_heads, ratio).sum(-1),
          "embed": total["embed"] / total["tokens"]}


def _mean_loss(mdef, params, inputs_BxL, targets_BxL):
  loss_sum, tokens = cross_entropy(mdef.bind(params)(inputs_BxL), targets_BxL)
  return loss_sum / tokens


def loss_program(plan, cfg: ModelConfig):
  """The calibration loss program `fn(params, inputs_BxL, targets_BxL) -> mean cross-entropy` of
  `cfg`'s model on `plan`'s devices."""
  return programs.forward(plan, _mean_loss, ts.model_def(cfg, None, plan.attention_for(cfg)))


def calibration_loss(program, params: Params, batches: list[Batch]) -> float:
  """Mean next-token cross-entropy over `batches` of the model `program` (`loss_program`) runs."""
  return float(np.mean([program(params, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"])) for b in batches]))


def layer_importance(plan, cfg: ModelConfig, params: Params, batches: list[Batch]) -> np.ndarray:
  """[layers]: calibration loss with layer i removed minus the full model's (higher: more needed),
  on `plan`'s devices."""
  names = logical_names(cfg)
  full = calibration_loss(loss_program(plan, cfg), params, batches)
  if cfg.num_layers == 1:
    return np.array([np.inf])
  shallower = dataclasses.replace(cfg, num_layers=cfg.num_layers - 1, scan_unroll=1)
  program, losses = loss_program(plan, shallower), []  # one compile for every layer removed
  for i in range(cfg.num_layers):
    kept = np.array([j for j in range(cfg.num_layers) if j != i])
    losses.append(calibration_loss(program, slice_params(params, names, {"layers": kept}), batches))
  return np.array(losses) - full


def group_head_indices(groups_LxG: np.ndarray, ratio: int) -> np.ndarray:
  """Query-head indices [layers, G' * ratio] of kept KV groups [layers, G'] (head n reads KV head n // ratio)."""
  return (groups_LxG[..., None] * ratio + np.arange(ratio)).reshape(groups_LxG.shape[0], -1)


def prune_params(plan, params: Params, batches: list[Batch], target: ModelConfig) -> tuple[Params, dict]:
  """Prunes `params` of the plan's model (`plan.cfg.model`) to `target`'s shapes (from `target_config`),
  its calibration forwards run on the plan's devices with kernels the plan chose.

  Takes host or device params and calibration batches; returns (NumPy params shaped for `target`,
  a report {"layers_kept", "layer_importance", "importance": min/max per kind, "kept": the indices
  kept along each axis, per kept layer}).
  """
  if not batches:
    raise ValueError("structured pruning got zero calibration batches; set prune.calibration_batches >= 1.")
  cfg = plan.cfg.model
  params = jax.tree.map(np.asarray, jax.device_get(params))
  report = {"layers_kept": list(range(cfg.num_layers))}
  if target.num_layers < cfg.num_layers:
    scores = layer_importance(plan, cfg, params, batches)
    kept = top_k(scores, target.num_layers)
    params = slice_params(params, logical_names(cfg), {"layers": kept})
    cfg = dataclasses.replace(cfg, num_layers=target.num_layers, scan_unroll=target.scan_unroll)
    report.update(layers_kept=[int(i) for i in kept], layer_importance=[float(s) for s in scores])
  imp = width_importance(plan, cfg, params, batches)
  ratio = cfg.num_heads // cfg.num_kv_heads
  groups = top_k(imp["groups"], target.num_kv_heads)
  keep = {"mlp": top_k(imp["mlp"], target.mlp_dim), "kv_heads": groups,
          "heads": group_head_indices(groups, ratio), "embed": top_k(imp["embed"], target.d_model)}
  params = slice_params(params, logical_names(cfg), keep)
  if target.d_model < cfg.d_model:
    # RMSNorm divides by the mean square over the channels it sees: with D' of D channels left, the
    # scale sqrt(D / D') keeps the normalized values where they were when the removed ones were ~0.
    fix = np.float32(np.sqrt(cfg.d_model / target.d_model))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (x * fix).astype(x.dtype) if getattr(path[-1], "key", None) == "scale" else x,
        params)
  report["importance"] = {k: {"min": float(v.min()), "max": float(v.max())} for k, v in imp.items()}
  report["kept"] = {k: v.tolist() for k, v in keep.items()}
  return params, report
