#!/bin/bash
# The decode benchmark's GPU/TPU rows (issue 17), in one device call per part, each variant in its
# own timed-out process so a cut-off call still returns what it measured (rows under $OUT/<part>-*).
#
#   bash launch/reproduce/decode_gpu.sh a     # ~7 min: prompt 128, batch 1/64/256, every weights mode
#   bash launch/reproduce/decode_gpu.sh b     # ~8 min: prompt 2048, batch 8 at 128, export, layouts
#   bash launch/reproduce/decode_gpu.sh c     # ~4 min: the int8 KV cache beside the bf16 one, where
#                                             #   the cache is most of the bytes (prompt 2048, batch 64)
#
# On the lent H200 (../shared/GPU.md) carry ml_collections as a wheel: carry [".whl"], and this
# script installs it. Model: configs/llama_1b.py (1.24B, 128k vocabulary, bf16 compute), random weights.
set -u
PART=${1:-a}
OUT=${OUT:-/tmp/decode_gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PYTHON:-python3}
bench() {  # name timeout_s flags...
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$OUT/log.txt"
  timeout "$limit" $PY -m launch.bench_decode --config configs/llama_1b.py --new_tokens 32 --repeats 3 \
      --out "$OUT/$PART-$name" "$@" 2>&1 | grep -v "^W0\|^I0" | tee -a "$OUT/log.txt"
}
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee -a "$OUT/log.txt"
if [ "$PART" = a ]; then
  bench float 130 --weights float --batches 1,64,256 --prompt_lens 128 --profile "$OUT/trace-float"
  bench w8a16 130 --weights w8a16 --batches 1,64,256 --prompt_lens 128
  bench w8a8 130 --weights w8a8 --batches 1,64,256 --prompt_lens 128
  bench stored 90 --weights float:stored --batches 1,64 --prompt_lens 128   # the path before issue 17
elif [ "$PART" = c ]; then
  bench kv8 220 --weights float,w8a16 --kv_cache_dtypes compute,int8 --batches 1,64 --prompt_lens 2048
else
  bench long 300 --weights float,w8a16,w8a8 --batches 1,8,64 --prompt_lens 2048
  bench batch8 120 --weights float,w8a16,w8a8 --batches 8 --prompt_lens 128 --export
  bench layouts 90 --weights float:stacked,w8a16:stacked --batches 1 --prompt_lens 128
fi
rm -rf "$OUT"/trace-*/plugins 2>/dev/null  # keep the printed profile table, not the raw trace
