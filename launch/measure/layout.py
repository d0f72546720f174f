"""Where every parameter lives under a config's mesh and rules: a table, and a drawing of the splits."""

import os

import jax

from launch.run.context import RunContext
from launch.run.step import batch_sharding


def layout_rows(ctx: RunContext) -> list[tuple[str, tuple, tuple, str, tuple]]:
  """Returns (path, shape, logical names, PartitionSpec, per-device shape) for every parameter."""
  rows = []
  names = jax.tree_util.tree_leaves_with_path(ctx.mdef.logical_names, is_leaf=lambda x: isinstance(x, tuple))
  for (path, logical), abstract, sharding in zip(names, jax.tree.leaves(ctx.mdef.abstract_params),
                                                 jax.tree.leaves(ctx.shardings.params)):
    rows.append((jax.tree_util.keystr(path), abstract.shape, logical, str(sharding.spec),
                 sharding.shard_shape(abstract.shape)))
  return rows


def block_owners(sharding, shape) -> dict[tuple, list[int]]:
  """Maps each distinct block (tuple of (start, stop) per dim) to the ids of the devices holding it."""
  owners: dict[tuple, list[int]] = {}
  for device, index in sharding.devices_indices_map(shape).items():
    key = tuple((s.start or 0, s.stop if s.stop is not None else n) for s, n in zip(index, shape))
    owners.setdefault(key, []).append(device.id)
  return owners


def draw(ctx: RunContext, title: str, path: str) -> None:
  """Draws the MLP up-projection weight of layer 0 and the token batch, blocks labelled by device."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle

  cfg = ctx.cfg
  weight = ctx.shardings.params["blocks"]["mlp"]["up"]["kernel"]
  w_shape = (cfg.model.num_layers, cfg.model.d_model, cfg.model.mlp_dim)
  batch_shape = (cfg.train.global_batch_size, cfg.data.seq_len)
  panels = [("MLP weight [embed, mlp] (layer 0)", block_owners(weight, w_shape), w_shape[1:], 1),
            ("token batch [batch, length]", block_owners(batch_sharding(ctx.mesh, ctx.rules), batch_shape),
             batch_shape, 0)]
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
  cmap = plt.get_cmap("tab10")
  for ax, (label, owners, shape, offset) in zip(axes, panels):
    for i, (block, ids) in enumerate(sorted(owners.items())):
      (r0, r1), (c0, c1) = block[offset:offset + 2]
      ax.add_patch(Rectangle((c0, shape[0] - r1), c1 - c0, r1 - r0, facecolor=cmap(i % 10), alpha=0.45,
                             edgecolor="black"))
      ax.text((c0 + c1) / 2, shape[0] - (r0 + r1) / 2, "dev " + ",".join(map(str, sorted(ids))),
              ha="center", va="center", fontsize=7)
    ax.set_xlim(0, shape[1])
    ax.set_ylim(0, shape[0])
    ax.set_title(label, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
