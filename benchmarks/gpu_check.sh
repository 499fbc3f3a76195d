#!/usr/bin/env bash
# The device check for a session lent a GPU, as ONE call of the device tool's `run`:
#   NGCUDA_GIT_COMMIT=<git rev-parse --short HEAD, run here> bash benchmarks/gpu_check.sh
# with timeout_s 480 (its stages are capped at 200 + 90 + 30 + 4 x 25 s = 420 s; the device
# machine has no .git, hence the commit passed in). It builds from source there, runs every CUDA
# test, a short main job on the GPU and the four quick benchmarks.
# The tool returns at most 8 files from $OUT, so the stages write into $WORK and, after each
# stage, the whole of $WORK is packed into $OUT/gpu-check.tgz (a run cut short still returns what
# it finished) next to $OUT/stages.txt. Unpack the archive here and copy its <device>-*.json into
# benchmarks/results/.
# Each stage has its own time limit (SIGINT, so Python writes what it can; SIGKILL 5 s later) and a
# failed stage does not stop the next one, so a partial run still says which parts work.
set -uo pipefail
OUT=${OUT:-runs/gpu-check}
WORK=${WORK:-runs/gpu-check-work}
export PYTHONUNBUFFERED=1  # a stage killed at its limit keeps the lines it printed
export NGCUDA_GIT_COMMIT=${NGCUDA_GIT_COMMIT:-}
mkdir -p "$OUT" "$WORK"
pack() {
  tar czf "$OUT/.gpu-check.tgz" -C "$WORK" . && mv "$OUT/.gpu-check.tgz" "$OUT/gpu-check.tgz"
  cp "$WORK/stages.txt" "$OUT/stages.txt" 2>/dev/null
  return 0
}
stage() {  # stage NAME SECONDS CMD...: runs CMD under a limit, logs its status and time, packs
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  timeout -k 5 -s INT "$limit" "$@"
  rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$WORK/stages.txt"
  pack
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv \
  > "$WORK/gpu.csv" 2>&1
# Editable, so that pytest run from this tree imports the build (non-editable would be shadowed).
stage build 200 env NGCUDA_CUDA=1 MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="9.0" \
  python3 -m pip install --no-build-isolation --no-deps -e . > "$WORK/build.log" 2>&1
python3 -c "import json, ngcuda; print(json.dumps(ngcuda.build_info()))" \
  > "$WORK/build_info.json" 2> "$WORK/build_info.err"
cat "$WORK/build_info.json"
# one hung kernel must not hide every other CUDA test
per_test=()
python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 30)
stage pytest-cuda 90 python3 -m pytest -q -rA -m cuda tests -p no:cacheprovider "${per_test[@]}" \
  > "$WORK/pytest-cuda.txt" 2>&1
tail -5 "$WORK/pytest-cuda.txt"
stage train 30 python3 -m ngcuda train --device cuda --optimizers kfac,adam --epochs 30 --seeds 0,1 \
  --quiet --out "$WORK/train" > "$WORK/train.txt" 2>&1
cat "$WORK/train.txt"
slug=$(python3 -c "from benchmarks.environment import device_slug; print(device_slug('cuda'))" 2>/dev/null \
  || echo cuda)
for b in factor eigh precondition step; do  # one JSON each: a stage cut short loses only itself
  stage "bench-$b" 25 python3 -m benchmarks "$b" --quick --device cuda \
    --json "$WORK/$slug-$(date +%Y-%m-%d)-$b-quick.json" > "$WORK/bench-$b.txt" 2>&1
  tail -8 "$WORK/bench-$b.txt"
done
cat "$WORK/stages.txt"
