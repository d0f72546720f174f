"""Generation speed: prefill tokens/s and decode ms/token per (weights, batch, prompt), beside the floor.

One decode step reads every weight once and the KV cache written so far, so at small batch its time
is bounded below by (weight bytes + KV bytes) / memory bandwidth: the memory floor. At large batch
its FLOPs bound it instead (2 per weight per row plus attention, over a matmul rate measured in the
same run): the compute floor. A row's floor is the larger. The bandwidth is the chip's spec sheet
where known (launch/run/chips.py) and, always, a device-to-device copy measured in the same run;
the floor uses the measured copy, so a ratio to it says how far the step is from what this machine
can stream. Weights are random (speed does not depend on their values); int8
weights come from `compress.quantize` applied to them, as `launch.quantize` would.
"""

import dataclasses
import statistics
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from compress.quantize import quantize_params, quantized_config
from launch.measure.timing import time_calls
from launch.run import chips
from launch.run import programs
from launch.run import state as ts
from launch.run.config import Config
from launch.run.plan import RunPlan, make_plan
from lm import flops, kv_cache
from lm.config import ModelConfig
from lm.serving import serving_params

Params = dict[str, Any]

def table_bandwidth(device_kind: str) -> float | None:
  """The spec-sheet HBM bandwidth (bytes/s) of `device_kind` (launch/run/chips.py), or None if the
  chip is not listed."""
  chip = chips.chip_for(device_kind)
  return chip.hbm_gbs * 1e9 if chip else None


def measure_copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
  """Bytes/s of an in-place `x + 1` over a float32 array of `nbytes` (it reads and writes every byte).

  Best of `repeats` after a warm-up; the buffer is donated, so no allocation is timed.
  """
  bump = jax.jit(lambda x: x + 1, donate_argnums=0)
  holder = [jnp.zeros((nbytes // 4,), jnp.float32)]

  def step():
    holder[0] = bump(holder[0])
    return holder[0]
  return 2 * nbytes / min(time_calls(step, repeats))


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def weight_read_bytes(cfg: ModelConfig, params: Params) -> int:
  """Bytes one decode step reads from the weights: all of them, except an untied input embedding
  (of which only the batch's rows are gathered)."""
  total = tree_bytes(params)
  if not cfg.tie_embeddings:
    total -= tree_bytes(params["embed"])
  return total


def kv_cache_bytes(cfg: ModelConfig, batch: int, length: int) -> int:
  """Bytes of a KV cache (keys and values, every layer; int8 ones with their scales) for `batch`
  rows of `length` positions."""
  return int(cfg.num_layers * batch * length * kv_cache.bytes_per_column(cfg))


@dataclasses.dataclass
class Variant:
  """One way of serving the model: its run plan (one device; the weights' config), the layout the
  generation programs run (launch/run/programs.Generation: serving | stacked), and its parameters."""
  name: str
  plan: RunPlan
  layout: str
  params: Params

  @property
  def cfg(self) -> ModelConfig:
    return self.plan.cfg.model


def make_variants(cfg: Config, modes: list[str], seed: int = 0) -> list[Variant]:
  """Random float parameters of `cfg`'s model, and for each of `modes` the plan that serves them on
  this host's first device.

  "float": weights cast once to the compute dtype and laid out per layer (`lm.serving`), the path
  `launch.generate` takes; "w8a16", "w8a8": int8 weights (embedding included) quantized from the same
  float weights, per layer. A ":stacked" suffix runs the training layout instead (the `Transformer`
  scanning over stacked weights, cast once), and "float:stored" the training layout with weights
  left in model.param_dtype (each layer casts them on every call): the paths before issue 17.
  With model.kv_cache_dtype int8 every name says "+ int8 KV".
  """
  device = jax.devices()[:1]
  float_plan = make_plan(cfg, device)
  m = float_plan.cfg.model
  float_params = jax.jit(lambda rng: ts.init_params(float_plan.mdef, rng))(jax.random.key(seed))
  variants = []
  for mode in modes:
    weights, _, layout = mode.partition(":")
    if weights not in ("float", "w8a16", "w8a8") or layout not in ("", "stacked", "stored") or (
        layout == "stored" and weights != "float"):
      raise ValueError(f"weights mode {mode!r}: choose float, w8a16 or w8a8, optionally with "
                       "':stacked' (or 'float:stored').")
    if weights == "float":
      plan, params = float_plan, float_params
    else:
      mcfg = quantized_config(m, weights, embedding=True)
      plan = make_plan(dataclasses.replace(float_plan.cfg, model=mcfg), device)
      params = jax.jit(lambda p, q=mcfg: quantize_params(p, q))(float_params)
    name = weights if weights != "float" else f"float {m.dtype}"
    name += " + int8 KV" if m.kv_cache_dtype == "int8" else ""
    if layout == "stored":
      variants.append(Variant(f"{name} ({m.param_dtype} stored, stacked)", plan, "stacked", params))
    elif layout == "stacked":
      params = jax.jit(lambda p: serving_params(p, m.compute_dtype, unstack=False))(params)
      variants.append(Variant(f"{name} (stacked)", plan, "stacked", params))
    else:
      variants.append(Variant(name, plan, "serving", programs.serving_params(plan, params)))
  del float_params
  return variants


def _best_and_median(fn: Callable[[], Any], repeats: int, warmup: int) -> tuple[float, float]:
  times = time_calls(fn, repeats, warmup)
  return min(times), statistics.median(times)


def generation(variant: Variant, new_tokens: int, *, temperature: float, top_k: int) -> programs.Generation:
  """The variant's generation programs (launch/run/programs.py) for a prefill and `new_tokens`
  decode steps after it; decode keeps its input cache, so every timed run can start from one."""
  return programs.Generation(variant.plan, max_new_tokens=new_tokens + 1, layout=variant.layout,
                             sampling=programs.Sampling(temperature, top_k), donate_cache=False)


def decode_flops(cfg: ModelConfig, batch: int, context: float) -> float:
  """Forward FLOPs of one decode step: 2 per matmul weight per row, plus attention over `context` keys."""
  attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context
  return batch * (2.0 * flops.matmul_params(cfg) + attention)


def decode_row(variant: Variant, batch: int, prompt_len: int, new_tokens: int, bandwidth: float,
               matmul_flops: float, *, temperature: float = 1.0, top_k: int = 50, repeats: int = 3,
               profile_dir: str | None = None) -> tuple[dict, Any]:
  """Times prefill and `new_tokens` cached decode steps of one variant at one shape.

  `bandwidth` (bytes/s) sets the memory floor, `matmul_flops` (FLOP/s) the compute floor of a step;
  the row's `floor_ms` is the larger. Returns (the row, the compiled decode function). With
  `profile_dir`, traces one more decode run.
  """
  cfg = variant.cfg
  programs_ = generation(variant, new_tokens, temperature=temperature, top_k=top_k)
  rng = np.random.default_rng(0)
  prompt_BxP = np.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt_len)), np.int32)
  lengths_B = np.full((batch,), prompt_len, np.int32)
  key = jax.random.key(0)
  # The warm-up prefill's cache serves every timed decode run: the decode loop copies it once at its
  # start (not donated), which costs far less than its steps and saves a prefill per run.
  prefill = lambda: programs_.prefill(variant.params, prompt_BxP, lengths_B)
  logits, cache = jax.block_until_ready(prefill())
  decode = lambda: programs_.decode(variant.params, cache, logits, lengths_B, key)
  prefill_best, _ = _best_and_median(prefill, repeats, warmup=0)
  decode_best, decode_median = _best_and_median(decode, repeats, warmup=1)
  decode_times = [decode_best, decode_median]
  if profile_dir:
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      jax.block_until_ready(decode())
  step_s = min(decode_times) / new_tokens
  weights = weight_read_bytes(cfg, variant.params)
  # Mean KV bytes a step reads: every written column of every layer, P + 1 .. P + new_tokens.
  kv_read = kv_cache_bytes(cfg, batch, prompt_len + (new_tokens + 1) / 2)
  memory_floor_s = (weights + kv_read) / bandwidth
  compute_floor_s = decode_flops(cfg, batch, prompt_len + (new_tokens + 1) / 2) / matmul_flops
  floor_s = max(memory_floor_s, compute_floor_s)
  row = {"weights": variant.name, "batch": batch, "prompt": prompt_len,
         "prefill_tok_s": batch * prompt_len / prefill_best,
         "decode_ms_tok": step_s * 1e3, "decode_tok_s": batch / step_s,
         "median_vs_best": decode_median / decode_best,
         "weight_MB": weights / 1e6, "kv_cache_MB": kv_cache_bytes(cfg, batch, prompt_len + new_tokens + 1) / 1e6,
         "memory_floor_ms": memory_floor_s * 1e3, "compute_floor_ms": compute_floor_s * 1e3,
         "floor_ms": floor_s * 1e3, "x_floor": step_s / floor_s}
  print(f"{row['weights']:16s} B={batch:<4d} P={prompt_len:<5d} prefill {row['prefill_tok_s']:9.0f} tok/s  "
        f"decode {row['decode_ms_tok']:8.2f} ms/step ({row['decode_tok_s']:8.0f} tok/s)  "
        f"floor {row['floor_ms']:7.2f} ms  x{row['x_floor']:.1f}  KV {row['kv_cache_MB']:.1f} MB",
        flush=True)
  return row, programs_.decode.lower(variant.params, cache, logits, lengths_B, key).compile()


def export_row(variant: Variant, batch: int, prompt_len: int, new_tokens: int, *,
               repeats: int = 3) -> dict:
  """Times whole generation (prefill + `new_tokens` steps, greedy) in process and through the
  `jax.export` artifact's function (`compress.export.export_generate`, deserialized); returns a row."""
  from compress.export import export_generate  # compress/export.py imports the restore machinery
  cfg = variant.cfg
  # The artifact lays stacked weights out for serving itself (serving ones it takes as they are).
  exported, flat = export_generate(cfg, variant.params, serving_graphdef=programs.serving_mdef(variant.plan).graphdef,
                                   batch=None, prompt_len=prompt_len, max_new_tokens=new_tokens)
  exported = jax.export.deserialize(exported.serialize())
  rng = np.random.default_rng(0)
  prompt_BxP = np.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt_len)), np.int32)
  lengths_B = np.full((batch,), prompt_len, np.int32)
  in_process = programs.Generation(variant.plan, max_new_tokens=new_tokens, layout=variant.layout)
  run_in_process = lambda: in_process(variant.params, prompt_BxP, jax.random.key(0), lengths_B)
  run_exported = jax.jit(lambda *args: exported.call(*args))
  args = (*flat, prompt_BxP, lengths_B, jnp.int32(0))
  same = bool(np.all(run_in_process() == np.asarray(run_exported(*args))))
  # The `same` check above compiled and warmed both.
  best_in, _ = _best_and_median(run_in_process, repeats, warmup=0)
  best_ex, _ = _best_and_median(lambda: run_exported(*args), repeats, warmup=0)
  row = {"weights": variant.name, "batch": batch, "prompt": prompt_len, "new_tokens": new_tokens,
         "in_process_ms": best_in * 1e3, "exported_ms": best_ex * 1e3, "exported_vs_in_process": best_ex / best_in,
         "same_tokens": same}
  print(f"export {row['weights']:16s} B={batch:<4d} P={prompt_len:<5d} in-process {row['in_process_ms']:8.1f} ms  "
        f"exported {row['exported_ms']:8.1f} ms  x{row['exported_vs_in_process']:.2f}  same tokens: {same}",
        flush=True)
  return row
