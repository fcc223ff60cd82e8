#!/usr/bin/env bash
# The generation-speed checks in one command on the GPU machine, which has no uv and no
# registry: the lever sweep (benchmarks/generate.py --sweep), then the whole pipeline on one
# GPU (benchmarks/pipeline.py), sharing one compile cache. JSON and logs go to $OUT.
#
# Here, first:  ../shared/tools/device-wheels torchao==0.18.0
# There (device tool, carry .whl):  bash benchmarks/gpu.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
OUT=${OUT:-/tmp/factory-gpu-out}
mkdir -p "$OUT"
CACHE=$(mktemp -d /tmp/factory-compile-XXXX)  # empty: the sweep's first compile is a cold one
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
timeout "${SWEEP_S:-400}" python3 benchmarks/generate.py --sweep --images 32 \
  --images-per-lever 32 --naive-images 2 --compile-cache "$CACHE" 2>&1 | tee "$OUT/generate.log"
cp benchmarks/results/generate-*.json "$OUT/"
timeout "${PIPELINE_S:-170}" python3 benchmarks/pipeline.py --compile-cache "$CACHE" 2>&1 \
  | grep -v "^\(W\|I\)[0-9]" | tee "$OUT/pipeline.log"
cp benchmarks/results/pipeline-*.json "$OUT/" 2>/dev/null
tail -3 "$OUT/generate.log"
