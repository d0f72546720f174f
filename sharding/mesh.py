"""Building a device `Mesh` with named axes from the config's mesh section."""

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(requested: dict[str, int], num_devices: int) -> dict[str, int]:
  """Fills the one axis given as -1 so the product equals `num_devices`.

  Takes {"data": d, "fsdp": f, "tensor": t} (positive, or -1 for at most one axis) and returns the
  same dict with every entry positive. Raises ValueError naming the axes when they cannot fit.
  """
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
        f"of mesh.data, mesh.fsdp and mesh.tensor equal {num_devices}, or set one of them to -1.")
  return dict(requested)


def make_mesh(shape: dict[str, int], devices: list | None = None) -> Mesh:
  """Returns a Mesh over `devices` (default: all) with axes ("data", "fsdp", "tensor").

  Axes use the classic automatic (GSPMD) propagation; `mesh_utils` orders devices so that the
  innermost axis (`tensor`) lands on the best-connected devices.
  """
  devices = jax.devices() if devices is None else devices
  dims = tuple(shape[name] for name in MESH_AXES)
  if math.prod(dims) != len(devices):
    raise ValueError(f"mesh shape {shape} does not cover the {len(devices)} devices given.")
  try:
    grid = mesh_utils.create_device_mesh(dims, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(dims)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
