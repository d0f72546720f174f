"""Where every parameter lives under a config's mesh and rules: a table, and a drawing of the splits."""

import jax

from launch.run.plan import RunPlan
from launch.run.step import batch_sharding
from launch.storage import paths


def layout_rows(plan: RunPlan) -> list[tuple[str, tuple, tuple, str, tuple]]:
  """Returns (path, shape, logical names, PartitionSpec, per-device shape) for every parameter."""
  rows = []
  names = jax.tree_util.tree_leaves_with_path(plan.mdef.logical_names, is_leaf=lambda x: isinstance(x, tuple))
  for (path, logical), abstract, sharding in zip(names, jax.tree.leaves(plan.mdef.abstract_params),
                                                 jax.tree.leaves(plan.shardings.params)):
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


def draw(plan: RunPlan, title: str, path: str) -> None:
  """Draws the MLP up-projection weight of layer 0 and the token batch, blocks labelled by device."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle

  cfg = plan.cfg
  weight = plan.shardings.params["blocks"]["mlp"]["up"]["kernel"]
  w_shape = (cfg.model.num_layers, cfg.model.d_model, cfg.model.mlp_dim)
  batch_shape = (cfg.train.global_batch_size, cfg.data.seq_len)
  panels = [("MLP weight [embed, mlp] (layer 0)", block_owners(weight, w_shape), w_shape[1:], 1),
            ("token batch [batch, length]", block_owners(batch_sharding(plan.mesh, plan.rules), batch_shape),
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
  paths.save_figure(fig, path, dpi=110)
  plt.close(fig)


def draw_pipeline_timeline(pipe, num_layers: int, path: str) -> None:
  """Draws which micro-batch each stage runs at every iteration of the forward pass (a Gantt chart),
  with the layers each stage holds; `pipe` is a sharding.pipeline.Pipeline. Bubble cells are grey."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle

  from sharding.pipeline import stage_of_layer

  m, p = pipe.microbatches, pipe.stages
  fig, ax = plt.subplots(figsize=(max(6, pipe.iterations * 0.45), 1 + 0.5 * p))
  cmap = plt.get_cmap("tab10")
  for t in range(pipe.iterations):
    for s in range(p):
      entered = t - s  # the iteration this micro-batch entered stage 0
      rounds = m * (pipe.repeats if pipe.schedule == "circular" else 1)
      busy = 0 <= entered < rounds
      micro, repeat = entered % m, entered // m
      ax.add_patch(Rectangle((t, p - 1 - s), 1, 1, facecolor=cmap(micro % 10) if busy else "0.9",
                             alpha=0.2 + 0.6 / (1 + repeat) if busy else 1, edgecolor="white"))
      if busy:
        ax.text(t + 0.5, p - 0.5 - s, f"{micro}" + (f"/{repeat}" if pipe.schedule == "circular" else ""),
                ha="center", va="center", fontsize=7)
  holds = {s: [l for l in range(num_layers) if stage_of_layer(pipe, l, num_layers) == s] for s in range(p)}
  ax.set_yticks([p - 0.5 - s for s in range(p)])
  ax.set_yticklabels([f"stage {s}: layers {','.join(map(str, holds[s]))}" for s in range(p)], fontsize=7)
  ax.set_xlim(0, pipe.iterations)
  ax.set_ylim(0, p)
  ax.set_xlabel("iteration (forward); cell: micro-batch" + ("/round" if pipe.schedule == "circular" else ""))
  ax.set_title(f"{pipe.schedule}: {p} stages, {m} micro-batches, bubble {pipe.bubble:.0%}", fontsize=9)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=110)
  plt.close(fig)
