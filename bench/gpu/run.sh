#!/usr/bin/env bash
# The GPU benchmark: model cost of ovsam-rn50x16 (fp32, bf16, bf16 + torch.compile at batch 1 and 16), the
# annotation job's model stage in-process with how busy it keeps the GPU, and the open-world systems (detector +
# OV-SAM, SAM 3, grid) at 80 and 1,203 classes, as one table. For a bare CUDA machine without network access;
# under 10 minutes.
#
#   bash bench/gpu/build_wheels.sh                 # here, once (needs PyPI): the wheels the GPU machine lacks
#   bash bench/gpu/run.sh [OUT_DIR]                # there, from the checkout; OUT_DIR default bench/gpu/out
#
# Environment: PYTHON (default python3), WHEELS (default bench/gpu/wheels), BENCH_DEVICE (cuda), BENCH_TINY=1
# (tiny models: a smoke run of this script, e.g. on a CPU with BENCH_DEVICE=cpu), BENCH_SKIP_COMPILE=1,
# BENCH_BUDGET_S (total seconds for the steps, default 540).
#
# Steps, each under `timeout` and each reported (ok / failed / timeout, exit code, seconds) without stopping the
# others: env (install the missing wheels with pip --no-deps --no-index, describe the machine), model_eager
# (bench/model.py fp32 + bf16, batch 1 and 16, 1/10/100 boxes), model_stage (bench/gpu/model_stage.py: Annotator,
# bf16, batch 16), open_world (bench/model.py bf16, the systems of bench/open_world.py at 80 and 1,203 classes,
# one image, 100 detector boxes), model_compile (bench/model.py bf16 --compile, batch 1 and 16, 10/100 boxes;
# last, since compilation takes longest), then the summary table (bench/gpu/summarize.py; also summary.json).
# Each step's output is in OUT_DIR/<step>.log; bench/model.py rewrites its JSON after every system, so a step that
# runs out of time still leaves the rows it finished.
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
OUT="${1:-${OUT_DIR:-$REPO/bench/gpu/out}}"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-$REPO/bench/gpu/wheels}"
DEVICE="${BENCH_DEVICE:-cuda}"
BUDGET="${BENCH_BUDGET_S:-540}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$REPO/bench/gpu/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
STEPS="$OUT/steps.tsv"
: > "$STEPS"
START=$(date +%s)

if [ "${BENCH_TINY:-0}" = "1" ]; then
  MODEL_ARGS=(--tiny --matmul-size 512 --repeats 2 --warmup 1)
  BOXES_EAGER="1,10"; BOXES_COMPILE="10"; BATCHES="1,2"
  STAGE_ARGS=(--model ovsam-tiny --shards 1 --images-per-shard 4 --batch-size 2 --image-size 160x120)
  OPEN_WORLD_ARGS=(--tiny --matmul-size 512 --repeats 1 --warmup 1 --detections 5 --max-calls 4 --grid-points 8)
else
  MODEL_ARGS=(--repeats 10 --warmup 2)
  BOXES_EAGER="1,10,100"; BOXES_COMPILE="10,100"; BATCHES="1,16"
  STAGE_ARGS=(--model ovsam-rn50x16 --shards 2 --images-per-shard 32 --batch-size 16)
  OPEN_WORLD_ARGS=(--repeats 2 --warmup 1 --detections 100 --sam3-batch 16)
fi
OPEN_WORLD_SYSTEMS="owlv2+ovsam,grounding-dino+ovsam,grid,proposals:owlv2,sam3"  # SAM 3 last: the longest

# step NAME LIMIT_S COMMAND...: run under timeout (capped by what is left of the budget), log, record, go on.
step() {
  local name=$1 limit=$2 t0 rc status left
  shift 2
  left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 10 ]; then
    printf '%s\t%s\t%s\t%s\n' "$name" skipped -1 0 >> "$STEPS"
    echo "=== $name: skipped (the ${BUDGET}s budget is spent)"
    return 0
  fi
  echo "=== $name (limit ${limit}s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" >> "$STEPS"
  echo "--- $name: $status (exit $rc, $(( $(date +%s) - t0 ))s); last lines of $OUT/$name.log:"
  tail -n 6 "$OUT/$name.log" | sed 's/^/    /'
  return 0
}

step env 60 "$PY" bench/gpu/env.py --install --wheels "$WHEELS" --json "$OUT/env.json"

step model_eager 170 "$PY" bench/model.py --device "$DEVICE" --systems ovsam-rn50x16 --precisions fp32,bf16 \
  --batch "$BATCHES" --boxes "$BOXES_EAGER" "${MODEL_ARGS[@]}" --json "$OUT/model_eager.json"

step model_stage 100 "$PY" bench/gpu/model_stage.py --device "$DEVICE" --precision bf16 "${STAGE_ARGS[@]}" \
  --json "$OUT/model_stage.json"

step open_world 200 "$PY" bench/model.py --device "$DEVICE" --systems "$OPEN_WORLD_SYSTEMS" --precisions bf16 \
  --classes 80,1203 "${OPEN_WORLD_ARGS[@]}" --json "$OUT/model_open_world.json"

if [ "${BENCH_SKIP_COMPILE:-0}" = "1" ]; then
  printf '%s\t%s\t%s\t%s\n' model_compile skipped -1 0 >> "$STEPS"
else
  step model_compile 240 "$PY" bench/model.py --device "$DEVICE" --systems ovsam-rn50x16 --precisions bf16 \
    --compile --batch "$BATCHES" --boxes "$BOXES_COMPILE" "${MODEL_ARGS[@]}" --stage-repeats 0 \
    --json "$OUT/model_compile.json"
fi

echo
echo "=== summary ($(( $(date +%s) - START ))s in all; logs and JSON in $OUT)"
timeout 60 "$PY" bench/gpu/summarize.py "$OUT" --json "$OUT/summary.json" | tee "$OUT/summary.txt"
exit 0
