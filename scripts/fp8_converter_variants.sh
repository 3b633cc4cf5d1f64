#!/usr/bin/env bash
# Device machine: the FP8 seesaw's converter variants (traits.h: KVPAGER_FP8_CONVERT_ROUNDS, the
# converter's rounds an iteration; KVPAGER_FP8_CONSUMER_REGS, the setmaxnreg split),
# built side by side (scripts/build_variants.sh) and timed one after another, twice in alternating
# order, with scripts/fp8_seesaw_time.py against the bf16 kernel on the same values. Logs under $OUT:
# variants.txt (timings, the spilling kernels), spills-<tag>.txt (sass_spills.py of the FP8 seesaw).
#   VARIANTS="base=;k4r224=-DKVPAGER_FP8_CONVERT_ROUNDS=4 -DKVPAGER_FP8_CONSUMER_REGS=224" \
#     bash scripts/fp8_converter_variants.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
VARIANTS=${VARIANTS:-"base=;k4r224=-DKVPAGER_FP8_CONVERT_ROUNDS=4 -DKVPAGER_FP8_CONSUMER_REGS=224"}
export VARIANTS
KVPAGER_BUILD_CUDA=0 "$PY" -m pip install -q --no-build-isolation --no-deps -e . >/tmp/editable.log 2>&1 ||
  { tail -5 /tmp/editable.log; exit 1; }
bash scripts/build_variants.sh 2>&1 | tee -a "$OUT/variants.txt"
IFS=';' read -r -a specs <<<"$VARIANTS"
tags=()
for spec in "${specs[@]}"; do [[ -f /tmp/variants/${spec%%=*}.so ]] && tags+=("${spec%%=*}"); done
for round in 1 2; do
  order=("${tags[@]}")
  if [[ $round == 2 ]]; then order=(); for ((i = ${#tags[@]} - 1; i >= 0; i--)); do order+=("${tags[i]}"); done; fi
  for tag in "${order[@]}"; do
    bash scripts/use_variant.sh "$tag"
    timeout 150 "$PY" scripts/fp8_seesaw_time.py --label "$tag (round $round)" 2>&1 | tee -a "$OUT/variants.txt"
    if [[ $round == 1 ]] && command -v cuobjdump >/dev/null; then
      timeout 60 "$PY" scripts/sass_spills.py "Lb1E" 3 >"$OUT/spills-$tag.txt" 2>&1
      grep -cE "\b(STL|LDL)\b" "$OUT/spills-$tag.txt" | sed "s/^/  $tag: local-memory instructions in the FP8 seesaw: /" | tee -a "$OUT/variants.txt"
    fi
  done
done
