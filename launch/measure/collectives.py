"""Bytes a compiled program's collectives send per device, read from its HLO text.

Each collective is priced by the bandwidth-optimal algorithm for its kind (the cost model of the
scaling book, "How to Scale Your Model", Austin et al. 2025, and of NCCL's ring algorithms), with
n devices in its group and `size` the bytes of its result:

  collective-permute   size                   (each device sends its whole block once)
  all-gather           size * (n - 1) / n     (the other devices' shards)
  reduce-scatter       size * (n - 1)         (its operand is n shards; all but one leave)
  all-reduce           2 * size * (n - 1) / n (a reduce-scatter then an all-gather)
  all-to-all           size * (n - 1) / n

Only synchronous collectives are read (what XLA:CPU emits); the `-start`/`-done` pairs of GPU and
TPU programs are not. A collective inside a while loop's body counts once, not once per iteration.
"""

import collections
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
KINDS = ("collective-permute", "all-gather", "reduce-scatter", "all-reduce", "all-to-all")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(" + "|".join(KINDS) + r")\(")
_SHAPE = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{\{([\d,]+)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")


def _result_bytes(result_type: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(result_type):
    if dtype in _DTYPE_BYTES:
      count = 1
      for d in filter(None, dims.split(",")):
        count *= int(d)
      total += count * _DTYPE_BYTES[dtype]
  return total


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


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count": ops, "bytes": bytes sent per device}} for every collective kind in KINDS."""
  totals = {kind: collections.Counter() for kind in KINDS}
  for line in hlo_text.splitlines():
    match = _OP.match(line)
    if not match:
      continue
    result_type, kind = match.groups()
    size = _result_bytes(result_type)
    if kind == "collective-permute":
      sent = size
    else:
      n = _group_size(line)
      sent = {"all-gather": size * (n - 1) / n, "reduce-scatter": size * (n - 1),
              "all-reduce": 2 * size * (n - 1) / n, "all-to-all": size * (n - 1) / n}[kind]
    totals[kind]["count"] += 1
    totals[kind]["bytes"] += round(sent)
  return {kind: {"count": c["count"], "bytes": c["bytes"]} for kind, c in totals.items()}
