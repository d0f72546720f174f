"""Attention across a sequence split over the `sequence` mesh axis (mesh.sequence > 1).

Every layer except attention works on its own tokens, so GSPMD splits them along `length` with no
communication. Attention needs every earlier key of each query; two strategies bring the keys
(`mesh.sequence_attention`, docs/sharding.md):

  * `all_gather`: each device gathers all keys and values (and their positions and segment ids)
    along `sequence`, then attends its local queries to them with a mask built from positions and
    segment ids. Simple; each device holds the whole sequence's K/V and an [L/N, L] score block.
  * `ring`: key/value blocks travel around the ring with `ppermute` under an online softmax
    (`sharding/ring_attention.py`), so no device holds more than two blocks; with the step's
    zigzag layout (`sharding/zigzag.py`) every device does the same causal work. Each block runs
    through the kernel the run plan chose (`lm.attention_plan.select_sequence_block`: Pallas splash on
    TPU, XLA otherwise).

Both run inside one `shard_map` over the whole mesh, so batch and heads stay split as the rule
table says. The mask comes from each token's position, not its index: after the zigzag reordering
a device's queries are not at the start of the sequence, and within one document (a run of equal
segment ids, which increase along a row) positions increase with the index, so the two orders agree.

Shape suffixes: B batch, L local (per-device) length, S all keys' length, N query heads, G kv heads,
K head dim.
"""

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from sharding import ring_attention
from sharding import rules as rules_lib

STRATEGIES = ("ring", "all_gather")  # mesh.sequence_attention
AXIS = "sequence"

# (q [B, L, N, K], k, v [B, S, G, K], mask bool [B, L, S], recompute=bool) -> [B, L, N, K]
MaskedAttention = Callable[..., jax.Array]

def length_multiple(strategy: str, shards: int) -> int:
  """What data.seq_len must be a multiple of: 2N for the ring's balanced layout, N for all-gather."""
  return 2 * shards if strategy == "ring" and shards > 1 else shards


def all_gather_attention(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, positions_BxL, segments_BxL, *,
                         attend: MaskedAttention, recompute: bool = False, axis_name: str = AXIS):
  """One device's attention under `shard_map`: its queries against every device's keys.

  Gathers K, V, positions and segment ids along `axis_name` (tiled: [B, S = N*L, ...]); a query
  sees a key of its own segment at a position no later than its own. Returns [B, L, N, K].
  """
  gather = lambda x: jax.lax.all_gather(x, axis_name, axis=1, tiled=True)
  k_BxSxGxK, v_BxSxGxK, key_positions_BxS, key_segments_BxS = map(
      gather, (k_BxLxGxK, v_BxLxGxK, positions_BxL, segments_BxL))
  mask_BxLxS = ((segments_BxL[:, :, None] == key_segments_BxS[:, None, :])
                & (positions_BxL[:, :, None] >= key_positions_BxS[:, None, :]))
  return attend(q_BxLxNxK, k_BxSxGxK, v_BxSxGxK, mask_BxLxS, recompute=recompute)


def ring_attention_block(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, positions_BxL, segments_BxL, *,
                         recompute: bool = False, axis_name: str = AXIS, kernel: str = "xla",
                         layout: str = "natural", interpret: bool = False):
  """One device's ring attention under `shard_map` (sharding/ring_attention.py), each block through
  `kernel` (xla | splash, which reads `layout`; `interpret` runs splash in Pallas' interpreter);
  `recompute` is ignored (the ring's backward pass recomputes each block's scores anyway).
  Returns [B, L, N, K]."""
  del recompute
  return ring_attention.ring_attention_shard(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, positions_BxL, positions_BxL,
                              segments_BxL, segments_BxL, axis_name=axis_name, kernel=kernel,
                              layout=layout, interpret=interpret)


def check_rules(rules: rules_lib.Rules) -> None:
  """Raises ValueError unless the table splits activations' `length` over `sequence` alone (what a
  mesh with sequence > 1 needs; `get_rules(..., sequenced=True)` adds it unless a custom table
  places `length` itself)."""
  placed = rules_lib.logical_to_spec(("batch", "length"), rules)[1]
  if placed != AXIS:
    raise ValueError(f"mesh.sequence > 1 needs the rule table to split 'length' over '{AXIS}' alone, but "
                     f"it gives {placed!r}; write length={AXIS} in mesh.custom_rules (or leave length out).")


def sequence_attention_fn(mesh: Mesh, rules: rules_lib.Rules, attend: MaskedAttention):
  """The function `lm.axes.use_sequence_attention` installs: how attention of `length`-split arrays
  reaches the mesh, and nothing the model decides.

  `attend` is the masked attention the all-gather strategy runs on each device's block
  (lm.attention.xla_attention). The returned fn(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, positions_BxL,
  segment_ids_BxL or None, *, strategy, block_kernel, layout, interpret, recompute) takes and
  returns global arrays and runs each device's part in a shard_map with batch, length and heads
  split by `rules`; the keyword arguments are the calling model's attention plan (strategy: one
  of STRATEGIES; under the ring each block runs through `block_kernel`, xla | splash, reading the
  sequences' `layout`, natural | zigzag; `interpret` runs splash in Pallas' interpreter).
  """
  check_rules(rules)
  spec = lambda names: rules_lib.logical_to_spec(names, rules)
  q_spec = spec(("batch", "length", "heads", None))
  kv_spec = spec(("batch", "length", "kv_heads", None))
  row_spec = spec(("batch", "length"))

  def fn(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, positions_BxL, segment_ids_BxL=None, *, strategy: str,
         block_kernel: str = "xla", layout: str = "natural", interpret: bool = False, recompute=False):
    if strategy not in STRATEGIES:
      raise ValueError(f"mesh.sequence_attention={strategy!r}: choose one of {list(STRATEGIES)}.")
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.zeros(q_BxLxNxK.shape[:2], jnp.int32)
    positions_BxL = jnp.broadcast_to(positions_BxL, q_BxLxNxK.shape[:2]).astype(jnp.int32)
    if strategy == "ring":
      body = lambda *a: ring_attention_block(*a, recompute=recompute, kernel=block_kernel, layout=layout,
                                             interpret=interpret)
    else:
      body = lambda *a: all_gather_attention(*a, attend=attend, recompute=recompute)
    run = jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec),
                        out_specs=q_spec, check_vma=False)
    return run(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, positions_BxL, segment_ids_BxL.astype(jnp.int32))

  return fn
