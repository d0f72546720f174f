"""The attention kernel policy: which kernel runs in each place attention runs, and why.

`model.attention` is `auto | xla | cudnn | splash`. `plan_attention` turns it, with the target
platform, dtype, head dim, training length and how the sequence is split over devices, into an
`AttentionPlan`: the kernel for every place attention runs (whole sequences, inside each block of a
sequence split over devices, a prompt's prefill, cached decoding), each with the reason. The run
plan (launch/run/plan.py) calls it once; the plan is printed, stored in checkpoints' meta and handed
to the model (`Transformer(..., attention=plan)`), which only reads it and runs the kernels it names
(lm/attention.py). What `auto` picks:

  * NVIDIA GPU, bf16/fp16, head dim a multiple of 8 up to 128 (256 on Hopper and later), and an
    even sequence length when segment ids come too: cuDNN's fused flash attention.
  * TPU, sequence length a multiple of 128: the Pallas splash attention kernel.
  * everything else, and CPU always: XLA.

A kernel with a length condition (splash: multiples of 128; cuDNN with segments: even lengths)
records it in its `Selection.length_multiple`; a traced length outside it runs XLA under `auto`
(decided in the plan, read by the model) and is refused under an explicit kernel.
"""

import dataclasses

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
# Platforms `select` knows: jax's "gpu" is split by vendor because only NVIDIA has cuDNN.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
_SPLASH_BLOCK = 128          # splash tiles the sequence in blocks of this many positions (or fewer)


@dataclasses.dataclass(frozen=True)
class Selection:
  """What runs (`implementation`: xla | cudnn | splash) and why (`reason`, one sentence).

  `length_multiple`: the kernel runs query lengths that are a multiple of it; another length runs
  XLA when the kernel was `auto`'s pick, and is an error when it was asked for by name.
  """
  requested: str
  implementation: str
  reason: str
  length_multiple: int = 1

  def message(self, place: str = "") -> str:
    """One line for the start-up log, e.g. 'attention: cudnn (auto: cuDNN flash attention ...)'."""
    where = f" [{place}]" if place else ""
    return f"attention{where}: {self.rule()} ({self.requested}: {self.reason})"

  def rule(self) -> str:
    """What runs, with the per-length rule: 'splash for lengths that are a multiple of 128, else xla'."""
    if self.length_multiple == 1 or self.implementation == "xla":
      return self.implementation
    if self.requested == "auto":
      return f"{self.implementation} for lengths that are a multiple of {self.length_multiple}, else xla"
    return f"{self.implementation} (lengths must be a multiple of {self.length_multiple})"

  def for_length(self, length: int) -> str:
    """The implementation that runs a query length of `length` (this selection's rule, no new choice)."""
    if length % self.length_multiple == 0:
      return self.implementation
    if self.requested == "auto":
      return "xla"
    raise ValueError(f"model.attention={self.requested!r} cannot run a length of {length}: "
                     f"{self.implementation} needs a multiple of {self.length_multiple}. Use "
                     "--config.model.attention=auto (XLA takes such lengths) or xla.")


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
  """The kernel for each place attention runs, decided once (`plan_attention`).

  `full`: a whole sequence on each device (training, eval, a loss hook's model calls);
  `ring_block`: each device's block when the sequence is split over the `sequence` mesh axis (None
  when it is not); `ring_strategy` / `ring_shards`: how it is split (mesh.sequence_attention,
  mesh.sequence); `ring_layout`: the order the model's callers put each sequence in (zigzag: the
  train and eval steps reorder it for the ring's balance, reading this field; natural); `prefill`: a prompt against itself, filling the KV cache; `decode`: new tokens
  against the cache. `interpret` runs Pallas kernels in Pallas' interpreter (a TPU plan traced on
  CPU devices: tests, and checks of a pod's plan on a CPU host).
  """
  full: Selection
  prefill: Selection
  decode: Selection
  ring_block: Selection | None = None
  ring_strategy: str = "ring"
  ring_shards: int = 1
  ring_layout: str = "natural"
  interpret: bool = False

  @property
  def training(self) -> Selection:
    """What computes the train step's attention: the sequence blocks' kernel when the sequence is
    split, else the whole-sequence one."""
    return self.ring_block or self.full

  @property
  def zigzag_shards(self) -> int:
    """Over how many shards a caller reorders each sequence before the model sees it (0: natural order)."""
    return self.ring_shards if self.ring_block is not None and self.ring_layout == "zigzag" else 0

  def in_natural_order(self) -> "AttentionPlan":
    """This plan for callers that keep sequences in natural order (a loss hook, a frozen teacher)."""
    return dataclasses.replace(self, ring_layout="natural")

  def places(self) -> dict[str, Selection]:
    """{place: Selection} for the places this plan covers, in the order a run meets them."""
    places = {"whole sequence": self.full}
    if self.ring_block is not None:
      places["sequence blocks"] = self.ring_block
    places.update(prefill=self.prefill, decode=self.decode)
    return places

  def messages(self) -> list[str]:
    """One start-up log line per place."""
    return [selection.message(place) for place, selection in self.places().items()]

  def to_dict(self) -> dict:
    """Plain data for a checkpoint's meta: {place: {requested, implementation, reason, ...}}."""
    return {place: dataclasses.asdict(selection) for place, selection in self.places().items()}


def unplanned(requested: str) -> AttentionPlan:
  """For tests only: the kernels a test's model runs without a run plan (a library caller plans
  with `plan_attention` through launch/run/plan.py). `auto` runs XLA in every place (every platform
  runs it); an explicit kernel runs as asked, unchecked against any device."""
  if requested not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={requested!r}: choose one of {list(IMPLEMENTATIONS)}.")
  kernel = "xla" if requested == "auto" else requested
  chosen = Selection(requested, kernel, "no run plan: " + ("XLA" if kernel == "xla" else
                                                           "as configured, unchecked"))
  return AttentionPlan(full=chosen, prefill=chosen, decode=Selection(requested, "xla", "no run plan: XLA"))


def platform_of(device) -> str:
  """'cpu' | 'cuda' | 'rocm' | 'tpu' for a jax device (a GPU's vendor read from its backend)."""
  if device.platform != "gpu":
    return device.platform
  version = getattr(device.client, "platform_version", "").lower()
  return "rocm" if "rocm" in version else "cuda"


def _cudnn_problem(dtype: str, head_dim: int, seq_len: int, compute_capability: str | None,
                   masked: bool) -> str:
  """'' when cuDNN flash attention takes these shapes, else why not (jax's own checks, mirrored)."""
  if dtype not in ("bfloat16", "float16"):
    return f"cuDNN flash attention needs bfloat16 or float16 compute, not model.dtype={dtype!r}"
  hopper = compute_capability is not None and tuple(map(int, compute_capability.split("."))) >= (9, 0)
  max_head = 256 if hopper else 128
  if head_dim % 8 or head_dim > max_head:
    return (f"cuDNN flash attention needs a head dim that is a multiple of 8 and at most {max_head}, "
            f"not model.head_dim={head_dim}")
  if masked and seq_len % 2:
    # Training with a bias (the segment mask) needs even lengths (jax's check_is_flash_attention).
    return f"cuDNN flash attention with a segment mask needs an even sequence length, not {seq_len}"
  return ""


def _splash_problem(seq_len: int) -> str:
  if seq_len % _SPLASH_BLOCK:
    return (f"splash attention tiles the sequence in blocks of {_SPLASH_BLOCK}; length {seq_len} is "
            f"not a multiple")
  return ""


def select(requested: str, *, platform: str, dtype: str, head_dim: int, seq_len: int,
           compute_capability: str | None = None, segments: bool = True) -> Selection:
  """Resolves `model.attention` for one platform and shape; the only place the choice is made.

  `platform` is one of PLATFORMS, `dtype` the compute dtype name, `seq_len` the query length the
  kernel sees, `compute_capability` a CUDA device's ("9.0"; None when unknown), `segments` whether
  a segment mask comes too (training and eval; not a prompt's prefill). Returns a Selection.
  Raises ValueError when an explicit `cudnn` or `splash` cannot run here (auto falls back instead).
  """
  if requested not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={requested!r}: choose one of {list(IMPLEMENTATIONS)}.")
  if platform not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; expected one of {list(PLATFORMS)}.")
  if requested == "xla":
    return Selection(requested, "xla", "as configured")
  cudnn_problem = ("cuDNN runs only on NVIDIA GPUs, and this is " + platform if platform != "cuda"
                   else _cudnn_problem(dtype, head_dim, seq_len, compute_capability, segments))
  splash_problem = ("splash attention is a TPU (Pallas Mosaic) kernel, and this is " + platform
                    if platform != "tpu" else _splash_problem(seq_len))
  # The lengths each kernel takes: splash tiles in blocks; cuDNN with a segment mask wants even ones.
  cudnn_multiple, splash_multiple = (2 if segments else 1), _SPLASH_BLOCK
  if requested == "cudnn":
    if cudnn_problem:
      raise ValueError(f"model.attention='cudnn' cannot run: {cudnn_problem}. Use "
                       "--config.model.attention=auto (picks what this machine has) or xla.")
    return Selection(requested, "cudnn", "as configured", cudnn_multiple)
  if requested == "splash":
    if splash_problem:
      raise ValueError(f"model.attention='splash' cannot run: {splash_problem}. Use "
                       "--config.model.attention=auto (picks what this machine has) or xla.")
    return Selection(requested, "splash", "as configured", splash_multiple)
  if platform == "cuda":
    if not cudnn_problem:
      return Selection(requested, "cudnn", "cuDNN fused flash attention on an NVIDIA GPU", cudnn_multiple)
    return Selection(requested, "xla", f"fell back to XLA: {cudnn_problem}")
  if platform == "tpu":
    if not splash_problem:
      return Selection(requested, "splash", "Pallas splash attention on TPU", splash_multiple)
    return Selection(requested, "xla", f"fell back to XLA: {splash_problem}")
  return Selection(requested, "xla", f"no fused attention kernel on {platform}; XLA")


def select_sequence_block(requested: str, *, platform: str, strategy: str, shards: int,
                          seq_len: int) -> Selection:
  """What computes each device's attention block when the sequence is split over `shards` > 1
  devices (mesh.sequence) by `strategy` (mesh.sequence_attention: ring | all_gather, validated
  with the config: sharding.sequence.STRATEGIES).

  Under `ring` on a TPU, Pallas splash runs inside every block when a sub-block (seq_len / 2 x
  shards tokens, the zigzag layout's pieces) is a multiple of 128; everywhere else, and under
  `all_gather`, XLA does. Raises ValueError for an explicit kernel that cannot run there.
  """
  def refuse(why: str):
    raise ValueError(f"model.attention={requested!r} with mesh.sequence={shards}: {why}. Set "
                     "--config.model.attention=auto (or xla), or --config.mesh.sequence=1.")
  if strategy != "ring":
    if requested in ("cudnn", "splash"):
      refuse("all_gather attention runs each device's queries against the gathered keys through XLA; "
             "--config.mesh.sequence_attention=ring runs splash inside its blocks on TPUs")
    return Selection(requested, "xla",
                     f"mesh.sequence={shards}: all_gather attention, each device's block through XLA")
  if requested == "cudnn":
    refuse("ring attention merges blocks by their softmax statistics, which jax's cuDNN attention "
           "does not return, so each block runs through XLA on GPUs")
  if requested == "xla":
    return Selection(requested, "xla", f"mesh.sequence={shards}: ring attention, each block through "
                     "XLA as configured")
  sub_block = seq_len // (2 * shards)
  problem = (f"splash attention is a TPU kernel, and this is {platform}" if platform != "tpu" else
             f"splash attention tiles a ring sub-block in blocks of {_SPLASH_BLOCK}, and each "
             f"device's sub-block holds {sub_block} tokens (data.seq_len / (2 x mesh.sequence))"
             if sub_block % _SPLASH_BLOCK else "")
  whole = 2 * shards * _SPLASH_BLOCK  # the lengths whose sub-blocks splash tiles
  if requested == "splash":
    if problem:
      refuse(f"it cannot run inside the ring's blocks: {problem}")
    return Selection(requested, "splash", f"mesh.sequence={shards}: ring attention, each block "
                     "through splash as configured", whole)
  if not problem:
    return Selection(requested, "splash", f"mesh.sequence={shards}: ring attention, each block "
                     "through Pallas splash on TPU", whole)
  if platform == "cuda":
    problem = ("jax's cuDNN attention returns no softmax statistics, which the ring needs to merge "
               "blocks")
  return Selection(requested, "xla", f"mesh.sequence={shards}: ring attention, each block through "
                   f"XLA ({problem})")


def plan_attention(requested: str, *, platform: str, dtype: str, head_dim: int, seq_len: int,
                   compute_capability: str | None = None, sequence_shards: int = 1,
                   sequence_strategy: str = "ring", sequence_layout: str = "natural",
                   interpret: bool = False) -> AttentionPlan:
  """The kernel for every place attention runs, for one model on one target; the only choice point.

  `platform` is one of PLATFORMS (the target devices'), `dtype` the compute dtype name, `seq_len`
  the training length, `sequence_shards` / `sequence_strategy` mesh.sequence and
  mesh.sequence_attention, `sequence_layout` the order the steps put sequences in (the run plan's). Prefill is planned for prompts with padding segments (any length; the
  selection's length rule says which run the kernel); decoding (a few queries against a long KV
  cache) always runs XLA. Raises ValueError (before anything compiles) when an explicit `cudnn` or
  `splash` cannot run in a place it would be used.
  """
  shape = dict(platform=platform, dtype=dtype, head_dim=head_dim, compute_capability=compute_capability)
  ring_block = None
  if sequence_shards > 1:
    ring_block = select_sequence_block(requested, platform=platform, strategy=sequence_strategy,
                                       shards=sequence_shards, seq_len=seq_len)
  full = select(requested, seq_len=seq_len, **shape)
  # Prompts come in many lengths: planned at one that every kernel tiles; the Selection's
  # length_multiple then says, per prompt length, whether the kernel or XLA runs it.
  prefill = select(requested, seq_len=2 * _SPLASH_BLOCK, segments=True, **shape)
  decode = Selection(requested, "xla", "a few queries against the KV cache: no fused kernel for "
                     "that shape; XLA")
  return AttentionPlan(full=full, prefill=prefill, decode=decode, ring_block=ring_block,
                       ring_strategy=sequence_strategy, ring_shards=sequence_shards,
                       ring_layout=sequence_layout if sequence_shards > 1 else "natural", interpret=interpret)
