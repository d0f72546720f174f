"""TPU slices described without a TPU: the devices of a named topology, for compiling ahead of time.

  devices = topology_devices("v5p:4x4x8")                 # 128 TPU v5p chips, none of them here
  devices = topology_devices("v5p:2x2x1", num_slices=2)   # two slices joined over DCN

`jax.experimental.topologies.get_topology_desc` asks libtpu (the `tpu` extra:
`pip install -e '.[tpu]'`, Linux x86_64 only) for device objects of a slice that does not exist
here; a mesh over them and `jit(...).lower(...).compile()` run the real TPU compiler on this host.
The devices' platform is "tpu", so the run plan makes a TPU's choices (splash attention, compiled by
Mosaic, never its interpreter). Nothing can run on them: compile, read, print.
"""

import contextlib
import functools
import importlib.util
import os
import re
import sys
import tempfile

from launch.run import chips

# "v5p:4x4x8", "v5e:16x16", "v6e:2x2", "v4:2x2x1": a TPU generation and its chips per dimension.
_NAME = re.compile(r"^v\d+[a-z]*:\d+(x\d+){1,2}$")


def libtpu_installed() -> bool:
  """Whether libtpu (the TPU compiler) can be imported: the `tpu` extra is installed."""
  return importlib.util.find_spec("libtpu") is not None


def check_topology_name(name: str) -> None:
  """Raises ValueError unless `name` reads like a TPU topology ("v5p:4x4x8", "v5e:2x2")."""
  if not _NAME.match(name or ""):
    raise ValueError(f"--topology={name!r} is not a TPU topology name; write the generation and the chips "
                     "per dimension, e.g. v5p:4x4x8 (128 chips), v5p:2x2x1, v5e:16x16 or v6e:2x2.")


@contextlib.contextmanager
def _quiet_stderr():
  """Sends what C++ writes to stderr (libtpu's start-up warnings about the missing TPU) to a file
  while the block runs; Python's own exceptions still propagate."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


@functools.lru_cache(maxsize=None)
def _topology(name: str, num_slices: int) -> tuple:
  from jax.experimental import topologies
  with _quiet_stderr():
    desc = topologies.get_topology_desc(topology_name=name, platform="tpu",
                                        **({"num_slices": num_slices} if num_slices > 1 else {}))
  return tuple(desc.devices)


def topology_devices(name: str, num_slices: int = 1) -> list:
  """The devices of `num_slices` TPU slices of topology `name` (e.g. "v5p:4x4x8"), made by libtpu
  on this host (no TPU needed); a list of jax devices with platform "tpu" (and `slice_index` when
  num_slices > 1), len = chips x num_slices.

  Raises ValueError for a malformed or unknown name, num_slices < 1, or when libtpu is not installed.
  """
  check_topology_name(name)
  if not isinstance(num_slices, int) or num_slices < 1:
    raise ValueError(f"--num_slices={num_slices!r}: must be a positive integer (1 for one slice).")
  if not libtpu_installed():
    raise ValueError(f"--topology={name} needs the TPU compiler (libtpu), which is not installed: "
                     "pip install -e '.[tpu]' (Linux x86_64 only).")
  # Without it libtpu waits on the cloud metadata server for the TPU it runs on.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # libtpu's lockfile keeps two processes off one TPU; here there is none, and a sweep's points and
  # other compiles may overlap.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    return list(_topology(name, num_slices))
  except Exception as e:  # noqa: BLE001 - libtpu's own error type; the message says what is wrong
    reason = str(e).split("\n")[0].removeprefix("INVALID_ARGUMENT: ")
    raise ValueError(f"--topology={name}: libtpu cannot describe this slice ({reason}); use a name such "
                     "as v5p:4x4x8, v5e:16x16 or v6e:2x2 whose dimensions the generation allows.") from e


def chip_of(devices: list) -> chips.Chip:
  """The spec sheet (launch/run/chips.py) of the devices' chip; ValueError for a chip not listed there."""
  kind = devices[0].device_kind
  chip = chips.chip_for(kind)
  if chip is None:
    raise ValueError(f"no spec sheet for device kind {kind!r} in launch/run/chips.py; add one to read "
                     "its HBM and peak FLOP/s.")
  return chip
