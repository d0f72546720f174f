"""Show where every parameter lives: logical names, PartitionSpec and per-device shape, for a config.

  python -m launch.layout --config configs/demo.py --config.mesh.rules=fsdp_tp \
      --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2 [--png docs/results/layout.png]

Runs on --devices (8) simulated CPU devices unless accelerators are present. With --png, draws how one MLP weight
[embed, mlp] and one batch [batch, length] are split, each block labelled with the devices that hold
it (read from the real NamedShardings).

  python -m launch.layout --config configs/llama_8b.py --topology v5p:4x4x8   # a TPU slice's 128 chips

With --topology (the `tpu` extra) the plan is made for that TPU slice's devices (launch/run/topology.py),
so the mesh, rules and per-device shapes are the ones a pod run would get.
"""

import math

from absl import flags

from launch.measure.layout import draw, layout_rows
from launch.run import cli
from launch.run.plan import make_plan
from launch.run.devices import simulate_cpu_devices
from launch.run.topology import topology_devices

flags.DEFINE_string("png", None, "Also draw the weight and batch split into this PNG.")
flags.DEFINE_integer("devices", 8, "Simulated CPU devices (CPU only).")
flags.DEFINE_string("topology", None, "Plan for this TPU slice instead, e.g. v5p:4x4x8 (tpu extra).")
flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined over DCN (mesh.dcn_* split them).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_logs()
  if not FLAGS.topology:
    simulate_cpu_devices(FLAGS.devices)  # before the config: validating it may start jax (dtype "auto")
  cfg = cli.load_config()
  if FLAGS.topology:
    plan = make_plan(cfg, topology_devices(FLAGS.topology, FLAGS.num_slices), platform="tpu")
  else:
    plan = make_plan(cfg)
  print(f"mesh {dict(plan.mesh.shape)} | rules {cfg.mesh.custom_rules or cfg.mesh.rules}")
  print("| parameter | shape | logical names | PartitionSpec | per device |\n|---|---|---|---|---|")
  per_device = 0
  for path, shape, logical, spec, local in layout_rows(plan):
    print(f"| {path} | {shape} | {logical} | {spec} | {local} |")
    per_device += math.prod(local)
  print(f"\n{per_device / 1e6:.2f}M of {cfg.model.num_params() / 1e6:.2f}M parameters per device")
  if FLAGS.png:
    draw(plan, f"rules={cfg.mesh.rules}  mesh {dict(plan.mesh.shape)}", FLAGS.png)
    print(f"wrote {FLAGS.png}")


if __name__ == "__main__":
  cli.run(main)
