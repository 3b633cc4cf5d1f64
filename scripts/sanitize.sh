#!/usr/bin/env bash
# compute-sanitizer over scripts/sanitize_cases.py: memcheck (out-of-bounds / misaligned global
# and shared accesses) and racecheck (shared-memory hazards). Nonzero exit on any error.
# racecheck does not model bar.arrive (the seesaw kernel's producer/consumer hand-offs): run it
# on a KVPAGER_NVCC_EXTRA=-DKVPAGER_SYNC_HANDOFFS build (docs/kernel-perf.md, sanitizer notes).
#
#   scripts/sanitize.sh            env: TOOLS="memcheck racecheck" (add synccheck / initcheck),
#                                       CASES_ARGS="--quick", KERNEL_FILTER=mla (only kernels whose
#                                       name contains it are instrumented: faster)
set -uo pipefail
cd "$(dirname "$0")/.."

CS=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
if [[ ! -x "$CS" ]]; then
  echo "sanitize: compute-sanitizer not found (set COMPUTE_SANITIZER)"
  exit 2
fi
PYTHON=${PYTHON:-python3}
# One cudaMalloc per tensor, so a read past any of our buffers lands outside an allocation.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
filter=()
[[ -n "${KERNEL_FILTER:-}" ]] && filter=(--kernel-name "kns=$KERNEL_FILTER")

status=0
for tool in ${TOOLS:-memcheck racecheck}; do
  echo "== compute-sanitizer --tool $tool"
  begin=$SECONDS
  "$CS" --tool "$tool" --error-exitcode 99 --target-processes all --print-limit 30 "${filter[@]}" \
    "$PYTHON" scripts/sanitize_cases.py ${CASES_ARGS:-}
  rc=$?
  if [[ $rc -eq 0 ]]; then verdict=clean; elif [[ $rc -eq 99 ]]; then verdict="ERRORS reported"; else verdict="failed (rc=$rc)"; fi
  echo "== $tool: $verdict in $((SECONDS - begin))s"
  [[ $rc -ne 0 ]] && status=1
done
exit $status
