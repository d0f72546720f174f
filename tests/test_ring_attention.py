"""sharding/ring_attention.py: ring attention (forward and custom backward) equals dense attention on
one device, for sequence=2/4/8, GQA, documents that cross shard boundaries, the natural and the
zigzag layout, with batch and heads split too; the zigzag permutation and the length errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec as P

from sharding import ring_attention as ra
from sharding import zigzag

B, L, N, G, K = 2, 32, 4, 2, 8  # batch, total length, query heads, kv heads (GQA), head dim


def dense_reference(q, k, v, segments):
  """Plain causal + document-masked softmax attention on one device, GQA by repeating K/V."""
  kr, vr = (jnp.repeat(x, N // G, axis=2) for x in (k, v))
  scores = jnp.einsum("blnk,bsnk->bnls", q, kr) / np.sqrt(K)
  pos = jnp.arange(q.shape[1])
  mask = (pos[:, None] >= pos[None, :]) & (segments[:, :, None] == segments[:, None, :])
  probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -jnp.inf), axis=-1)
  return jnp.einsum("bnls,bsnk->blnk", probs, vr)


@functools.cache
def problem():
  """Inputs, a cotangent, and the reference output and (q, k, v) gradients."""
  rng = np.random.default_rng(0)
  q = rng.normal(size=(B, L, N, K)).astype(np.float32)
  k, v = (rng.normal(size=(B, L, G, K)).astype(np.float32) for _ in range(2))
  cotangent = rng.normal(size=(B, L, N, K)).astype(np.float32)
  # Documents of 5, 20, 7 and 17, 15 tokens: they cross the chunk boundaries of every N tested.
  segments = np.stack([np.repeat([0, 1, 2], [5, 20, 7]), np.repeat([3, 4], [17, 15])]).astype(np.int32)
  positions = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy()
  out, vjp = jax.vjp(lambda q, k, v: dense_reference(q, k, v, segments), q, k, v)
  return (q, k, v, positions, segments, cotangent), (np.asarray(out), *map(np.asarray, vjp(cotangent)))


def mesh_of(shape: dict) -> Mesh:
  devices = np.array(jax.devices()[:int(np.prod(list(shape.values())))]).reshape(tuple(shape.values()))
  return Mesh(devices, tuple(shape), axis_types=(AxisType.Auto,) * len(shape))


@functools.cache
def ring_and_vjp(mesh_shape: tuple, batch_axes, head_axis, block_size: int = 512):
  """One jitted (out, dq, dk, dv) per mesh and key chunk: both layouts reuse it (only the data
  differ). The default chunk is larger than these tiny blocks, so those runs are untiled."""
  mesh = mesh_of(dict(mesh_shape))

  def run(q, k, v, positions, segments, cotangent):
    attend = lambda q, k, v: ra.ring_attention(q, k, v, positions, segments, mesh=mesh,
                                               batch_axes=batch_axes, head_axis=head_axis,
                                               block_size=block_size)
    out, vjp = jax.vjp(attend, q, k, v)
    return (out, *vjp(cotangent))
  return jax.jit(run)


def check(run, shards: int, layout: str):
  inputs, expected = problem()
  if layout == "zigzag":  # every input reordered along length; results put back before comparing
    got = run(*(zigzag.to_zigzag(x, shards) for x in inputs))
    got = [zigzag.from_zigzag(np.asarray(x), shards) for x in got]
  else:
    got = run(*inputs)
  for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
    np.testing.assert_allclose(np.asarray(g), e, rtol=2e-5, atol=2e-6, err_msg=f"{name} ({layout})")


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_ring_equals_dense_forward_and_gradients(shards):
  run = ring_and_vjp((("sequence", shards),), None, None)
  for layout in ("natural", "zigzag"):
    check(run, shards, layout)


def test_key_chunks_smaller_than_the_block_equal_dense():
  # sequence=2: 16 local tokens, sub-blocks of 8 keys folded 2 at a time by the scan (4 chunks, some
  # of them fully masked and skipped, some split by a document boundary), forward and backward.
  # block_size=3 is not a divisor of 8: the chunk becomes 2 (the largest divisor <= 3).
  assert ra.chunk_size(8, 3) == 2 and ra.chunk_size(8, 512) == 8 and ra.chunk_size(7, 4) == 1
  run = ring_and_vjp((("sequence", 2),), None, None, block_size=3)
  for layout in ("natural", "zigzag"):
    check(run, 2, layout)
  x = np.zeros((1, 32, 2, 8), np.float32)
  with pytest.raises(ValueError, match="block_size must be >= 1.*got 0"):
    ra.ring_attention(x, x, x, np.zeros((1, 32), np.int32), mesh=mesh_of({"sequence": 2}), block_size=0)


def test_ring_with_batch_and_heads_split():
  # data=2 x sequence=2 x tensor=2: batch over data, query and kv heads over tensor (G=2 -> 1 local).
  run = ring_and_vjp((("data", 2), ("sequence", 2), ("tensor", 2)), "data", "tensor")
  for layout in ("natural", "zigzag"):
    check(run, 2, layout)


def test_shard_body_without_vma_check_and_without_skipping():
  # How a model step calls it: its own shard_map, check_vma=False, every block computed.
  shards = 4
  mesh = mesh_of({"sequence": shards})
  heads, tokens = P(None, "sequence", None, None), P(None, "sequence")
  body = lambda q, k, v, pos, seg: ra.ring_attention_shard(
      q, k, v, pos, pos, seg, seg, axis_name="sequence", skip_masked=False)
  attend_sharded = jax.shard_map(body, mesh=mesh, in_specs=(heads, heads, heads, tokens, tokens),
                                 out_specs=heads, check_vma=False)

  @jax.jit
  def run(q, k, v, positions, segments, cotangent):
    out, vjp = jax.vjp(lambda q, k, v: attend_sharded(q, k, v, positions, segments), q, k, v)
    return (out, *vjp(cotangent))
  check(run, shards, "zigzag")


def test_zigzag_order():
  np.testing.assert_array_equal(zigzag.zigzag_order(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
  order = zigzag.zigzag_order(48, 4)
  np.testing.assert_array_equal(np.sort(order), np.arange(48))
  np.testing.assert_array_equal(order[zigzag.zigzag_inverse(48, 4)], np.arange(48))
  # Shard i (6 * 2 tokens each) holds chunk i and chunk 7 - i: equal causal work for every shard.
  work = [sum(p + 1 for p in order[12 * i:12 * (i + 1)]) for i in range(4)]
  assert len(set(work)) == 1


def test_length_errors():
  with pytest.raises(ValueError, match=r"divisible by 2 x mesh.sequence = 2 x 4 = 8.*L=36"):
    zigzag.zigzag_order(36, 4)
  x = np.zeros((1, 30, 2, 8), np.float32)
  with pytest.raises(ValueError, match="L=30 must be divisible by mesh.sequence=4"):
    ra.ring_attention(x, x, x, np.zeros((1, 30), np.int32), mesh=mesh_of({"sequence": 4}))


def test_compiled_ring_sends_what_the_formula_says():
  # The N=4 program above, read back from its HLO: forward (n-1) hops of K/V and int32 ids, backward
  # the same again (the other way round) plus n hops of float32 dK/dV. No all-gather anywhere.
  from launch.measure.collectives import collective_bytes
  shards, tokens = 4, B * L // 4
  inputs, _ = problem()
  hlo = ring_and_vjp((("sequence", shards),), None, None).lower(*inputs).compile().as_text()
  sent = collective_bytes(hlo)
  kv_hop, ids_hop = 2 * tokens * G * K * 4, 2 * tokens * 4
  assert sent["collective-permute"]["bytes"] == 2 * (shards - 1) * (kv_hop + ids_hop) + shards * kv_hop
  assert sent["all-gather"]["count"] == sent["reduce-scatter"]["count"] == 0


def test_collective_bytes_prices_each_kind():
  from launch.measure.collectives import collective_bytes
  hlo = "\n".join([
      "  %a = f32[2,64]{1,0} all-gather(f32[2,16]{1,0} %x), replica_groups={{0,1,2,3}}, dimensions={1}",
      "  %b = bf16[2,16]{1,0} reduce-scatter(bf16[2,64]{1,0} %y), replica_groups=[2,4]<=[8], dimensions={1}",
      "  ROOT %c = f32[] all-reduce(f32[] %z), replica_groups=mesh['a'=2,'b'=4] {'b'}, to_apply=%add",
      "  %d = (s32[2,16]{1,0}, f32[8]{0}) collective-permute(%p, %q), source_target_pairs={{0,1},{1,0}}"])
  sent = collective_bytes(hlo)
  assert sent["all-gather"] == {"count": 1, "bytes": 2 * 64 * 4 * 3 // 4}
  assert sent["reduce-scatter"] == {"count": 1, "bytes": 2 * 16 * 2 * 3}
  assert sent["all-reduce"] == {"count": 1, "bytes": 6}  # 2 x 4 bytes x 3/4
  assert sent["collective-permute"] == {"count": 1, "bytes": 2 * 16 * 4 + 8 * 4}


def test_collectives_per_step_multiply_loop_bodies_and_read_tpu_forms():
  # A TPU-style module: an async all-gather in ENTRY, and an all-reduce (mesh groups with reordered
  # device ids) inside a while body whose condition runs it 3 times.
  from launch.measure.collectives import collective_bytes, collective_bytes_per_step
  hlo = "\n".join([
      "%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {",
      "  %r = f32[8]{0:T(128)} all-reduce(f32[8] %x), replica_groups=mesh['axis_0'=2,'axis_1'=4], "
      "device_ids=([2,4]T(1,0)) {'axis_1'}, to_apply=%add",
      "}",
      "%cond (p: (s32[], f32[8])) -> pred[] {",
      "  %c = s32[]{:T(128)} constant(3)",
      "  ROOT %lt = pred[] compare(%i, %c), direction=LT",
      "}",
      "ENTRY %main (a: bf16[2,16]) -> bf16[2,64] {",
      "  %ags = (bf16[2,16]{1,0}, bf16[2,64]{1,0}) all-gather-start(bf16[2,16]{1,0} %a), "
      "replica_groups=[2,4]<=[8], dimensions={1}",
      "  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body",
      "}"])
  once, per_step = collective_bytes(hlo), collective_bytes_per_step(hlo)
  gathered = 2 * 64 * 2 * 3 // 4          # the result's other 3 shards, bf16
  reduced = 2 * 8 * 4 * 3 // 4            # all-reduce of 8 floats over 4 devices
  assert once["all-gather"] == per_step["all-gather"] == {"count": 1, "bytes": gathered}
  assert once["all-reduce"] == {"count": 1, "bytes": reduced}
  assert per_step["all-reduce"] == {"count": 3, "bytes": 3 * reduced}


def test_bfloat16_inputs_stay_close_to_float32_reference():
  # The training dtype: bf16 q/k/v in, bf16 out, float32 statistics inside. Against the float32
  # reference the error is bf16 rounding (seen: <= 0.8% of the largest value), not a wrong block.
  shards = 4
  mesh = mesh_of({"sequence": shards})
  inputs, expected = problem()
  q, k, v, positions, segments, cotangent = inputs
  to_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)

  @jax.jit
  def run(q, k, v):
    attend = lambda q, k, v: ra.ring_attention(q, k, v, positions, segments, mesh=mesh)
    out, vjp = jax.vjp(attend, q, k, v)
    return (out, *vjp(to_bf16(cotangent)))
  got = run(to_bf16(q), to_bf16(k), to_bf16(v))
  assert [g.dtype for g in got] == [jnp.bfloat16] * 4
  for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
    scale = np.max(np.abs(e))
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, e / scale, atol=1.5e-2, err_msg=name)


def test_heads_that_do_not_split_are_an_error():
  q, kv = np.zeros((2, 32, 4, 8), np.float32), np.zeros((2, 32, 2, 8), np.float32)
  mesh = mesh_of({"sequence": 2, "tensor": 4})
  with pytest.raises(ValueError, match=r"kv heads \(2\) must be divisible .*'tensor'.*size 4"):
    ra.ring_attention(q, kv, kv, np.zeros((2, 32), np.int32), mesh=mesh, head_axis="tensor")


# ------------------------------------------------------------------------------------------------
# The platform kernel inside each block (sharding/ring_splash.py): Pallas splash attention, run in
# Pallas' interpreter on CPU, against the same dense reference. Splash tiles in blocks of 128, so
# each device's two sub-blocks hold 128 tokens here: L = 2 x N x 128.

@functools.cache
def splash_problem(shards: int, layout: str, rows: int):
  """Inputs in `layout` (positions restart in each document, as the model's do), a cotangent, and
  the reference (out, dq, dk, dv) in natural order; `rows` 1 or 2 (the interpreter is slow)."""
  length, heads, groups, head_dim = 2 * shards * 128, 4, 2, 64
  rng = np.random.default_rng(1)
  q = rng.normal(size=(rows, length, heads, head_dim)).astype(np.float32)
  k, v = (rng.normal(size=(rows, length, groups, head_dim)).astype(np.float32) for _ in range(2))
  cotangent = rng.normal(size=q.shape).astype(np.float32)
  # Documents that cross every chunk boundary, and a row that is one document.
  cuts = [0, 70, 300, 301, length]
  segments = np.stack([np.repeat(np.arange(4), np.diff(cuts)), np.zeros(length, int)])[:rows].astype(np.int32)
  starts = np.maximum.accumulate(np.where(np.diff(segments, prepend=-1, axis=1) != 0,
                                          np.arange(length), 0), axis=1)
  positions = (np.arange(length) - starts).astype(np.int32)

  def reference(q, k, v):
    kr, vr = (jnp.repeat(x, heads // groups, axis=2) for x in (k, v))
    scores = jnp.einsum("blnk,bsnk->bnls", q, kr) / np.sqrt(head_dim)
    index = jnp.arange(length)
    mask = (index[:, None] >= index[None, :]) & (segments[:, :, None] == segments[:, None, :])
    probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -jnp.inf), axis=-1)
    return jnp.einsum("bnls,bsnk->blnk", probs, vr)
  out, vjp = jax.vjp(reference, q, k, v)
  arrange = (lambda x: zigzag.to_zigzag(x, shards)) if layout == "zigzag" else np.asarray
  inputs = tuple(map(arrange, (q, k, v, positions, segments, cotangent)))
  return inputs, (np.asarray(out), *map(np.asarray, vjp(cotangent)))


@pytest.mark.parametrize("mesh_shape,batch_axes,head_axis,layout", [
    ((("sequence", 2),), None, None, "zigzag"),
    ((("sequence", 4),), None, None, "zigzag"),
    ((("sequence", 2),), None, None, "natural"),
    ((("data", 2), ("sequence", 2), ("tensor", 2)), "data", "tensor", "zigzag"),
])
def test_splash_blocks_equal_dense_forward_and_gradients(mesh_shape, batch_axes, head_axis, layout):
  shards = dict(mesh_shape)["sequence"]
  inputs, expected = splash_problem(shards, layout, rows=2 if batch_axes else 1)
  q, k, v, positions, segments, cotangent = inputs
  mesh = mesh_of(dict(mesh_shape))

  @jax.jit
  def run(q, k, v):
    attend = lambda q, k, v: ra.ring_attention(q, k, v, positions, segments, mesh=mesh,
                                               batch_axes=batch_axes, head_axis=head_axis,
                                               kernel="splash", layout=layout, interpret=True)
    out, vjp = jax.vjp(attend, q, k, v)
    return (out, *vjp(cotangent))
  back = (lambda x: zigzag.from_zigzag(x, shards)) if layout == "zigzag" else (lambda x: x)
  got = [back(np.asarray(x)) for x in run(q, k, v)]
  for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
    np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-5, err_msg=name)


def test_splash_blocks_need_whole_tiles():
  x = np.zeros((1, 2 * 2 * 96, 2, 64), np.float32)
  with pytest.raises(ValueError, match="blocks of 128.*holds 96 tokens.*multiple of 128"):
    ra.ring_attention(x, x, x, np.zeros((1, 384), np.int32), mesh=mesh_of({"sequence": 2}),
                      kernel="splash", interpret=True)
  with pytest.raises(ValueError, match="kernel='cudnn'; choose one of"):
    ra.ring_attention(x, x, x, np.zeros((1, 384), np.int32), mesh=mesh_of({"sequence": 2}), kernel="cudnn")
  with pytest.raises(ValueError, match="layout='striped'; choose one of"):
    ra.ring_attention(x, x, x, np.zeros((1, 384), np.int32), mesh=mesh_of({"sequence": 2}), layout="striped")
