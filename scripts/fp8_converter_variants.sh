#!/usr/bin/env bash
# Device machine: build the extension once per FP8 converter variant (KVPAGER_FP8_CONVERT_BATCH:
# 0 = the default per-warp tiles, 1/2/4 = the batched converter on trial; consumer registers of the
# setmaxnreg split; optionally KVPAGER_FP8_CONVERT_ROUNDS, the default converter's rounds an
# iteration, 1 unless given; traits.h) and time each with scripts/fp8_seesaw_time.py against the bf16 kernel;
# the last variant stays installed (rebuild the default before other stages). Logs under $OUT:
# variants.txt (timings), spills-<variant>.txt (where the FP8 seesaw kernel spills, sass_spills.py).
#   VARIANTS="0:232 4:216 0:232:2" bash scripts/fp8_converter_variants.sh   # batch:consumer registers[:rounds]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
for v in ${VARIANTS:-0:232 4:216 4:224 2:232}; do
  IFS=: read -r batch regs rounds <<<"$v"
  rounds=${rounds:-1}
  echo "==== variant batch $batch consumer regs $regs rounds $rounds ====" | tee -a "$OUT/variants.txt"
  if ! KVPAGER_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
      KVPAGER_NVCC_EXTRA="-DKVPAGER_FP8_CONVERT_BATCH=$batch -DKVPAGER_FP8_CONSUMER_REGS=$regs -DKVPAGER_FP8_CONVERT_ROUNDS=$rounds" \
      timeout 200 "$PY" -m pip install -q --no-build-isolation --no-deps -e . >/tmp/variant-build.log 2>&1; then
    tail -5 /tmp/variant-build.log | tee -a "$OUT/variants.txt"
    continue
  fi
  timeout 120 "$PY" scripts/fp8_seesaw_time.py --label "b$batch/r$regs/k$rounds" 2>&1 | tee -a "$OUT/variants.txt"
  timeout 60 "$PY" scripts/sass_spills.py "Lb1E" 3 >"$OUT/spills-b$batch-r$regs-k$rounds.txt" 2>&1
  grep -cE "\b(STL|LDL)\b" "$OUT/spills-b$batch-r$regs-k$rounds.txt" | sed "s/^/  local-memory instructions in the FP8 seesaw: /" | tee -a "$OUT/variants.txt"
done
