"""The GPU/TPU table of docs/speed.md: llama_1b (batch 8 x 4096, bf16) and the bench preset on one
accelerator, per attention implementation x remat policy, in one call.

  python -m launch.reproduce.accelerator --out docs/results/accelerator

Each variant runs `python -m launch.bench` in its own process under a timeout (so an out-of-memory
variant costs one row, and each row's peak memory is its own), and every finished row is added
to rows.jsonl at once (the file is rewritten whole, as --out may be gs://), so a run cut short still
returns what it measured. A bf16 8192^3 matmul measured first, in its own process, is the in-run
ceiling (`mfu_vs_matmul`); `mfu` is against the spec sheet (launch/run/throughput.py). Writes
accelerator.{md,csv} and rows.jsonl into --out. No XLA flags are set: the table measures jax's defaults.
"""

import csv
import io
import json
import os
import subprocess
import sys

from absl import flags

from launch.measure.tables import write_table
from launch.run import cli
from launch.storage import paths

flags.DEFINE_string("out", "docs/results/accelerator", "Output directory.")
flags.DEFINE_integer("timeout", 150, "Seconds per variant (compile + 2 warm-up + 5 timed steps).")
flags.DEFINE_string("only", "", "Comma-separated variant names to run (default: all).")
FLAGS = flags.FLAGS

LLAMA = ("configs/llama_1b.py", {"train.global_batch_size": 8, "data.seq_len": 4096, "mesh.fsdp": 1,
                                 "mesh.num_devices": 1, "mesh.rules": "dp"})
BENCH = ("configs/bench.py", {})
# name -> (config file, overrides); the first row is what shipped before model.attention existed.
VARIANTS = {
    "llama_1b xla dots_no_batch": (LLAMA, {"model.attention": "xla", "model.remat": "dots_no_batch"}),
    "llama_1b auto dots_no_batch": (LLAMA, {"model.remat": "dots_no_batch"}),
    "llama_1b auto none": (LLAMA, {"model.remat": "none"}),
    "llama_1b auto none chunk2048": (LLAMA, {"model.remat": "none", "model.logits_chunk_size": 2048}),
    "llama_1b auto dots": (LLAMA, {"model.remat": "dots"}),
    "llama_1b auto full": (LLAMA, {"model.remat": "full"}),
    "llama_1b xla none": (LLAMA, {"model.attention": "xla", "model.remat": "none"}),
    "bench auto none": (BENCH, {"model.remat": "none"}),
}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_MATMUL = ("from launch.run.throughput import measure_matmul_flops; "
           "print(measure_matmul_flops(8192, 8192, 8192, 'bfloat16') / 1e12)")


def _python(args: list[str], timeout: int) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def run_variant(name: str, config_file: str, overrides: dict, out_dir: str) -> dict:
  """One `launch.bench` row of `name` (or a row whose note says why there is none)."""
  bench_dir = paths.join(out_dir, "variants", name.replace(" ", "_"))
  args = ["-m", "launch.bench", "--config", config_file, "--dtypes", "bfloat16", "--steps", "5",
          "--warmup", "2", "--out", bench_dir, *[f"--config.{k}={v}" for k, v in overrides.items()]]
  try:
    done = _python(args, FLAGS.timeout)
  except subprocess.TimeoutExpired:
    return {"variant": name, "note": f"timed out after {FLAGS.timeout} s"}
  if done.returncode:
    lines = [l for l in done.stderr.splitlines() if "RESOURCE_EXHAUSTED" in l or "rror" in l]
    return {"variant": name, "note": (lines[-1] if lines else done.stderr[-200:]).strip()[:200]}
  row = next(csv.DictReader(io.StringIO(paths.read_text(paths.join(bench_dir, "bench.csv")))))
  return {"variant": name, **row, "note": ""}


def main(argv):
  del argv
  paths.makedirs(FLAGS.out)
  jsonl = paths.join(FLAGS.out, "rows.jsonl")
  earlier = paths.read_text(jsonl) if paths.isfile(jsonl) else ""  # rows of earlier calls are kept
  matmul = _python(["-c", _MATMUL], 300)
  matmul_tflops = float(matmul.stdout.strip().splitlines()[-1]) if matmul.returncode == 0 else None
  print(f"bf16 8192^3 matmul: {matmul_tflops} TFLOP/s")
  names = FLAGS.only.split(",") if FLAGS.only else list(VARIANTS)
  rows = []
  for name in names:
    (config_file, base), overrides = VARIANTS[name]
    row = run_variant(name, config_file, {**base, **overrides}, FLAGS.out)
    if matmul_tflops and row.get("model_tflops"):
      row["mfu_vs_matmul"] = float(row["model_tflops"]) / matmul_tflops
    row["matmul_tflops"] = matmul_tflops
    rows.append(row)
    paths.write_text(jsonl, earlier + "".join(json.dumps(r) + "\n" for r in rows))  # gs:// has no append
    print(json.dumps(row))
  keys = ["variant", "attention", "remat", "step_s", "tokens_per_s", "mfu", "mfu_vs_matmul", "peak_GiB",
          "peak_source", "note"]
  table = [{k: r.get(k, "") for k in keys} for r in rows]
  command = "python -m launch.reproduce.accelerator --out " + FLAGS.out
  print(write_table(table, FLAGS.out, "accelerator", "Train step on one accelerator (bf16)", command,
                    f"mfu: against the spec sheet; mfu_vs_matmul: against a bf16 8192^3 matmul measured "
                    f"in the same run ({matmul_tflops} TFLOP/s). llama_1b rows: batch 8 x 4096 on one device."))


if __name__ == "__main__":
  cli.run(main)
