"""The run plan: every decision a run makes, made once from a validated Config and the target devices.

    Config (validated) + target devices ──► decide() ──► RunPlan ──► steps, eval, generation, tools
                                            mesh shape, pipeline,      mesh, rules, model definition,
                                            sequence layout, attention  optimizer, shardings
                                            kernel per place

`decide` needs only a device count and a platform, so a cluster dry run (no devices) and a TPU
topology compiled ahead of time (devices that are not the host's) plan exactly as a run does.
`make_plan` adds what needs device objects: the mesh, the rule table, the model definition (which
carries the attention plan into the model) and the state's shardings. Everything below reads the
plan; nothing decides again while tracing. What the plan decided is printed at start
(`RunPlan.describe`) and stored in every checkpoint's meta (`RunPlan.meta`), from the plan itself.

All checks that can fail (mesh vs devices, batch vs data axes, rules vs shapes, remat vs platform,
sequence length vs the sequence axis, an explicit kernel vs the platform) run here, so a bad config
stops before any compile or write.
"""

import dataclasses
import math

import jax
import optax
from jax.sharding import Mesh

from launch.run import optimizer as optimizer_lib
from launch.run import state as ts
from configs.base import base_config
from launch.run.config import Config, validate
from lm.config import ModelConfig
from lm import attention_plan
from sharding import mesh as mesh_lib
from sharding import pipeline as pipeline_lib
from sharding import remat as remat_lib
from sharding import rules as rules_lib
from sharding import sequence as sequence_lib


@dataclasses.dataclass(frozen=True)
class MeshShape:
  """The mesh a config asks for on a number of devices: per-axis sizes within a slice and across slices."""
  ici: dict[str, int]      # sizes within a slice or host (fast links)
  dcn: dict[str, int]      # factors across slices or hosts (slow links); all 1 for one slice

  @property
  def shape(self) -> dict[str, int]:
    """The mesh axes' total sizes (ici x dcn)."""
    return {name: self.ici[name] * self.dcn[name] for name in self.ici}


@dataclasses.dataclass(frozen=True)
class SequencePlan:
  """How sequences cross devices: `shards` (mesh.sequence), `strategy` (mesh.sequence_attention) and
  the `layout` the train and eval steps' loss reads each sequence in ("zigzag" under the ring with
  shards > 1, "natural" otherwise). A loss hook's model calls (compress/) always read natural order."""
  shards: int
  strategy: str
  layout: str

  @property
  def zigzag_shards(self) -> int:
    """Over how many shards the steps reorder each sequence (0: natural order)."""
    return self.shards if self.layout == "zigzag" else 0


# What model.dtype = "auto" computes in, per target platform: bfloat16 on accelerators (parameters
# stay in model.param_dtype), float32 on a CPU, whose bfloat16 matmuls gain little.
AUTO_DTYPE = {"cpu": "float32", "cuda": "bfloat16", "rocm": "bfloat16", "tpu": "bfloat16"}


def compute_dtype_for(requested: str, platform: str) -> str:
  """model.dtype for `platform` (cpu | cuda | rocm | tpu): "auto" resolved by AUTO_DTYPE, else as given."""
  return AUTO_DTYPE[platform] if requested == "auto" else requested


@dataclasses.dataclass(frozen=True)
class Decisions:
  """What `decide` settles for a device count and platform, before any device object is touched.

  `dtype`: the compute dtype (model.dtype, "auto" resolved for the platform)."""
  platform: str
  dtype: str
  mesh_shape: MeshShape
  pipeline: pipeline_lib.Pipeline | None
  sequence: SequencePlan
  attention: attention_plan.AttentionPlan


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """One run's decisions and the static pieces built from them; made by `make_plan`, never changed.

  Decisions: `platform` (the target devices': cpu | cuda | rocm | tpu), `mesh_shape`, `pipeline`
  (None without stages), `sequence`, `attention` (the kernel per place, each with its reason); remat,
  storage dtype and the loss chunking are the config's, and the compute dtype is the config's with
  `auto` resolved for the target (`cfg` is the validated Config with that dtype filled in, so
  `plan.cfg.model.dtype` is never "auto"), shown by `describe`. Built from them: `mesh`, `rules`, `mdef` (the model definition; its graph carries the
  attention plan), `tx`, `schedule`, `shardings` (a NamedSharding per TrainState leaf).
  """
  cfg: Config
  platform: str
  mesh_shape: MeshShape
  pipeline: pipeline_lib.Pipeline | None
  sequence: SequencePlan
  attention: attention_plan.AttentionPlan
  mesh: Mesh
  rules: rules_lib.Rules
  mdef: ts.ModelDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  shardings: ts.TrainState
  teacher: attention_plan.AttentionPlan | None = None  # a distillation teacher's kernels (`with_teacher`)

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  def natural_order_mdef(self) -> ts.ModelDef:
    """The plan's model for callers that keep sequences in natural order (a loss hook): same
    kernels, the ring reading natural order."""
    return ts.model_def(self.cfg.model, self.pipeline, self.attention.in_natural_order())

  def model_for(self, model: ModelConfig) -> ModelConfig:
    """Another model (a teacher, a calibration variant) as it computes on this plan's devices:
    model.dtype "auto" settled for this platform."""
    return dataclasses.replace(model, dtype=compute_dtype_for(model.dtype, self.platform))

  def attention_for(self, model: ModelConfig) -> attention_plan.AttentionPlan:
    """The kernels another model (a teacher) runs on this plan's devices, planned by the same rule:
    its shapes and compute dtype (`auto` resolved for this platform), this plan's sequence split,
    in natural order (it only reads what the caller feeds it)."""
    return attention_plan.plan_attention(
        model.attention, platform=self.platform, dtype=self.model_for(model).dtype,
        head_dim=model.head_dim, seq_len=self.cfg.data.seq_len,
        compute_capability=getattr(self.mesh.devices.flat[0], "compute_capability", None),
        sequence_shards=self.sequence.shards, sequence_strategy=self.sequence.strategy,
        interpret=self.attention.interpret)

  def with_teacher(self, teacher: ModelConfig) -> "RunPlan":
    """This plan with a distillation teacher's kernels (`attention_for`), printed and stored beside
    the student's."""
    return dataclasses.replace(self, teacher=self.attention_for(teacher))

  def describe(self) -> list[str]:
    """The start-up log's lines: what this plan decided, one fact a line."""
    m = self.cfg.model
    shape = " x ".join(f"{k}={v}" for k, v in self.mesh.shape.items() if v > 1) or "one device"
    lines = [f"plan: {self.num_devices} {self.platform} device(s), mesh {shape}, "
             f"rules={self.cfg.mesh.custom_rules or self.cfg.mesh.rules}",
             f"plan: remat={m.remat}, compute {m.dtype}, storage {m.param_dtype}, "
             f"logits chunk {m.logits_chunk_size or 'off'}"]
    if self.pipeline is not None:
      p = self.pipeline
      lines.append(f"plan: pipeline of {p.stages} stages, {p.microbatches} micro-batches, {p.schedule}")
    if self.sequence.shards > 1:
      lines.append(f"plan: sequence split over {self.sequence.shards} devices by "
                   f"{self.sequence.strategy}, {self.sequence.layout} layout")
    lines += self.attention.messages()
    if self.teacher is not None:
      lines += ["teacher " + line for line in self.teacher.messages()]
    return lines

  def meta(self) -> dict:
    """Plain data for a checkpoint's meta: the decisions, as `describe` prints them."""
    meta = {"platform": self.platform, "mesh": dict(self.mesh.shape),
            "pipeline": None if self.pipeline is None else dataclasses.asdict(self.pipeline),
            "sequence": dataclasses.asdict(self.sequence), "attention": self.attention.to_dict()}
    if self.teacher is not None:
      meta["teacher_attention"] = self.teacher.to_dict()
    return meta


def select_devices(cfg: Config) -> list:
  """The devices the run uses: all of the host's, or the first mesh.num_devices."""
  devices = jax.devices()
  if cfg.mesh.num_devices:
    if cfg.mesh.num_devices > len(devices):
      raise ValueError(f"mesh.num_devices={cfg.mesh.num_devices} but only {len(devices)} devices exist.")
    devices = devices[:cfg.mesh.num_devices]
  return devices


def decide(cfg: Config, num_devices: int, platform: str, compute_capability: str | None = None,
           interpret: bool = False) -> Decisions:
  """Settles the mesh shape, pipeline, sequence layout and attention kernels for `num_devices`
  devices of `platform` ("cpu", "gpu", "tpu"; or "cuda" / "rocm" for a GPU's vendor, "gpu" meaning
  NVIDIA). `interpret`: Pallas kernels run in their interpreter (a TPU plan traced on CPU devices).

  The one pre-compile check, shared by the run (`make_plan`) and the cluster launcher's dry run:
  DCN factors vs devices, mesh vs device count, batch vs the data axes, remat vs platform, the
  pipeline, data.seq_len vs the sequence axis, an explicit model.attention kernel vs platform.
  Raises ValueError naming what does not fit and how to fix it.
  """
  platform = "cuda" if platform == "gpu" else platform
  if platform not in AUTO_DTYPE:
    raise ValueError(f"unknown platform {platform!r}; expected one of {sorted(AUTO_DTYPE)} (or gpu).")
  dtype = compute_dtype_for(cfg.model.dtype, platform)
  dcn = cfg.mesh.dcn_shape()
  num_dcn = math.prod(dcn.values())
  if num_devices % num_dcn:
    raise ValueError(f"mesh.dcn_* = {dcn} splits the devices into {num_dcn} slices, which does not "
                     f"divide the {num_devices} devices.")
  mesh_shape = MeshShape(mesh_lib.resolve_mesh_shape(cfg.mesh.requested_shape(), num_devices // num_dcn),
                         dcn)
  shape = mesh_shape.shape
  _check_batch(cfg, shape)
  remat_lib.check_remat_supported(cfg.model.remat, platform)
  pipeline = _pipeline(cfg, shape)
  sequence = _sequence(cfg, shape)
  m = cfg.model
  attention = attention_plan.plan_attention(
      m.attention, platform=platform, dtype=dtype, head_dim=m.head_dim, seq_len=cfg.data.seq_len,
      compute_capability=compute_capability, sequence_shards=sequence.shards,
      sequence_strategy=sequence.strategy, sequence_layout=sequence.layout, interpret=interpret)
  return Decisions(platform, dtype, mesh_shape, pipeline, sequence, attention)


def _check_batch(cfg: Config, shape: dict[str, int]) -> None:
  """Raises ValueError if the batch cannot be split over the mesh's data axes."""
  batch_shards = shape["data"] * shape["fsdp"]
  micro = cfg.train.global_batch_size // cfg.train.grad_accum_steps
  if micro % batch_shards:
    raise ValueError(
        f"train.global_batch_size={cfg.train.global_batch_size} / train.grad_accum_steps="
        f"{cfg.train.grad_accum_steps} = {micro} sequences per micro-batch, which is not divisible by "
        f"mesh.data x mesh.fsdp = {shape['data']} x {shape['fsdp']} = {batch_shards}; "
        f"use a global batch that is a multiple of {batch_shards * cfg.train.grad_accum_steps}.")


def _pipeline(cfg: Config, shape: dict[str, int]) -> pipeline_lib.Pipeline | None:
  """The run's pipeline when the mesh has more than one stage, else None; raises ValueError when the
  stages, micro-batches and layers do not fit together."""
  t = cfg.train
  if shape["stage"] == 1:
    if t.microbatches != 1:
      raise ValueError(f"train.microbatches={t.microbatches} splits a step for a pipeline, but mesh.stage=1 "
                       "(no pipeline); set --config.mesh.stage to 2 or more, or use train.grad_accum_steps "
                       "to split a step without one.")
    return None
  pipe = pipeline_lib.Pipeline(stages=shape["stage"], microbatches=t.microbatches,
                               schedule=t.pipeline_schedule, repeats=t.pipeline_repeats)
  errors = pipeline_lib.pipeline_errors(pipe, cfg.model.num_layers, t.global_batch_size // t.grad_accum_steps,
                                        shape["data"] * shape["fsdp"])
  if errors:
    raise ValueError("Invalid pipeline:\n  " + "\n  ".join(errors))
  return pipe


def _sequence(cfg: Config, shape: dict[str, int]) -> SequencePlan:
  """How sequences cross the `sequence` axis; raises ValueError when it cannot split them."""
  shards, strategy, seq_len = shape["sequence"], cfg.mesh.sequence_attention, cfg.data.seq_len
  if shards == 1:
    return SequencePlan(1, strategy, "natural")
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
  return SequencePlan(shards, strategy, "zigzag" if strategy == "ring" else "natural")


def with_dtype(cfg: Config, dtype: str) -> Config:
  """`cfg` computing in `dtype` (what the plan made of model.dtype)."""
  return cfg if cfg.model.dtype == dtype else dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, dtype=dtype))


def config_for_model(model: ModelConfig, num_devices: int = 1) -> Config:
  """A validated Config that runs `model` on the first `num_devices` devices with the defaults of
  configs/base.py otherwise (sequences as long as the model allows, up to the default length): for
  tools and notebooks that hold a model, not a run. Raises ValueError for a model that is not valid."""
  raw = base_config().to_dict()
  raw["model"] = dataclasses.asdict(model)
  raw["data"]["seq_len"] = min(raw["data"]["seq_len"], model.max_seq_len)
  raw["mesh"]["num_devices"] = num_devices
  return validate(raw)


def make_plan(cfg: Config, devices: list | None = None, platform: str | None = None) -> RunPlan:
  """The run's plan for `devices` (default: the host's, `select_devices`); raises ValueError early.

  `platform` describes the devices as another platform's (e.g. "tpu" for simulated CPU devices in a
  test): the plan then makes that platform's choices, and Pallas kernels run in their interpreter.
  """
  devices = list(devices or select_devices(cfg))
  own_platform = attention_plan.platform_of(devices[0])
  platform = platform or own_platform
  capability = getattr(devices[0], "compute_capability", None)
  # Pallas kernels lower for their own platform only; described devices run them interpreted.
  interpret = platform == "tpu" and devices[0].platform != "tpu"
  decided = decide(cfg, len(devices), platform, capability, interpret)
  cfg = with_dtype(cfg, decided.dtype)
  mesh = mesh_lib.make_mesh(decided.mesh_shape.ici, devices, decided.mesh_shape.dcn)
  rules = rules_lib.get_rules(cfg.mesh.rules, cfg.mesh.custom_rules, pipelined=decided.pipeline is not None,
                              sequenced=decided.sequence.shards > 1)
  if decided.sequence.shards > 1:
    sequence_lib.check_rules(rules)
  mdef = ts.model_def(cfg.model, decided.pipeline, decided.attention)
  tx = optimizer_lib.make_optimizer(cfg.train)
  schedule = optimizer_lib.learning_rate_schedule(cfg.train)
  shardings = ts.state_shardings(mdef, tx, mesh, rules)
  return RunPlan(cfg, decided.platform, decided.mesh_shape, decided.pipeline, decided.sequence,
                 decided.attention, mesh, rules, mdef, tx, schedule, shardings)
