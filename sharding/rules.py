"""Logical-axis rule tables: which mesh axes each logical name of the model is split over.

A rule table is a tuple of (logical name, mesh axes). Data, FSDP, tensor and hybrid parallelism are
different tables over the same model code. See docs/sharding.md for pictures of each preset.
"""

import math
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.mesh import MESH_AXES

Rules = tuple[tuple[str, tuple[str, ...]], ...]

_BATCH = ("batch", ("data", "fsdp"))

RULE_PRESETS: dict[str, Rules] = {
    # Every parameter replicated; the batch is split over data (and fsdp, if the mesh has one).
    "dp": (_BATCH,),
    # ZeRO-3: parameters (and so gradients and optimizer state) split along `embed` over fsdp,
    # gathered one layer at a time inside the scan.
    "fsdp": (_BATCH, ("embed", ("fsdp",))),
    # Megatron: attention heads, MLP hidden and vocabulary split over tensor.
    "tp": (_BATCH, ("heads", ("tensor",)), ("kv_heads", ("tensor",)), ("mlp", ("tensor",)),
           ("vocab", ("tensor",))),
    "fsdp_tp": (_BATCH, ("embed", ("fsdp",)), ("heads", ("tensor",)), ("kv_heads", ("tensor",)),
                ("mlp", ("tensor",)), ("vocab", ("tensor",))),
}
# The 3-D hybrid is the same table as fsdp_tp: `batch` also spans `data`, so any data axis > 1 adds
# pure replication on top of FSDP x TP.
RULE_PRESETS["dp_fsdp_tp"] = RULE_PRESETS["fsdp_tp"]

# Sequence (context) parallelism: activations split along `length` over `sequence`; parameters are
# not split by it (each sequence shard holds the weights its other axes give it). Added to any table
# when the mesh has a sequence axis > 1; the `sp` presets name it so a table reads whole.
SEQUENCE_RULES: Rules = (("length", ("sequence",)),)
RULE_PRESETS["sp"] = RULE_PRESETS["dp"] + SEQUENCE_RULES
RULE_PRESETS["fsdp_sp"] = RULE_PRESETS["fsdp"] + SEQUENCE_RULES
RULE_PRESETS["fsdp_sp_tp"] = RULE_PRESETS["fsdp_tp"] + SEQUENCE_RULES

# One 8-device mesh per preset: what launch.bench --presets and the docs' pictures use.
EXAMPLE_MESHES_8: dict[str, dict[str, int]] = {
    "dp": dict(stage=1, data=8, fsdp=1, sequence=1, tensor=1),
    "fsdp": dict(stage=1, data=1, fsdp=8, sequence=1, tensor=1),
    "tp": dict(stage=1, data=2, fsdp=1, sequence=1, tensor=4),
    "fsdp_tp": dict(stage=1, data=1, fsdp=2, sequence=1, tensor=4),
    "dp_fsdp_tp": dict(stage=1, data=2, fsdp=2, sequence=1, tensor=2),
    "sp": dict(stage=1, data=1, fsdp=1, sequence=8, tensor=1),
    "fsdp_sp": dict(stage=1, data=1, fsdp=2, sequence=4, tensor=1),
    "fsdp_sp_tp": dict(stage=1, data=1, fsdp=2, sequence=2, tensor=2)}


def preset_for_mesh(shape: dict[str, int]) -> str:
  """The rule preset a mesh shape implies: which of fsdp, sequence and tensor are split (data adds
  replication)."""
  fsdp, tensor = shape.get("fsdp", 1) > 1, shape.get("tensor", 1) > 1
  if shape.get("sequence", 1) > 1:
    # (With tensor but no fsdp, dp's table plus the sequence rule is tp's: "tp" gets it added.)
    if tensor and not fsdp:
      return "tp"
    return "fsdp_sp_tp" if fsdp and tensor else "fsdp_sp" if fsdp else "sp"
  if fsdp and tensor:
    return "dp_fsdp_tp" if shape.get("data", 1) > 1 else "fsdp_tp"
  return "fsdp" if fsdp else "tp" if tensor else "dp"


# Every logical name the model uses (lm/transformer.py, lm/layers.py).
LOGICAL_NAMES = ("batch", "length", "embed", "heads", "kv_heads", "kv", "mlp", "vocab", "layers", "stage")


# Pipeline stages (sharding/pipeline.py): the stacked layers and the pipeline's stage buffers are
# split over `stage`; added to any table when the mesh has more than one stage.
STAGE_RULES: Rules = (("layers", ("stage",)), ("stage", ("stage",)))


def get_rules(name: str, custom: str = "", pipelined: bool = False, sequenced: bool = False) -> Rules:
  """Returns the rule table: `custom` parsed when non-empty, else the preset called `name`, plus the
  stage rules when `pipelined` and the sequence rule when `sequenced` (a mesh with sequence > 1),
  each only where the table does not place those names itself.

  Raises ValueError listing the presets for an unknown name.
  """
  if custom:
    rules = parse_rules(custom)
  elif name not in RULE_PRESETS:
    raise ValueError(f"mesh.rules={name!r} is not a rule preset; choose one of {sorted(RULE_PRESETS)}.")
  else:
    rules = RULE_PRESETS[name]
  added = (STAGE_RULES if pipelined else ()) + (SEQUENCE_RULES if sequenced else ())
  placed = {logical for logical, _ in rules}
  return rules + tuple(rule for rule in added if rule[0] not in placed)


def parse_rules(text: str) -> Rules:
  """Parses "batch=data+fsdp,embed=fsdp,heads=tensor" into a rule table.

  A name may map to nothing ("vocab=") to stay unsplit. Raises ValueError naming an unknown logical
  name or mesh axis.
  """
  rules = []
  for item in filter(None, (part.strip() for part in text.split(","))):
    if "=" not in item:
      raise ValueError(f"mesh.custom_rules item {item!r} is not 'logical=axis[+axis]'.")
    name, axes_text = (x.strip() for x in item.split("=", 1))
    if name not in LOGICAL_NAMES:
      raise ValueError(f"mesh.custom_rules names {name!r}, which the model does not use; "
                       f"logical names: {list(LOGICAL_NAMES)}.")
    axes = tuple(a.strip() for a in axes_text.split("+") if a.strip())
    for axis in axes:
      if axis not in MESH_AXES:
        raise ValueError(f"mesh.custom_rules maps {name!r} to {axis!r}, which is not a mesh axis; "
                         f"mesh axes: {list(MESH_AXES)}.")
    rules.append((name, axes))
  return tuple(rules)


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """Maps one logical name per dimension to a PartitionSpec.

  A mesh axis is used at most once per array: a later dimension whose rule names an axis already
  taken stays unsplit along it (so activations [batch, length, embed] under FSDP split only batch).
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in names:
    axes = tuple(a for a in table.get(name, ()) if a not in used) if name else ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


def spec_divisibility_errors(path: str, shape: Sequence[int], names: Sequence[str | None],
                             spec: PartitionSpec, mesh_shape: dict[str, int]) -> list[str]:
  """Returns a message for each dimension of `shape` that the mesh axes in `spec` do not divide."""
  errors = []
  for dim, (size, name, axes) in enumerate(zip(shape, names, tuple(spec) + (None,) * len(shape))):
    axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    split = math.prod(mesh_shape[a] for a in axes)
    if split > 1 and size % split:
      axes_text = " x ".join(f"mesh.{a}={mesh_shape[a]}" for a in axes)
      errors.append(
          f"{path}: dimension {dim} ('{name}', size {size}) cannot be split over {axes_text} "
          f"({split} shards); pick sizes that divide, or a rule table that leaves '{name}' unsplit.")
  return errors


def _is_names(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


def tree_specs(logical_tree, shapes_tree, mesh_shape: dict[str, int], rules: Rules):
  """Turns a tree of logical-name tuples into PartitionSpecs for a mesh of `mesh_shape`.

  `logical_tree` and `shapes_tree` have the same structure (tuples of names; arrays or
  ShapeDtypeStructs). Needs no devices, so a 1000-chip plan can be checked on a laptop. Raises
  ValueError listing every dimension the mesh does not divide.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(logical_tree, is_leaf=_is_names)
  shapes = treedef.flatten_up_to(shapes_tree)
  errors, specs = [], []
  for (path, names), array in zip(leaves, shapes):
    spec = logical_to_spec(names, rules)
    errors += spec_divisibility_errors(jax.tree_util.keystr(path), array.shape, names, spec, mesh_shape)
    specs.append(spec)
  if errors:
    raise ValueError("The rule table does not fit the model on this mesh:\n  " + "\n  ".join(errors))
  return jax.tree_util.tree_unflatten(treedef, specs)


def tree_shardings(logical_tree, shapes_tree, mesh: Mesh, rules: Rules):
  """Like `tree_specs`, returning NamedShardings on `mesh`."""
  specs = tree_specs(logical_tree, shapes_tree, dict(mesh.shape), rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))
