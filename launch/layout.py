"""Show where every parameter lives: logical names, PartitionSpec and per-device shape, for a config.

  python -m launch.layout --config configs/demo.py --config.mesh.rules=fsdp_tp \
      --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2 [--png docs/results/layout.png]

Runs on 8 simulated CPU devices unless accelerators are present. With --png, draws how one MLP weight
[embed, mlp] and one batch [batch, length] are split, each block labelled with the devices that hold
it (read from the real NamedShardings).
"""

import math
import os

if __name__ == "__main__":
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import app, flags  # noqa: E402
import jax  # noqa: E402

from launch.cli import load_config, quiet_logs  # noqa: E402
from launch.context import RunContext, build_context  # noqa: E402
from launch.step import batch_sharding  # noqa: E402

flags.DEFINE_string("png", None, "Also draw the weight and batch split into this PNG.")
FLAGS = flags.FLAGS


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


def main(argv):
  del argv
  quiet_logs()
  cfg = load_config()
  ctx = build_context(cfg)
  print(f"mesh {dict(ctx.mesh.shape)} | rules {cfg.mesh.custom_rules or cfg.mesh.rules}")
  print("| parameter | shape | logical names | PartitionSpec | per device |\n|---|---|---|---|---|")
  per_device = 0
  for path, shape, logical, spec, local in layout_rows(ctx):
    print(f"| {path} | {shape} | {logical} | {spec} | {local} |")
    per_device += math.prod(local)
  print(f"\n{per_device / 1e6:.2f}M of {cfg.model.num_params() / 1e6:.2f}M parameters per device")
  if FLAGS.png:
    draw(ctx, f"rules={cfg.mesh.rules}  mesh {dict(ctx.mesh.shape)}", FLAGS.png)
    print(f"wrote {FLAGS.png}")


if __name__ == "__main__":
  app.run(main)
