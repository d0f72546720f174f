"""How far the pod sweeps' step-time estimate is from XLA's estimate of the same step without a loop.

  python -m launch.reproduce.tpu_estimate --config configs/llama_1b.py --topology v5p:2x2x1 \
      --config.model.num_layers=8 --config.data.seq_len=2048 --config.train.global_batch_size=8 \
      --config.mesh.data=1 --config.mesh.fsdp=4 --config.mesh.tensor=1 --config.mesh.rules=fsdp \
      --out docs/results/pod_sweep

`cost_analysis()` prices a while loop's body once, so launch/measure/aot.py extrapolates the layer
scan from two compiles (1 and 2 layers per iteration). Here the same step is also compiled with
every layer unrolled (no loop, nothing to extrapolate) for each remat policy, and the table sets
the two side by side: XLA's FLOP count and its step-time estimate, each with the splash kernels
(which XLA prices at nothing) added as the pod sweeps add them. Needs the `tpu` extra; compiles
three times per policy (about 2-4 min each on the 2-core CPU host for the shape above); nothing runs.
Writes <out>/estimate_check.md and .csv.
"""

import dataclasses
import shlex
import sys

from absl import flags

from launch.measure.aot import compile_programs
from launch.measure.step_estimate import attention_kernel_flops, attention_kernel_seconds, over_layers
from launch.measure.tables import write_table
from launch.run import cli
from launch.run.plan import make_plan
from launch.run.topology import topology_devices
from sharding.remat import remat_wrapper

flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology to compile for.")
flags.DEFINE_list("remats", ["none", "full"], "Remat policies to compare.")
flags.DEFINE_string("out", "docs/results/pod_sweep", "Directory for estimate_check.{md,csv}.")
FLAGS = flags.FLAGS


def compile_with_unroll(cfg, devices, remat: str, unroll: int):
  """(plan, train report) for `cfg` with model.remat and model.scan_unroll set."""
  model = dataclasses.replace(cfg.model, remat=remat, scan_unroll=unroll)
  plan = make_plan(dataclasses.replace(cfg, model=model), devices, platform="tpu")
  return plan, compile_programs(plan, ("train",), check_fit=False)[0]


def compare(cfg, devices, remat: str) -> dict:
  """One row: the extrapolated estimate (1 and 2 layers per iteration) beside the unrolled step's."""
  layers = cfg.model.num_layers
  plan_1, one = compile_with_unroll(cfg, devices, remat, 1)
  _, two = compile_with_unroll(cfg, devices, remat, 2)
  plan_all, whole = compile_with_unroll(cfg, devices, remat, layers)
  extrapolated_s = over_layers(one.estimated_s, two.estimated_s, 1, layers) + attention_kernel_seconds(one, plan_1)
  whole_s = whole.estimated_s + attention_kernel_seconds(whole, plan_all)
  extrapolated_flops = over_layers(one.flops, two.flops, 1, layers) + attention_kernel_flops(one, plan_1)
  whole_flops = whole.flops + attention_kernel_flops(whole, plan_all)
  return {"remat": remat, "layers": layers,
          "unrolled: est. ms": round(whole_s * 1e3, 2), "extrapolated: est. ms": round(extrapolated_s * 1e3, 2),
          "ms ratio": round(extrapolated_s / whole_s, 3),
          "unrolled: TFLOP/chip": round(whole_flops / 1e12, 3),
          "extrapolated: TFLOP/chip": round(extrapolated_flops / 1e12, 3),
          "FLOP ratio": round(extrapolated_flops / whole_flops, 4),
          "compile s (1, 2, all layers/iter)": f"{one.compile_s:.0f}, {two.compile_s:.0f}, {whole.compile_s:.0f}"}


def main(argv):
  del argv
  cli.quiet_logs()
  for remat in FLAGS.remats:
    remat_wrapper(remat)  # an unknown policy is one error line before any compile
  cfg = cli.load_config()
  devices = topology_devices(FLAGS.topology)
  rows = []
  for remat in FLAGS.remats:
    rows.append(compare(cfg, devices, remat))
    print(rows[-1], flush=True)
  m = cfg.model
  notes = (f"{m.num_params() / 1e9:.2f}B-parameter shape ({m.num_layers} layers, d_model {m.d_model}), batch "
           f"{cfg.train.global_batch_size} x {cfg.data.seq_len}, mesh {dict(make_plan(cfg, devices, 'tpu').mesh.shape)} "
           f"on {FLAGS.topology}, compiled by the TPU compiler on a 2-core CPU host; nothing ran. `unrolled`: XLA's "
           "`optimal_seconds` and FLOPs of the step with every layer unrolled; `extrapolated`: the pod sweeps' "
           "method (launch/measure/step_estimate.py `estimated_step_seconds`) from 1 and 2 layers per loop iteration. Both "
           "add the splash kernels at the chip's peak. A ratio above 1: the sweeps' estimate is slower than "
           "XLA's own estimate of the unrolled step.")
  command = "python -m launch.reproduce.tpu_estimate " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  print(write_table(rows, FLAGS.out, "estimate_check", "The layer-loop extrapolation beside the unrolled step",
                    command, notes))


if __name__ == "__main__":
  cli.run(main)
