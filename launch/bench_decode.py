"""Generation speed: prefill tokens/s and decode ms/token for float and int8 weights, beside the floor.

  python -m launch.bench_decode --config configs/bench_decode.py --out docs/results/decode
  python -m launch.bench_decode --config configs/llama_1b.py --batches 1,8,64,256 \
      --prompt_lens 128,2048 --kv_cache_dtypes compute,int8 --out /tmp/decode_gpu   # on a GPU / TPU

Random weights; each row compiles prefill and a `--new_tokens`-step decode loop for one (weights,
batch, prompt) and times them (compile and a warm-up excluded; best of --repeats). The floor is
the larger of (weight bytes + mean KV-cache bytes read per step) / bandwidth, with the bandwidth of
an in-place copy measured in this run (the chip's spec sheet is printed beside it), and the step's
FLOPs / a 2048^3 matmul's rate measured in this run. --kv_cache_dtypes repeats every row with each
KV-cache format (model.kv_cache_dtype). Writes decode.md and .csv.
"""

import dataclasses
import os
import sys

import jax
from absl import flags

from launch.measure import decode as decode_lib
from launch.measure.profile import profile_markdown, summarize_trace
from launch.measure.tables import write_table
from launch.run import cli
from launch.run.plan import make_plan
from launch.run.throughput import measure_matmul_flops
from lm.config import KV_CACHE_DTYPES

flags.DEFINE_string("out", None, "Write decode.md and decode.csv here.")
flags.DEFINE_list("weights", ["float", "w8a16", "w8a8"], "float, float:stored, w8a16, w8a8 (and :stacked variants; launch/measure/decode.py).")
flags.DEFINE_list("batches", ["1", "8", "64"], "Batch sizes.")
flags.DEFINE_list("prompt_lens", ["128", "512"], "Prompt lengths.")
flags.DEFINE_list("kv_cache_dtypes", [], "KV-cache formats to run each row with: compute, int8 "
                  "(default: the config's model.kv_cache_dtype).")
flags.DEFINE_integer("new_tokens", 32, "Decode steps timed per row.")
flags.DEFINE_integer("repeats", 3, "Timed runs per row (best is reported).")
flags.DEFINE_integer("top_k", 50, "Sampling: keep the k most likely tokens (0: all; with temperature 0, greedy).")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0: greedy argmax).")
flags.DEFINE_integer("max_prefill_tokens", 0, "Skip shapes with batch x prompt above this (0: none); "
                     "skipped shapes are listed in the notes.")
flags.DEFINE_bool("export", False, "Also time whole generation through the jax.export artifact vs in process "
                  "(each variant, at the first prompt length and the batches up to 8).")
flags.DEFINE_string("profile", None, "Trace the first row's decode loop here and print where its time goes.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_logs()
  cfg = make_plan(cli.load_config(), jax.devices()[:1]).cfg  # model.dtype settled for this host
  batches, prompt_lens = [int(b) for b in FLAGS.batches], [int(p) for p in FLAGS.prompt_lens]
  cache_dtypes = FLAGS.kv_cache_dtypes or [cfg.model.kv_cache_dtype]
  for name in cache_dtypes:
    if name not in KV_CACHE_DTYPES:
      raise ValueError(f"--kv_cache_dtypes={','.join(cache_dtypes)}: {name!r} is not a KV-cache format; "
                       f"choose from {list(KV_CACHE_DTYPES)}.")
  longest = max(prompt_lens) + FLAGS.new_tokens + 1
  if longest > cfg.model.max_seq_len:
    raise ValueError(f"--prompt_lens {max(prompt_lens)} + --new_tokens {FLAGS.new_tokens} + 1 exceeds "
                     f"model.max_seq_len={cfg.model.max_seq_len}; set --config.model.max_seq_len={longest}.")
  device = jax.devices()[0]
  kind = device.device_kind
  if device.platform == "cpu":
    # Name the CPU, and the load it shared: on a shared machine that sets how far to trust the rows.
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), "CPU") if os.path.exists("/proc/cpuinfo") else "CPU"
    kind = f"{model}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start"
  measured = decode_lib.measure_copy_bandwidth()
  spec = decode_lib.table_bandwidth(device.device_kind)
  machine = (f"{kind} ({device.platform}), copy bandwidth measured {measured / 1e9:.1f} GB/s"
             + (f", spec sheet {spec / 1e9:.0f} GB/s" if spec else ""))
  matmul = measure_matmul_flops(2048, 2048, 2048, cfg.model.dtype)
  machine += f", {cfg.model.dtype} matmul measured {matmul / 1e12:.2f} TFLOP/s"
  print(machine, flush=True)
  rows, export_rows, profile, skipped = [], [], "", set()
  variants = (variant for name in cache_dtypes for variant in decode_lib.make_variants(
      dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kv_cache_dtype=name)), FLAGS.weights))
  for variant in variants:
    for prompt_len in prompt_lens:
      for batch in batches:
        if FLAGS.max_prefill_tokens and batch * prompt_len > FLAGS.max_prefill_tokens:
          skipped.add(f"batch {batch} x prompt {prompt_len}")
          continue
        trace = FLAGS.profile if not rows else None
        row, compiled = decode_lib.decode_row(variant, batch, prompt_len, FLAGS.new_tokens, measured, matmul,
                                              temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                              repeats=FLAGS.repeats, profile_dir=trace)
        rows.append(row)
        if trace:
          summary = summarize_trace(trace, compiled.as_text())
          profile = profile_markdown(summary, f"decode loop, {variant.name}, batch {batch}, prompt {prompt_len}",
                                     f"one run of {FLAGS.new_tokens} steps")
          print(profile)
    if FLAGS.export:
      for batch in [b for b in batches if b <= 8]:
        export_rows.append(decode_lib.export_row(variant, batch, prompt_lens[0], FLAGS.new_tokens,
                                                 repeats=FLAGS.repeats))
  if FLAGS.out:
    command = "python -m launch.bench_decode " + " ".join(sys.argv[1:])
    notes = f"Machine: {machine}; load average {os.getloadavg()[0]:.1f} at the end.\n"
    if skipped:
      notes += f"\nSkipped (--max_prefill_tokens={FLAGS.max_prefill_tokens}): {', '.join(sorted(skipped))}.\n"
    notes += f"\n{profile}"
    write_table(rows, FLAGS.out, "decode", "Generation benchmark", command, notes)
    if export_rows:
      write_table(export_rows, FLAGS.out, "decode_export",
                  "Generation through the jax.export artifact vs in process", command, f"Machine: {machine}.")


if __name__ == "__main__":
  cli.run(main)
