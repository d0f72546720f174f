"""What sequence parallelism sends, and when the ring hides it: formula beside compiled HLO, and on paper.

  python -m launch.reproduce.sequence_cost --out docs/results

Writes three tables (each .md and .csv):

  sequence_cost     MEASURED on 8 simulated CPU devices (compile only): bytes each device sends per
                    attention layer, forward and backward, for the ring (`sharding/ring_attention.py`)
                    and for the all-gather strategy (`sharding/sequence.py:all_gather_attention`,
                    the one the model runs), from the compiled HLO's collectives
                    (`launch/measure/collectives.py`), beside the formula; and the compiled temp memory.
  sequence_overlap  ON PAPER: per ring step, one block's attention FLOPs against one K/V block's
                    transfer, and the length above which the transfer hides behind the compute, for an
                    H100 NVLink domain and a TPU v5p slice (nothing here ran on a GPU or TPU).
  sequence_balance  Causal balance: sub-blocks each device computes per ring step with masked-block
                    skipping, natural vs zigzag layout (counted from the masks), and the MEASURED
                    forward+backward time on this CPU with skipping on and off.
"""

import shlex
import statistics
import sys

from absl import flags

from launch.measure.collectives import collective_bytes
from launch.measure.tables import write_table
from launch.measure.timing import time_calls
from launch.run import chips, cli
from launch.run.devices import simulate_cpu_devices

flags.DEFINE_string("out", "docs/results", "Directory for sequence_{cost,overlap,balance}.{md,csv}.")
flags.DEFINE_integer("repeats", 5, "Timed forward+backward runs per point of the balance table.")
FLAGS = flags.FLAGS

SHARDS = (2, 4, 8)
# The measured shape (small: compile only) and the paper shape (configs/llama_1b.py's attention).
MEASURED = dict(batch=2, length=1024, heads=8, kv_heads=2, head_dim=64)
LLAMA_1B = dict(heads=32, kv_heads=8, head_dim=64)
META = 2 * 4  # int32 position and segment id travel with every token of a K/V block
H100, V5P = chips.chip_named("H100 SXM"), chips.chip_named("TPU v5p")
# Peak dense bf16 FLOP/s (spec sheets) and the bandwidth one ring hop gets, one direction
# (assumptions, cited in docs/sharding.md): H100 SXM NVLink 4 = 900 GB/s bidirectional per GPU
# through NVSwitch; TPU v5p ICI ~90 GB/s per link per direction, and a 1-D ring along one torus
# axis sends over one link.
PLATFORMS = (("H100 NVLink (paper)", H100.bf16_tflops * 1e12, 450e9),
             ("TPU v5p ICI, 1 link (paper)", V5P.bf16_tflops * 1e12, 90e9))


def formula_bytes(strategy: str, shards: int, batch: int, length: int, kv_heads: int,
                  head_dim: int, itemsize: int) -> tuple[int, int]:
  """(forward, backward) bytes one device sends per layer; K/V in `itemsize`, ring dK/dV in float32."""
  tokens = batch * length // shards                      # one device's chunk
  kv_block = 2 * tokens * kv_heads * head_dim * itemsize
  if strategy == "ring":
    forward = (shards - 1) * (kv_block + tokens * META)
    grads = 2 * tokens * kv_heads * head_dim * 4          # dK/dV accumulators travel in float32
    return forward, forward + shards * grads              # K/V again, then dK/dV n hops (home)
  # all-gather: (n-1)/n of the whole K/V (and ids); backward: a reduce-scatter of dK/dV.
  return (shards - 1) * (kv_block + tokens * META), (shards - 1) * kv_block


def _compile_texts(strategy: str, shards: int, dtype: str):
  """(forward HLO, forward+backward HLO, temp bytes of forward+backward) on `shards` CPU devices."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import AxisType, Mesh, PartitionSpec as P

  from lm import attention
  from sharding import sequence

  s = MEASURED
  mesh = Mesh(np.array(jax.devices()[:shards]), ("sequence",), axis_types=(AxisType.Auto,))
  heads, tokens = P(None, "sequence", None, None), P(None, "sequence")

  def gathered(q, k, v, pos, seg):
    return sequence.all_gather_attention(q, k, v, pos, seg, attend=attention.xla_attention)

  def ring(q, k, v, pos, seg):
    return sequence.ring_attention_block(q, k, v, pos, seg)

  body = jax.shard_map(ring if strategy == "ring" else gathered, mesh=mesh,
                       in_specs=(heads, heads, heads, tokens, tokens), out_specs=heads)
  loss = lambda q, k, v, pos, seg: jnp.sum(body(q, k, v, pos, seg).astype(jnp.float32))
  q = jax.ShapeDtypeStruct((s["batch"], s["length"], s["heads"], s["head_dim"]), dtype)
  kv = jax.ShapeDtypeStruct((s["batch"], s["length"], s["kv_heads"], s["head_dim"]), dtype)
  ids = jax.ShapeDtypeStruct((s["batch"], s["length"]), jnp.int32)
  forward = jax.jit(loss).lower(q, kv, kv, ids, ids).compile()
  both = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, kv, kv, ids, ids).compile()
  return forward.as_text(), both.as_text(), both.memory_analysis().temp_size_in_bytes


def cost_rows() -> list[dict]:
  """MEASURED (CPU HLO) against formula bytes per device per layer, ring vs all-gather."""
  rows = []
  for dtype, itemsize in (("float32", 4), ("bfloat16", 2)):
    for strategy in ("ring", "all-gather"):
      for n in SHARDS:
        forward_hlo, both_hlo, temp = _compile_texts(strategy, n, dtype)
        # The loss's scalar all-reduce is not attention's; count what moves K/V and their grads.
        moved = lambda text: sum(v["bytes"] for k, v in collective_bytes(text).items() if k != "all-reduce")
        fwd, both = moved(forward_hlo), moved(both_hlo)
        f_fwd, f_bwd = formula_bytes(strategy, n, MEASURED["batch"], MEASURED["length"],
                                     MEASURED["kv_heads"], MEASURED["head_dim"], itemsize)
        rows.append({"strategy": strategy, "dtype": dtype, "sequence": n,
                     "formula_fwd_bytes": f_fwd, "hlo_fwd_bytes": fwd,
                     "formula_bwd_bytes": f_bwd, "hlo_bwd_bytes": both - fwd,
                     "held_kv_blocks": 2 if strategy == "ring" else n,
                     "temp_MiB": temp / 2 ** 20})
        print(rows[-1], flush=True)
  return rows


def overlap_rows() -> list[dict]:
  """ON PAPER: the local chunk length above which one K/V hop hides behind one block's compute.

  Per ring step a device computes its Lc queries against one block of Lc keys: forward
  4 B Lc^2 N K FLOPs (QK^T and PV), backward 10 B Lc^2 N K (QK^T again, dV, dP, dQ, dK), times the
  fraction f of sub-blocks computed (1, or 1/2 with zigzag + skipping off the diagonal), while it
  sends B Lc (2 G K e + 8) bytes forward, B Lc (2 G K (e + 4) + 8) backward (dK/dV in float32).
  Hidden when FLOPs / peak >= bytes / bandwidth (the scaling book's roofline); Lc cancels B:
  Lc >= peak / bandwidth x bytes_per_token / (FLOPs per token pair).
  """
  s, itemsize, rows = LLAMA_1B, 2, []
  for platform, peak, bandwidth in PLATFORMS:
    for fraction, blocks in ((1.0, "all"), (0.5, "half (zigzag, skip)")):
      for pass_name, flops_pair, bytes_token in (
          ("forward", 4, 2 * s["kv_heads"] * s["head_dim"] * itemsize + META),
          ("backward", 10, 2 * s["kv_heads"] * s["head_dim"] * (itemsize + 4) + META)):
        per_query = flops_pair * fraction * s["heads"] * s["head_dim"]  # FLOPs per (q, k) pair
        local = peak / bandwidth * bytes_token / per_query
        lc = 32768 // 8  # 32k tokens on sequence=8
        rows.append({"platform": platform, "pass": pass_name, "blocks computed": blocks,
                     "min_local_len": round(local), "min_len_seq2": round(2 * local),
                     "min_len_seq4": round(4 * local), "min_len_seq8": round(8 * local),
                     "32k_seq8_compute_us": flops_pair * fraction * lc * lc * s["heads"] * s["head_dim"] / peak * 1e6,
                     "32k_seq8_transfer_us": lc * bytes_token / bandwidth * 1e6})
  return rows


def computed_sub_blocks(shards: int, layout: str) -> tuple[int, int]:
  """(critical path, total) of sub-blocks computed in the forward ring with skipping, from the masks.

  Each device's chunk is cut in two sub-chunks (the zigzag's front and back chunk); a (query
  sub-chunk, key sub-chunk) pair is computed unless every query precedes every key. The ring is
  synchronous, so its time follows the sum over steps of the busiest device's count.
  """
  import numpy as np
  from sharding.zigzag import zigzag_order

  length = 4 * shards
  order = zigzag_order(length, shards) if layout == "zigzag" else np.arange(length)
  chunks = order.reshape(shards, 2, 2)  # [device, sub-chunk, positions]
  critical = total = 0
  for step in range(shards):
    counts = [sum(chunks[i, a].max() >= chunks[(i - step) % shards, b].min() for a in range(2) for b in range(2))
              for i in range(shards)]
    critical, total = critical + max(counts), total + sum(counts)
  return int(critical), int(total)


def _time_ring(shards: int, layout: str, skip: bool, repeats: int) -> float:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import AxisType, Mesh

  from sharding import ring_attention, zigzag

  batch, length, heads, kv_heads, head_dim = 1, 2048, 8, 2, 64
  mesh = Mesh(np.array(jax.devices()[:shards]), ("sequence",), axis_types=(AxisType.Auto,))
  rng = np.random.default_rng(0)
  q = rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32)
  k, v = (rng.normal(size=(batch, length, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
  pos = np.arange(length, dtype=np.int32)[None]
  if layout == "zigzag":
    q, k, v, pos = (zigzag.to_zigzag(x, shards) for x in (q, k, v, pos))
  loss = lambda q, k, v: jnp.sum(ring_attention.ring_attention(q, k, v, pos, mesh=mesh, skip_masked=skip))
  step = jax.jit(jax.grad(loss, (0, 1, 2)))
  return statistics.median(time_calls(lambda: step(q, k, v), repeats))


def balance_rows(repeats: int) -> list[dict]:
  rows = []
  for n in SHARDS:
    for layout in ("natural", "zigzag"):
      critical, total = computed_sub_blocks(n, layout)
      row = {"sequence": n, "layout": layout, "sub_blocks_no_skip": 4 * n,
             "critical_path_sub_blocks": critical, "total_sub_blocks_per_device": total / n}
      if n == 8:
        with_skip, without = (_time_ring(n, layout, s, repeats) for s in (True, False))
        row |= {"cpu_fwd_bwd_skip_s": with_skip, "cpu_fwd_bwd_no_skip_s": without,
                "cpu_no_skip_over_skip_x": without / with_skip}
      else:
        row |= {"cpu_fwd_bwd_skip_s": "", "cpu_fwd_bwd_no_skip_s": "", "cpu_no_skip_over_skip_x": ""}
      rows.append(row)
      print(rows[-1], flush=True)
  return rows


def main(argv):
  del argv
  cli.quiet_logs()
  simulate_cpu_devices(8)
  command = "python -m launch.reproduce.sequence_cost " + shlex.join(sys.argv[1:])
  s = MEASURED
  print(write_table(
      cost_rows(), FLAGS.out, "sequence_cost",
      "Bytes sent per device per attention layer: ring vs all-gather of K/V (MEASURED: CPU HLO)", command,
      f"MEASURED on 8 simulated CPU devices, compile only: batch {s['batch']}, length {s['length']} (whole "
      f"sequence), {s['heads']} query / {s['kv_heads']} kv heads of {s['head_dim']}. hlo_*: the compiled "
      "program's collective-permute, all-gather and reduce-scatter bytes per device "
      "(launch/measure/collectives.py; backward = forward+backward program minus forward program). "
      "formula_*: ring forward (n-1) K/V blocks (+ int32 positions and segment ids), backward the "
      "same plus n hops of float32 dK/dV; all-gather forward (n-1)/n of K/V and ids, backward a "
      "reduce-scatter of dK/dV. XLA:CPU converts bfloat16 collectives to float32 before sending, so "
      "the bfloat16 rows measure more than the formula (which counts bfloat16 on the wire; GPU and TPU "
      "programs were not checked). At sequence=2 the "
      "backward ring's hop is the forward's (both directions are the one pair), so XLA merges them "
      "(CSE) and the backward reuses the K/V block received in the forward: one hop fewer than the "
      "formula, same memory (a device holds that block anyway). In a model whose layers run in a "
      "scan the two rings sit in different loops and cannot merge (not measured here). held_kv_blocks: "
      "K/V blocks a device holds at once (ring: its own and the arriving one). temp_MiB: the "
      "forward+backward program's temporaries per device (memory_analysis(), CPU)."))
  print(write_table(
      overlap_rows(), FLAGS.out, "sequence_overlap",
      "When the ring hides its communication: llama_1b attention, bfloat16 (ON PAPER, not measured)", command,
      "ON PAPER (no GPU or TPU ran): 32 query / 8 kv heads of 64, peak dense bf16 FLOP/s "
      f"(H100 SXM {H100.bf16_tflops:.0f} T, TPU v5p {V5P.bf16_tflops:.0f} T) and one-direction hop "
      "bandwidth (H100: 450 GB/s NVLink 4 through NVSwitch; v5p: 90 GB/s, one ICI link per "
      "direction, as a 1-D ring along one torus axis uses). "
      "min_local_len: the chunk per device above which one block's compute time exceeds one K/V hop "
      "(method of the scaling book, 'How to Scale Your Model', Austin et al. 2025: compute time = "
      "FLOPs / peak against transfer time = bytes / bandwidth, overlapped); min_len_seqN: the "
      "sequence length that gives that chunk on N devices. Real kernels reach below peak, which "
      "makes hiding easier; these are the lengths at peak."))
  print(write_table(
      balance_rows(FLAGS.repeats), FLAGS.out, "sequence_balance",
      "Causal balance: sub-blocks computed per ring step, natural vs zigzag layout", command,
      "critical_path_sub_blocks: sum over the forward ring's steps of the busiest device's computed "
      "(query half, key half) sub-blocks with skip_masked=True, counted from the masks (the ring "
      "waits for its slowest device at every hop); without skipping every device computes "
      "sub_blocks_no_skip. cpu_*: MEASURED median forward+backward seconds of one ring attention "
      "(batch 1, length 2048, 8/2 heads of 64, float32) on 8 simulated CPU devices sharing this "
      "2-core host, so it follows the total work, not the critical path."))


if __name__ == "__main__":
  cli.run(main)
