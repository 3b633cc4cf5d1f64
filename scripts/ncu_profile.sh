#!/usr/bin/env bash
# Nsight Compute on one decode call per case: headline sections (speed of light, scheduler, warp
# states, pipes) and the per-SASS-line stall samples of the decode kernel, as text in $OUT/ncu.tgz.
#   NCU_CASES="fp8:128,1,16,8192 bf16:128,1,16,8192 bf16:128,2,128,8192" bash scripts/ncu_profile.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
PY=${PYTHON:-python3}
mkdir -p "$OUT/ncu"
CASES=${NCU_CASES:-fp8:128,1,16,8192 bf16:128,1,16,8192 bf16:128,2,128,8192}
for spec in $CASES; do
  kind=${spec%%:*} shape=${spec#*:}
  name="$kind-${shape//,/_}"
  flag=""; [[ $kind == fp8 ]] && flag="--fp8"
  rep="/tmp/ncu-$name"
  echo "==== ncu $name ===="
  timeout -k 5 "${NCU_TIMEOUT:-120}" ncu --kernel-name regex:mla_decode --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section SchedulerStats --section WarpStateStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy --section SourceCounters \
    --import-source no -f -o "$rep" "$PY" scripts/ncu_profile.py --case "$shape" $flag --calls 3 2>&1 | tail -5
  ncu -i "$rep.ncu-rep" --page details > "$OUT/ncu/$name-details.txt" 2>&1
  ncu -i "$rep.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu/$name-sass.csv" 2>&1
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Registers Per|Executed Ipc A" \
    "$OUT/ncu/$name-details.txt" | head -12
done
# The device tool brings back only a few files a call (s20 lost four reports that way): one tarball.
tar czf "$OUT/ncu.tgz" -C "$OUT" ncu && rm -rf "$OUT/ncu" && echo "ncu_profile: reports in $OUT/ncu.tgz"
