#!/usr/bin/env bash
# The fused FP8 decode on the GPU (issue 14), in one go: which path kvpager will take, the FP8 GPU
# tests (tests/gpu/test_fp8_gpu.py), `kvpager bench kernel --kv-cache-dtype fp8`, a summary
# against the issue's bars, then compute-sanitizer memcheck + racecheck on the FP8 kernel alone
# (scripts/sanitize_cases.py --fp8; FP8_SANITIZE=0 skips it). Needs the extension built (scripts/run_device.sh's build stage; this
# script is its `fp8` stage: STAGES="build fp8" bash scripts/run_device.sh).
#
#   bash scripts/fp8_device_check.sh
# Output: everything on stdout; under $OUT (default ./out) only bench-fp8.json and fp8-summary.txt
# (the device tool brings back few files). Env: PYTHON, FP8_PYTEST_ARGS (e.g. "-x -k fused"),
# FP8_BENCH_ARGS (e.g. "--set quick"), FP8_TEST_TIMEOUT (default 240 s), FP8_BENCH_TIMEOUT (180 s),
# FP8_SANITIZE_TIMEOUT (120 s).
# If the fused kernel is wrong, KVPAGER_FP8_KERNEL=0 switches it off (FP8 then runs on the reference).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
LOG=$(mktemp -d)
trap 'rm -rf "$LOG"' EXIT

"$PY" - <<'PYEOF'
import torch
from kvpager import kernels
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"fp8_device_check: {dev}; kernels.available()={kernels.available()}; "
      f"supports_fp8_kvcache(16)={kernels.supports_fp8_kvcache(16)} (32)={kernels.supports_fp8_kvcache(32)} "
      f"(64)={kernels.supports_fp8_kvcache(64)}; {kernels.fp8_unavailable_reason() or 'fused FP8 decode on'}")
PYEOF

echo "==== FP8 smoke: one 64-row-block case first (a hung kernel stops the script here) ===="
timeout -k 5 "${FP8_SMOKE_TIMEOUT:-90}" "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_gpu.py \
  -k "test_fused_fp8_decode_matches_the_reference and hq128-sq2 and ws" 2>&1 | tail -3
smoke_rc=${PIPESTATUS[0]}
if [[ $smoke_rc -eq 124 || $smoke_rc -eq 137 ]]; then
  echo "fp8 smoke: TIMEOUT (hang) - no tests, bench or sanitizer run" | tee "$OUT/fp8-summary.txt"
  exit 1
fi

echo "==== FP8 GPU tests ===="
timeout -k 10 "${FP8_TEST_TIMEOUT:-240}" "$PY" -m pytest -q -rs -p no:cacheprovider --durations=5 \
  ${FP8_PYTEST_ARGS:-} tests/gpu/test_fp8_gpu.py 2>&1 | tee "$LOG/tests.log"
test_rc=${PIPESTATUS[0]}

echo "==== kvpager bench kernel --kv-cache-dtype fp8 ===="
timeout -k 10 "${FP8_BENCH_TIMEOUT:-180}" "$PY" -m kvpager.cli bench kernel --kv-cache-dtype fp8 --plain \
  --out "$OUT/bench-fp8.json" ${FP8_BENCH_ARGS:-} 2>&1
bench_rc=${PIPESTATUS[0]}

{
  echo "==== fp8 summary ===="
  echo "tests: rc=$test_rc  $(grep -E "(passed|failed|error|skipped)" "$LOG/tests.log" | tail -1)"
  echo "bench: rc=$bench_rc"
  "$PY" - "$OUT/bench-fp8.json" <<'PYEOF' 2>&1
import json, sys
r = json.load(open(sys.argv[1]))
res = r["results"]
print(f"ceilings: read {r['ceilings']['read_gbps']:.0f} GB/s; {len(res)} cases, {len(r['skipped'])} skipped")
for x in res:
    if x["b"] == 128 and x["s_q"] == 1 and x["h_q"] == 16 and x["s_k"] == 8192:
        ok = x["frac_read"] >= 0.85 and x["fp8_over_bf16"] <= 0.62
        print(f"bar h_q=16 s_q=1 s_k=8192 b=128 {'varlen' if x['varlen'] else 'fixed '}: x_read {x['frac_read']:.2f} "
              f"(>= 0.85), fp8/bf16 {x['fp8_over_bf16']:.3f} (<= 0.62): {'MET' if ok else 'MISSED'}")
    if x["b"] == 128 and x["s_q"] == 2 and x["h_q"] == 128:
        ok = x["fp8_over_bf16"] <= 1 / 0.85
        print(f"bar h_q=128 s_q=2 s_k={x['s_k']} b=128 {'varlen' if x['varlen'] else 'fixed '}: fp8/bf16 "
              f"{x['fp8_over_bf16']:.3f} (<= 1.18, i.e. >= 0.85x bf16 speed), x_mm {x['frac_mm']:.2f}: {'MET' if ok else 'MISSED'}")
worst = max(res, key=lambda x: x["one_minus_cos_vs_bf16"], default=None)
if worst:
    print(f"max 1-cos vs the bf16 kernel on the same values: {worst['one_minus_cos_vs_bf16']:.1e}; "
          f"non-finite cases: {sum(not x['finite'] for x in res)}")
    ratios = sorted(x["fp8_over_bf16"] for x in res)
    print(f"fp8/bf16 time over all cases: min {ratios[0]:.3f} median {ratios[len(ratios) // 2]:.3f} max {ratios[-1]:.3f}")
PYEOF
} | tee "$OUT/fp8-summary.txt"

san_rc=0
if [[ "${FP8_SANITIZE:-1}" == 1 ]]; then
  echo "==== compute-sanitizer on the FP8 kernel ===="
  timeout -k 10 "${FP8_SANITIZE_TIMEOUT:-120}" env CASES_ARGS=--fp8 KERNEL_FILTER=mla_decode PYTHON="$PY" \
    bash scripts/sanitize.sh 2>&1 | tee "$LOG/sanitize.log"
  san_rc=${PIPESTATUS[0]}
  echo "sanitize: rc=$san_rc $(grep -E "^== (memcheck|racecheck):" "$LOG/sanitize.log" | tr '\n' ' ')" |
    tee -a "$OUT/fp8-summary.txt"
fi
[[ $test_rc -eq 0 && $bench_rc -eq 0 && $san_rc -eq 0 ]]
