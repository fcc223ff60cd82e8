#!/usr/bin/env bash
# The GPU benchmarks in parts, cheapest first, each stopped at its own time budget, for the GPU
# machine (no uv, no registry there: the missing packages travel as wheels in .whl). Each part
# merges its figures into benchmarks/results/NAME-CARD.json as soon as it has them, so a part
# stopped at its budget keeps what it measured (a lever stopped while compiling says
# "status": "compiling"); the files written and every part's log (logs.tgz) go to $OUT.
# factory/speeds.py reads the stage speeds back from those files.
#
#   bash benchmarks/gpu.sh                    # every part, in the order below, within the budget
#   bash benchmarks/gpu.sh float8             # one part; several run in the order given
#   bash benchmarks/gpu.sh --smoke [PART...]  # CPU, tiny models, into a temp folder (RESULTS=..)
#
# part              writes (CARD: h100, h200, cpu)             budget s  what
# env               logs.tgz: env.txt                               30  GPU, driver, versions
# train_maskformer  train_maskformer-CARD.json                     150  R-101, 224x224, batch 8
# train_grounding   train_grounding-CARD.json                      150  head's step, 25 maps
# label             label-CARD.json                                200  grounding labeller 8/16/32
# generate          generate-CARD.json: naive, stage               300  compiled stage, warm start
# pipeline          pipeline-CARD.json                             360  pipeline_over_stage
# float8            generate-CARD.json: levers[float8]             540  torchao float8 Linear
# autotune          generate-CARD.json: levers[max-autotune]       540  inductor max-autotune
#
# Budgets: GPU_BUDGET_S is the whole run's (default 540: one device call is at most 600 s). A
# part gets its own budget (BUDGET_<PART>, e.g. BUDGET_FLOAT8=480) or what is left of the
# whole, whichever is less, and is skipped, saying so, where less than half its budget is
# left; --smoke doubles each part's budget and defaults the whole to 1800. Each part prints
# what it cost. The generator parts run with OMP_NUM_THREADS=1, as Ray runs a stage actor, so
# that they and the pipeline's actors share one compile cache (COMPILE_CACHE, default
# /tmp/factory-compile: kept between calls while the machine stays warm).
#
# Here, first:  ../shared/tools/device-wheels torchao==0.18.0
# There (device tool, carry .whl):  bash benchmarks/gpu.sh PART...
set -uo pipefail
cd "$(dirname "$0")/.."
ALL=(env train_maskformer train_grounding label generate pipeline float8 autotune)
declare -A BUDGET=([env]=30 [train_maskformer]=150 [train_grounding]=150 [label]=200
                   [generate]=300 [pipeline]=360 [float8]=540 [autotune]=540)
SMOKE=
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; shift; fi
PARTS=("$@")
[[ ${#PARTS[@]} -eq 0 ]] && PARTS=("${ALL[@]}")
for part in "${PARTS[@]}"; do
  [[ -n "${BUDGET[$part]:-}" ]] || { echo "unknown part '$part': one of ${ALL[*]}" >&2; exit 2; }
done
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
if [[ -z "$SMOKE" ]]; then
  if [[ -d .whl ]]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
  fi
  $PY -c "import diffusers, ray, pycocotools" 2>/dev/null || {
    echo "diffusers/ray/pycocotools missing: carry .whl (../shared/tools/device-wheels" \
         "torchao==0.18.0)" >&2; exit 1; }
  DEVICE=cuda
  RESULTS=${RESULTS:-benchmarks/results}
else
  DEVICE=cpu
  RESULTS=${RESULTS:-$(mktemp -d /tmp/factory-smoke-XXXX)}
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
OUT=${OUT:-$(mktemp -d /tmp/factory-gpu-out-XXXX)}
LOGS=$(mktemp -d /tmp/factory-gpu-logs-XXXX)
CACHE=${COMPILE_CACHE:-/tmp/factory-compile}
mkdir -p "$OUT" "$RESULTS" "$CACHE"
CARD=$($PY benchmarks/record.py card $DEVICE) || exit 1
TOTAL=${GPU_BUDGET_S:-$([[ -n "$SMOKE" ]] && echo 1800 || echo 540)}
SCALE=$([[ -n "$SMOKE" ]] && echo 2 || echo 1)  # 2 shared CPU cores compile slower than 16
START=$SECONDS
echo "card $CARD; results in $RESULTS; parts: ${PARTS[*]}; budget ${TOTAL} s"

# The command of each part: on the GPU at full size, or (--smoke) on the CPU with tiny models.
command_of() {  # PART NAME BUDGET_S -> the command line (NAME: its result file's)
  local out="--out $RESULTS/$2-$CARD.json"
  local gen="--compile-cache $CACHE --budget-s $3"
  case "$1:${SMOKE:+smoke}" in
    env:*) echo "nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version" \
                "--format=csv 2>&1; $PY -c 'import torch, diffusers, transformers, ray;" \
                "print(torch.__version__, torch.version.cuda, diffusers.__version__," \
                "transformers.__version__, ray.__version__)'; $PY -c 'import torchao;" \
                "print(\"torchao\", torchao.__version__)' 2>&1 | tail -1" ;;
    train_maskformer:) echo "$PY benchmarks/train_maskformer.py $out" ;;
    train_maskformer:smoke) echo "$PY benchmarks/train_maskformer.py --variant tiny" \
                                 "--device cpu --steps 2 --crop 64 $out" ;;
    train_grounding:) echo "$PY benchmarks/train_grounding.py $out" ;;
    train_grounding:smoke) echo "$PY benchmarks/train_grounding.py --model tiny --device cpu" \
                                "--steps 2 --batch-size 2 $out" ;;
    label:) echo "$PY benchmarks/label.py $out" ;;
    label:smoke) echo "$PY benchmarks/label.py --model tiny --device cpu --batch-sizes 2,8" \
                      "--batches 2 --gen-steps 2 --gen-batch-size 2 --gen-batches 1 $out" ;;
    generate:) echo "$PY benchmarks/generate.py --images 32 --naive-images 2 $gen $out" ;;
    generate:smoke) echo "$PY benchmarks/generate.py --model tiny --device cpu --steps 2" \
                         "--batch-size 2 --images 4 --naive-images 1 --feature-repeats 1" \
                         "$gen $out" ;;
    pipeline:) echo "$PY benchmarks/pipeline.py --compile-cache $CACHE $out" ;;
    pipeline:smoke) echo "$PY benchmarks/pipeline.py --model tiny --detector tiny --device cpu" \
                         "--n 32 --batch-size 4 --label-batch-size 4 --shard-size 4" \
                         "--stage-batches 2 $out" ;;
    float8:|autotune:)
      local lever=float8; [[ $1 == autotune ]] && lever=max-autotune
      echo "$PY benchmarks/generate.py --no-stage --levers $lever --images-per-lever 32 $gen $out" ;;
    float8:smoke|autotune:smoke)
      local lever=float8; [[ $1 == autotune ]] && lever=max-autotune
      echo "$PY benchmarks/generate.py --model tiny --device cpu --steps 2 --batch-size 2" \
           "--no-stage --levers $lever --images-per-lever 2 $gen $out" ;;
  esac
}
result_name() {  # PART -> the result file's NAME
  case $1 in float8|autotune) echo generate ;; *) echo "$1" ;; esac
}

declare -a SUMMARY WRITTEN
for part in "${PARTS[@]}"; do
  var="BUDGET_${part^^}"
  want=${!var:-$((BUDGET[$part] * SCALE))}
  left=$((TOTAL - (SECONDS - START)))
  budget=$((want < left ? want : left))
  if ((budget < want / 2)); then
    SUMMARY+=("$(printf '%-17s skipped: %d s left of the budget, it needs up to %d' "$part" \
      "$left" "$want")")
    continue
  fi
  name=$(result_name "$part")
  cmd=$(command_of "$part" "$name" "$((budget - 15))")
  echo "== $part (budget $budget s): $cmd"
  t0=$SECONDS
  threads=()
  case $part in generate|pipeline|float8|autotune) threads=(OMP_NUM_THREADS=1) ;; esac
  env "${threads[@]}" timeout -k 10 "$budget" bash -c "$cmd" > "$LOGS/$part.log" 2>&1
  rc=$?
  # Ray's own W/I log lines stay in the log, off the console
  grep -v "^[WI][0-9]" "$LOGS/$part.log" | tail -n 15
  cost=$((SECONDS - t0))
  case $rc in
    0) status=done ;;
    124|137) status="stopped at its budget (what it measured is in the file)" ;;
    *) status="failed (exit $rc; see logs.tgz:$part.log)" ;;
  esac
  SUMMARY+=("$(printf '%-17s %4d s  %s' "$part" "$cost" "$status")")
  [[ $part == env ]] && cp "$LOGS/env.log" "$LOGS/env.txt"
  [[ $part != env && -f "$RESULTS/$name-$CARD.json" ]] && WRITTEN+=("$RESULTS/$name-$CARD.json")
done

for f in $(printf '%s\n' "${WRITTEN[@]}" | sort -u); do cp "$f" "$OUT/"; done
tar -czf "$OUT/logs.tgz" -C "$LOGS" .
echo "== what the pools would now read (factory/speeds.py):"
$PY -m factory.speeds "$RESULTS" $([[ -n "$SMOKE" ]] && echo cpu) 2>&1 | cut -c1-160
echo "== cost of each part ($((SECONDS - START)) s in all; files in $OUT):"
printf '%s\n' "${SUMMARY[@]}"
