"""Everything a run derives from its Config before compiling: mesh, rules, model definition, optimizer.

All checks that can fail (mesh vs devices, batch vs data axes, rules vs shapes, remat vs backend)
run here, so a bad config stops before any compile or write.
"""

import dataclasses
import math

import jax
import optax
from jax.sharding import Mesh

from launch.run import optimizer as optimizer_lib
from launch.run import state as ts
from launch.run.config import Config, check_against_mesh
from lm import attention as attention_lib
from sharding import mesh as mesh_lib
from sharding import pipeline as pipeline_lib
from sharding import remat as remat_lib
from sharding import rules as rules_lib
from sharding import sequence as sequence_lib


@dataclasses.dataclass(frozen=True)
class RunContext:
  cfg: Config
  mesh: Mesh
  rules: rules_lib.Rules
  mdef: ts.ModelDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  shardings: ts.TrainState   # NamedSharding per leaf of the TrainState
  attention: attention_lib.Selection | None = None  # what model.attention resolved to here, and why

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size


def select_devices(cfg: Config) -> list:
  """The devices the run uses: all, or the first mesh.num_devices."""
  devices = jax.devices()
  if cfg.mesh.num_devices:
    if cfg.mesh.num_devices > len(devices):
      raise ValueError(f"mesh.num_devices={cfg.mesh.num_devices} but only {len(devices)} devices exist.")
    devices = devices[:cfg.mesh.num_devices]
  return devices


@dataclasses.dataclass(frozen=True)
class MeshPlan:
  """The mesh a config asks for on a number of devices: per-axis sizes within a slice and across slices."""
  ici: dict[str, int]      # sizes within a slice or host (fast links)
  dcn: dict[str, int]      # factors across slices or hosts (slow links); all 1 for one slice

  @property
  def shape(self) -> dict[str, int]:
    """The mesh axes' total sizes (ici x dcn)."""
    return {name: self.ici[name] * self.dcn[name] for name in self.ici}


def plan_mesh(cfg: Config, num_devices: int, platform: str,
              compute_capability: str | None = None) -> MeshPlan:
  """Resolves the config's mesh for `num_devices` devices of `platform` ("cpu", "gpu", "tpu"; or
  "cuda" / "rocm" for a GPU's vendor, "gpu" meaning NVIDIA).

  The one pre-compile check of a plan, shared by the run (build_context) and the cluster launcher's
  dry run: DCN factors vs devices, mesh vs device count, batch vs the data axes, remat vs platform,
  data.seq_len vs the sequence axis, and an explicit model.attention kernel vs platform
  (attention_selection).
  Raises ValueError naming what does not fit and how to fix it.
  """
  dcn = cfg.mesh.dcn_shape()
  num_dcn = math.prod(dcn.values())
  if num_devices % num_dcn:
    raise ValueError(f"mesh.dcn_* = {dcn} splits the devices into {num_dcn} slices, which does not "
                     f"divide the {num_devices} devices.")
  plan = MeshPlan(mesh_lib.resolve_mesh_shape(cfg.mesh.requested_shape(), num_devices // num_dcn), dcn)
  check_against_mesh(cfg, plan.shape)
  remat_lib.check_remat_supported(cfg.model.remat, platform)
  pipe = pipeline_for(cfg, plan)
  t = cfg.train
  if pipe is None and t.microbatches != 1:
    raise ValueError(f"train.microbatches={t.microbatches} splits a step for a pipeline, but mesh.stage=1 "
                     "(no pipeline); set --config.mesh.stage to 2 or more, or use train.grad_accum_steps "
                     "to split a step without one.")
  if pipe is not None:
    errors = pipeline_lib.pipeline_errors(pipe, cfg.model.num_layers, t.global_batch_size // t.grad_accum_steps,
                                          plan.shape["data"] * plan.shape["fsdp"])
    if errors:
      raise ValueError("Invalid pipeline:\n  " + "\n  ".join(errors))
  sequence_errors(cfg, plan.shape)
  attention_selection(cfg, platform, compute_capability, plan.shape["sequence"])
  return plan


def sequence_errors(cfg: Config, shape: dict[str, int]) -> None:
  """Raises ValueError when the mesh's sequence axis cannot split this config's sequences."""
  shards = shape["sequence"]
  if shards == 1:
    return
  strategy, seq_len = cfg.mesh.sequence_attention, cfg.data.seq_len
  multiple = sequence_lib.length_multiple(strategy, shards)
  if seq_len % multiple:
    why = (f"2 x mesh.sequence = 2 x {shards} = {multiple} (ring attention's balanced layout gives "
           f"each device chunks i and {2 * shards - 1}-i of {multiple} equal chunks)"
           if strategy == "ring" else f"mesh.sequence = {shards} (each device holds an equal block)")
    other = ("" if strategy != "ring" or seq_len % shards else
             f", or --config.mesh.sequence_attention=all_gather (needs only a multiple of {shards})")
    raise ValueError(f"data.seq_len={seq_len} is not divisible by {why}; use a data.seq_len that is a "
                     f"multiple of {multiple}{other}.")
  if shape["stage"] > 1:
    raise ValueError(f"mesh.sequence={shards} with mesh.stage={shape['stage']}: sequence parallelism "
                     "does not run inside a pipeline yet; set --config.mesh.stage=1 or "
                     "--config.mesh.sequence=1.")


def pipeline_for(cfg: Config, plan: MeshPlan) -> pipeline_lib.Pipeline | None:
  """The run's pipeline when the mesh has more than one stage, else None."""
  if plan.shape["stage"] == 1:
    return None
  return pipeline_lib.Pipeline(stages=plan.shape["stage"], microbatches=cfg.train.microbatches,
                               schedule=cfg.train.pipeline_schedule, repeats=cfg.train.pipeline_repeats)


def attention_selection(cfg: Config, platform: str, compute_capability: str | None = None,
                        sequence_shards: int = 1) -> attention_lib.Selection:
  """What model.attention runs as for this config's training length on `platform`, and why.

  With `sequence_shards` > 1 (mesh.sequence) attention crosses devices (sharding/sequence.py), and
  `sequence_lib.ring_block_kernel` says what computes each block (splash under the ring on TPUs,
  else XLA). Raises ValueError (before any compile) when an explicit `cudnn` or `splash` cannot run
  there, or cannot run on a split sequence.
  """
  m = cfg.model
  platform = "cuda" if platform == "gpu" else platform
  if sequence_shards > 1:
    kernel, reason = sequence_lib.ring_block_kernel(m.attention, platform, cfg.mesh.sequence_attention,
                                                    sequence_shards, cfg.data.seq_len)
    return attention_lib.Selection(m.attention, kernel, reason)
  return attention_lib.select(m.attention, platform=platform,
                              dtype=m.dtype, head_dim=m.head_dim, seq_len=cfg.data.seq_len,
                              compute_capability=compute_capability)


def build_context(cfg: Config, devices: list | None = None) -> RunContext:
  """Validates `cfg` against the devices and returns the run's static pieces; raises ValueError early."""
  devices = devices or select_devices(cfg)
  platform = attention_lib.platform_of(devices[0])
  capability = getattr(devices[0], "compute_capability", None)
  plan = plan_mesh(cfg, len(devices), platform, capability)
  mesh = mesh_lib.make_mesh(plan.ici, devices, plan.dcn)
  pipe = pipeline_for(cfg, plan)
  rules = rules_lib.get_rules(cfg.mesh.rules, cfg.mesh.custom_rules, pipelined=pipe is not None,
                              sequenced=plan.shape["sequence"] > 1)
  if plan.shape["sequence"] > 1:
    sequence_lib.check_rules(rules)
  mdef = ts.model_def(cfg.model, pipe)
  tx = optimizer_lib.make_optimizer(cfg.train)
  schedule = optimizer_lib.learning_rate_schedule(cfg.train)
  shardings = ts.state_shardings(mdef, tx, mesh, rules)
  return RunContext(cfg, mesh, rules, mdef, tx, schedule, shardings,
                    attention_selection(cfg, platform, capability, plan.shape["sequence"]))
