"""Accelerator spec sheets: one frozen record per chip, the one place a peak, a capacity or a bandwidth is written.

MFU's peak (launch/run/throughput.py), the decode table's memory floor (launch/measure/decode.py)
and the sequence-parallel cost model (launch/reproduce/sequence_cost.py) all read `CHIPS`. A chip is
found by its jax `device_kind`, longest prefix first: "TPU v5" is a v5p, "TPU v5 lite" a v5e.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip's spec sheet. Peaks are dense (no sparsity), per chip.

  `bf16_tflops`/`fp32_tflops` peak TFLOP/s; `fp32_tflops` None where the chip has no separate fp32
  rate (TPUs run float32 matmuls as bfloat16 passes). `hbm_gib` memory per chip in GiB (as the
  vendor states it), `hbm_gbs` its bandwidth in GB/s (1e9 bytes/s).
  """
  name: str
  device_kinds: tuple[str, ...]  # jax device_kind prefixes that mean this chip
  bf16_tflops: float
  fp32_tflops: float | None
  hbm_gib: float
  hbm_gbs: float


CHIPS = (
    # cloud.google.com/tpu/docs/v4: 275 bf16 TFLOP/s, 32 GiB HBM2 at 1200 GBps.
    Chip("TPU v4", ("TPU v4",), 275.0, None, 32.0, 1200.0),
    # cloud.google.com/tpu/docs/v5e: 197 bf16 TFLOP/s, 16 GiB HBM2 at 819 GBps.
    Chip("TPU v5e", ("TPU v5 lite", "TPU v5e"), 197.0, None, 16.0, 819.0),
    # cloud.google.com/tpu/docs/v5p: 459 bf16 TFLOP/s, 95 GiB HBM2e at 2765 GBps.
    Chip("TPU v5p", ("TPU v5", "TPU v5p"), 459.0, None, 95.0, 2765.0),
    # cloud.google.com/tpu/docs/v6e (Trillium): 918 bf16 TFLOP/s, 32 GiB HBM at 1640 GBps.
    Chip("TPU v6e", ("TPU v6 lite", "TPU v6e"), 918.0, None, 32.0, 1640.0),
    # NVIDIA A100 datasheet (SXM4): 312 bf16 tensor TFLOP/s, 19.5 fp32 (non-tensor); 40 GB HBM2 at
    # 1555 GB/s, 80 GB HBM2e at 2039 GB/s.
    Chip("A100 40GB", ("NVIDIA A100-SXM4-40GB",), 312.0, 19.5, 40.0, 1555.0),
    Chip("A100 80GB", ("NVIDIA A100-SXM4-80GB",), 312.0, 19.5, 80.0, 2039.0),
    # NVIDIA H100 datasheet (SXM5): 989 bf16 tensor TFLOP/s dense, 67 fp32; 80 GB HBM3 at 3.35 TB/s.
    # Any other "NVIDIA H100..." kind is taken to be the SXM part.
    Chip("H100 SXM", ("NVIDIA H100 80GB HBM3", "NVIDIA H100"), 989.0, 67.0, 80.0, 3350.0),
    # NVIDIA H200 datasheet (SXM): H100's compute, 141 GB HBM3e at 4.8 TB/s.
    Chip("H200 SXM", ("NVIDIA H200",), 989.0, 67.0, 141.0, 4800.0),
)

_BY_PREFIX = {prefix: chip for chip in CHIPS for prefix in chip.device_kinds}


def chip_for(device_kind: str) -> Chip | None:
  """The Chip whose longest device_kind prefix starts `device_kind` (a jax `device.device_kind`
  string such as "TPU v5 lite" or "NVIDIA H100 80GB HBM3"), or None for an unlisted chip or a CPU."""
  for prefix in sorted(_BY_PREFIX, key=len, reverse=True):
    if device_kind.startswith(prefix):
      return _BY_PREFIX[prefix]
  return None


def chip_named(name: str) -> Chip:
  """The Chip called `name` (its `name` field, e.g. "TPU v5p"); KeyError naming the known ones if none."""
  for chip in CHIPS:
    if chip.name == name:
      return chip
  raise KeyError(f"no chip named {name!r}; known: {', '.join(c.name for c in CHIPS)}")
