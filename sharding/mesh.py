"""Building a device `Mesh` with named axes from the config's mesh section."""

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

# Outermost first: `stage` usually spans the slowest links (DCN), `tensor` the fastest. `sequence`
# (a sequence split into contiguous blocks, docs/sharding.md) sits next to `tensor`: its attention
# passes key/value blocks between neighbours every layer, so it wants fast links too.
MESH_AXES = ("stage", "data", "fsdp", "sequence", "tensor")


def resolve_mesh_shape(requested: dict[str, int], num_devices: int) -> dict[str, int]:
  """Fills the one axis given as -1 so the product equals `num_devices`.

  Takes {"stage": s, "data": d, "fsdp": f, "sequence": q, "tensor": t} (positive, or -1 for at most one axis) and returns the
  same dict with every entry positive. Raises ValueError naming the axes when they cannot fit.
  """
  requested = {name: requested.get(name, 1) for name in MESH_AXES}  # an axis left out has size 1
  unknown = [name for name in MESH_AXES if requested[name] == -1]
  for name in MESH_AXES:
    if requested[name] != -1 and (not isinstance(requested[name], int) or requested[name] < 1):
      raise ValueError(f"mesh.{name}={requested[name]!r}: must be a positive integer or -1.")
  if len(unknown) > 1:
    raise ValueError(f"mesh axes {unknown} are all -1; at most one axis may absorb the remaining devices.")
  fixed = math.prod(requested[name] for name in MESH_AXES if name not in unknown)
  shape_text = " x ".join(f"{n}={requested[n]}" for n in MESH_AXES)
  if unknown:
    if num_devices % fixed:
      raise ValueError(
          f"mesh {shape_text}: the fixed axes multiply to {fixed}, which does not divide the "
          f"{num_devices} devices; choose axis sizes whose product divides {num_devices}.")
    return {**requested, unknown[0]: num_devices // fixed}
  if fixed != num_devices:
    raise ValueError(
        f"mesh {shape_text} needs {fixed} devices but {num_devices} are available; make the product "
        f"of {', '.join('mesh.' + n for n in MESH_AXES)} equal {num_devices}, or set one of them to -1.")
  return dict(requested)


def num_granules(devices: list) -> tuple[int, str]:
  """Returns (number of slices or hosts the devices span, which one): TPU slices, else processes."""
  slices = {getattr(d, "slice_index", None) for d in devices}
  if None not in slices and len(slices) > 1:
    return len(slices), "slices"
  return len({d.process_index for d in devices}), "hosts"


def make_mesh(shape: dict[str, int], devices: list | None = None,
              dcn_shape: dict[str, int] | None = None) -> Mesh:
  """Returns a Mesh over `devices` (default: all) with axes MESH_AXES (stage, data, fsdp, sequence, tensor).

  `shape` gives each axis's size within a slice (ICI); `dcn_shape` (default all 1) multiplies each
  axis across slices or hosts (DCN), so the mesh axis `data` is dcn_data x data, and so on. Within a
  slice `mesh_utils` orders devices so the innermost axis (`tensor`) gets the fastest links; across
  slices only the DCN factors cross the slow network. Axes use automatic (GSPMD) propagation.
  """
  devices = jax.devices() if devices is None else devices
  dcn_shape = dcn_shape or {}
  ici = tuple(shape.get(name, 1) for name in MESH_AXES)   # an axis left out has size 1
  dcn = tuple(dcn_shape.get(name, 1) for name in MESH_AXES)
  if math.prod(ici) * math.prod(dcn) != len(devices):
    raise ValueError(f"mesh shape {shape} x dcn {dcn_shape} does not cover the {len(devices)} devices given.")
  if math.prod(dcn) > 1:
    granules, kind = num_granules(devices)
    if granules != math.prod(dcn):
      raise ValueError(
          f"mesh.dcn_* = {dcn_shape} asks for {math.prod(dcn)} slices/hosts but the {len(devices)} "
          f"devices span {granules} {kind}; make the product of the mesh.dcn_* sizes equal "
          f"{granules}.")
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices,
                                                process_is_granule=(kind == "hosts"))
  else:
    try:
      grid = mesh_utils.create_device_mesh(ici, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
      grid = np.asarray(devices).reshape(ici)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
