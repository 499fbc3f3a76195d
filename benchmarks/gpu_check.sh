#!/usr/bin/env bash
# The device check for a session lent a GPU, as one call of the device tool's `run`
# (`bash benchmarks/gpu_check.sh`, timeout_s 600; its stages are capped at 240 + 120 + 60 + 4 × 40 s):
# build from source there, run every CUDA test,
# a short main job on the GPU, and the benchmarks. Everything it learns lands in $OUT:
#   build.log, build_info.json, pytest-cuda.txt, train/ (metrics.json, curves.png), train.txt,
#   bench-cuda-<name>.json and their PNGs, stage times in stages.txt.
# Each stage has its own time limit and a failed stage does not stop the next one, so a partial
# run still says which parts work. Copy bench-*.json into benchmarks/results/ with the device name.
set -uo pipefail
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
stage() {  # stage NAME SECONDS CMD...: runs CMD under a limit, logs its status and time
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  timeout "$limit" "$@"
  rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/stages.txt"
  return 0
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
# Editable, so that pytest run from this tree imports the build (non-editable would be shadowed).
stage build 240 env NGCUDA_CUDA=1 MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="9.0" \
  python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
python3 -c "import json, ngcuda; print(json.dumps(ngcuda.build_info()))" > "$OUT/build_info.json" 2>&1
cat "$OUT/build_info.json"
stage pytest-cuda 120 python3 -m pytest -q -m cuda tests -p no:cacheprovider \
  > "$OUT/pytest-cuda.txt" 2>&1
tail -5 "$OUT/pytest-cuda.txt"
stage train 60 python3 -m ngcuda train --device cuda --optimizers kfac,adam --epochs 50 --seeds 0,1 \
  --quiet --out "$OUT/train" > "$OUT/train.txt" 2>&1
cat "$OUT/train.txt"
for b in factor eigh precondition step; do  # one JSON each: a stage cut short loses only itself
  stage "bench-$b" 40 python3 -m benchmarks "$b" --device cuda --json "$OUT/bench-cuda-$b.json" \
    > "$OUT/bench-$b.txt" 2>&1
  tail -8 "$OUT/bench-$b.txt"
done
cat "$OUT/stages.txt"
