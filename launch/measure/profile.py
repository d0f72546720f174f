"""Where a step's time goes: a jax.profiler trace's XLA ops, grouped into matmuls, communication and the rest.

The perfetto trace names each executed op (`hlo_op`); the compiled HLO tells what that op is: a
`dot`/`convolution` (or a fusion containing one) is a matmul, collectives are communication, the
rest is elementwise work, reductions, copies and control flow.
"""

import collections
import glob
import gzip
import json
import os
import re

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S.*?\s([a-z][\w\-]*)\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
                "all-reduce-start", "all-gather-start", "collective-permute-start")


def _parse_hlo(hlo_text: str):
  """Returns ({instruction: (opcode, called computations)}, {computation: [instructions]})."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and "=" not in line.split("{")[0]:
      current = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      name, opcode = match.groups()
      instructions[name] = (opcode, _CALLS.findall(line))
      computations[current].append(name)
  return instructions, computations


def classify_ops(hlo_text: str) -> dict[str, str]:
  """Maps every instruction name in the HLO to "matmul", "communication", "control" or "other"."""
  instructions, computations = _parse_hlo(hlo_text)
  memo: dict[str, bool] = {}

  def has_dot(computation: str, depth: int = 0) -> bool:
    if computation not in memo:
      memo[computation] = False
      memo[computation] = depth < 8 and any(
          instructions[i][0] in ("dot", "convolution") or
          (instructions[i][0] == "fusion" and any(has_dot(c, depth + 1) for c in instructions[i][1]))
          for i in computations.get(computation, ()))
    return memo[computation]

  kinds = {}
  for name, (opcode, called) in instructions.items():
    if opcode in ("while", "conditional", "call"):
      kinds[name] = "control"  # its body's ops are traced on their own; counting both would double
    elif opcode in ("dot", "convolution") or (opcode == "fusion" and any(has_dot(c) for c in called)):
      kinds[name] = "matmul"
    elif opcode in _COLLECTIVES:
      kinds[name] = "communication"
    else:
      kinds[name] = "other"
  return kinds


def summarize_trace(trace_dir: str, hlo_text: str, top: int = 10) -> dict:
  """Reads the newest perfetto trace under `trace_dir`; returns time per kind and the `top` ops.

  Durations are summed over every device thread, so with several simulated devices they add up to
  more than the wall-clock time; the shares are what matter.
  """
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}; was the trace written with "
                            "create_perfetto_trace=True?")
  with gzip.open(paths[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  kinds = classify_ops(hlo_text)
  by_kind, by_op = collections.Counter(), collections.Counter()
  for event in events:
    op = (event.get("args") or {}).get("hlo_op")
    if event.get("ph") != "X" or not op or kinds.get(op, "control") == "control":
      continue
    by_kind[kinds[op]] += event.get("dur", 0.0)
    by_op[(op, kinds[op])] += event.get("dur", 0.0)
  total = sum(by_kind.values()) or 1.0
  return {"trace": paths[-1], "total_us": total,
          "share": {k: v / total for k, v in by_kind.most_common()},
          "top_ops": [(op, kind, us, us / total) for (op, kind), us in by_op.most_common(top)]}


def profile_markdown(summary: dict, label: str, traced: str = "3 steps") -> str:
  """The output of `summarize_trace` as Markdown tables (share per kind of op, top ops); `traced`
  says what the trace covered."""
  lines = [f"## Where the step's time goes: {label}", "",
           "| kind | share of op time |", "|---|---|"]
  lines += [f"| {kind} | {share:.1%} |" for kind, share in summary["share"].items()]
  lines += ["", f"| top ops | kind | ms ({traced}, summed over threads) | share |", "|---|---|---|---|"]
  lines += [f"| {op} | {kind} | {us / 1e3:.1f} | {share:.1%} |" for op, kind, us, share in summary["top_ops"]]
  return "\n".join(lines) + "\n"
