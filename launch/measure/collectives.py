"""Bytes a compiled program's collectives send per device, read from its HLO text.

Each collective is priced by the bandwidth-optimal algorithm for its kind (the cost model of the
scaling book, "How to Scale Your Model", Austin et al. 2025, and of NCCL's ring algorithms), with
n devices in its group and `size` the bytes of its result:

  collective-permute   size                   (each device sends its whole block once)
  all-gather           size * (n - 1) / n     (the other devices' shards)
  reduce-scatter       size * (n - 1)         (its operand is n shards; all but one leave)
  all-reduce           2 * size * (n - 1) / n (a reduce-scatter then an all-gather)
  all-to-all           size * (n - 1) / n

Synchronous collectives (what XLA:CPU emits) and the `-start` halves of asynchronous ones (GPU and
TPU programs; the `-done` half is not counted again) are read; an async start's result is a tuple
(operand, result, ...), priced by its largest array. `collective_bytes` counts a collective inside a
while loop's body once; `collective_bytes_per_step` counts it once per iteration of every loop
around it (trip counts read from each loop's condition, `i < N`), as one step of a scanned model runs it.
"""

import collections
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
KINDS = ("collective-permute", "all-gather", "reduce-scatter", "all-reduce", "all-to-all")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(" + "|".join(KINDS) + r")(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{\{([\d,]+)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
# mesh['a'=2,'b'=4] {'b'}, or with the devices reordered: mesh[...], device_ids=([2,4]T(1,0)) {'b'}
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\S+)?\s*\{([^}]*)\}")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*condition=%?([\w.\-]+),\s*body=%?([\w.\-]+)")
_CALLS = re.compile(r"\b(?:calls|to_apply)=%?([\w.\-]+)")
_TRIP = re.compile(r"s32\[\]\S*\s+constant\((\d+)\)")


def _array_bytes(result_type: str) -> list[int]:
  sizes = []
  for dtype, dims in _SHAPE.findall(result_type):
    if dtype in _DTYPE_BYTES:
      count = 1
      for d in filter(None, dims.split(",")):
        count *= int(d)
      sizes.append(count * _DTYPE_BYTES[dtype])
  return sizes


def _group_size(line: str) -> int:
  if m := _EXPLICIT_GROUPS.search(line):
    return len(m.group(1).split(","))
  if m := _IOTA_GROUPS.search(line):
    return int(m.group(2))
  if m := _MESH_GROUPS.search(line):  # mesh['a'=1,'b'=4] {'b'}: the product of the named axes
    sizes = dict((k.strip("' "), int(v)) for k, v in (p.split("=") for p in m.group(1).split(",")))
    size = 1
    for axis in filter(None, (a.strip("' ") for a in m.group(2).split(","))):
      size *= sizes[axis]
    return size
  raise ValueError(f"cannot read the replica groups of: {line.strip()[:200]}")


def _sent_bytes(line: str) -> tuple[str, int] | None:
  """(kind, bytes one device sends) for an HLO line holding a collective, else None."""
  match = _OP.match(line)
  if not match:
    return None
  result_type, kind, started = match.groups()
  sizes = _array_bytes(result_type)
  size = max(sizes, default=0) if started else sum(sizes)
  if kind == "collective-permute":
    return kind, round(size)
  n = _group_size(line)
  return kind, round({"all-gather": size * (n - 1) / n, "reduce-scatter": size * (n - 1),
                      "all-reduce": 2 * size * (n - 1) / n, "all-to-all": size * (n - 1) / n}[kind])


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count": ops, "bytes": bytes sent per device}} for every collective kind in KINDS, each
  op of the program text counted once (see `collective_bytes_per_step` for loops)."""
  totals = {kind: collections.Counter() for kind in KINDS}
  for line in hlo_text.splitlines():
    found = _sent_bytes(line)
    if found:
      totals[found[0]]["count"] += 1
      totals[found[0]]["bytes"] += found[1]
  return {kind: {"count": c["count"], "bytes": c["bytes"]} for kind, c in totals.items()}


def collective_bytes_per_step(hlo_text: str) -> dict[str, dict[str, int]]:
  """Like `collective_bytes` for one execution of a compiled module's ENTRY: a collective in a while
  body counts once per iteration (nested loops multiply), one in a called computation once per call.

  Takes the text of `compiled.as_text()`; a loop whose trip count cannot be read (its condition holds
  not exactly one s32 constant) counts once.
  """
  totals = {kind: collections.Counter() for kind in KINDS}

  def count(line: str, times: int) -> bool:
    found = _sent_bytes(line)
    if found:
      totals[found[0]]["count"] += times
      totals[found[0]]["bytes"] += found[1] * times
    return bool(found)

  if not visit_per_step(hlo_text, count):
    return collective_bytes(hlo_text)
  return {kind: {"count": c["count"], "bytes": c["bytes"]} for kind, c in totals.items()}


def visit_per_step(hlo_text: str, visit_line) -> bool:
  """Calls `visit_line(line, times)` for every instruction one execution of the module's ENTRY runs,
  `times` being how often it runs: the product of the trip counts of the while loops around it.
  `visit_line` returns True when it consumed the line (its callees are then not entered).

  Returns False (visiting nothing) when the text has no ENTRY computation. A loop whose trip count
  cannot be read (its condition holds not exactly one s32 constant) counts once.
  """
  bodies, entry, name = {}, None, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      name = header.group(1)
      entry = name if line.startswith("ENTRY") else entry
      bodies[name] = []
    elif name is not None:
      bodies[name].append(line)
  if entry is None:
    return False
  trips = {comp: _TRIP.findall("\n".join(lines)) for comp, lines in bodies.items()}

  def visit(comp: str, times: int, depth: int = 0) -> None:
    for line in bodies.get(comp, ()):
      if visit_line(line, times):
        continue
      if (loop := _WHILE.search(line)) and depth < 32:
        trip = trips.get(loop.group(1), [])
        visit(loop.group(2), times * (int(trip[0]) if len(trip) == 1 else 1), depth + 1)
      elif depth < 32:
        for called in _CALLS.findall(line):
          visit(called, times, depth + 1)

  visit(entry, 1)
  return True
