#!/usr/bin/env bash
# Device calls for what is on trial and has not run on a GPU yet (docs/kernel-perf.md "s18", "s19";
# docs/fp8-cache.md "s18"). Part a, in order of worth, each step only if its time is left: build the
# default; order 19's tests alone first (a hang or failure drops it from later steps); the FP8 GPU
# tests (the FP8 seesaw's 0-spill rewrite is the default and ran only through ptxas); time seesaw
# orders 15 vs 19 with the ceilings of the same run; time the FP8 seesaw against bf16; rebuild with
# stepped wgmma descriptors (-DKVPAGER_SEESAW_DESC_STEP=1), test and time them; Nsight Compute's L2
# throughput at h_q 128 s_q 2 (the L2 hypothesis); the rounds-2 FP8 converter, timed. Part b, a
# second call on the same warm machine, does the last two if part a ran out of time.
# Everything on stdout; ptxas.txt, ncu-l2-*.txt, variants.txt under $OUT.
#
# Device calls (carry [".whl"], timeout_s 600):   bash scripts/device_trials.sh a   (then b)
# Env: CAP (seconds for the part, default 560; later steps are cut first).
set -u
cd "$(dirname "$0")/.."
PART=${1:-a}
CAP=${CAP:-560}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
  export PYTHONPATH=/tmp/site || exit 1
nvidia-smi --query-gpu=name,uuid --format=csv,noheader
T0=$SECONDS
left() { echo $((CAP - SECONDS + T0)); }
since() { echo "($((SECONDS - T0)) s)"; }
ORDERS=$(cat /tmp/trial-orders 2>/dev/null || echo "15 19")

time_orders() {  # label: the seesaw orders that passed, one line per case and order
  echo "==== seesaw orders ${ORDERS// /, }, $1 $(since)"
  timeout 100 python3 scripts/seesaw_order_time.py --orders "${ORDERS// /,}" 2>&1 | tail -12
}

step_build() {
  STAGES="build" DEADLINE=200 bash scripts/run_device.sh >"$OUT/build-summary.txt" 2>&1
  tail -3 "$OUT/build-summary.txt"
}
step_tests() {
  echo "==== order 19 tests alone first $(since)"
  timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_seesaw_kernel.py -k "order_19 or bad_switch" 2>&1 | tail -4
  [[ ${PIPESTATUS[0]} -eq 0 ]] || { ORDERS="15"; echo "order 19 FAILED or hung: timing order 15 alone"; }
  echo "$ORDERS" >/tmp/trial-orders
  echo "==== FP8 tests $(since)"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_gpu.py tests/gpu/test_seesaw_kernel.py -k fp8 2>&1 | tail -4
}
step_fp8_time() {
  echo "==== FP8 seesaw vs bf16, default converter $(since)"
  timeout 50 python3 scripts/fp8_seesaw_time.py --label default
}
step_desc() {
  echo "==== stepped wgmma descriptors (-DKVPAGER_SEESAW_DESC_STEP=1): build $(since)"
  if KVPAGER_BUILD_CUDA=1 MAX_JOBS=16 KVPAGER_NVCC_EXTRA="-DKVPAGER_SEESAW_DESC_STEP=1" \
      timeout 200 python3 -m pip install -q --no-build-isolation --no-deps -e . >/tmp/step-build.log 2>&1; then
    timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_seesaw_kernel.py -k "seesaw_matches or order_19 or pdl" 2>&1 | tail -4
    if [[ ${PIPESTATUS[0]} -eq 0 ]]; then time_orders "stepped descriptors"; else echo "stepped descriptors FAILED: not timed"; fi
  else
    tail -5 /tmp/step-build.log
  fi
}
step_ncu() {
  echo "==== L2 throughput at h_q 128 s_q 2 (ncu; the L2 hypothesis; current build) $(since)"
  for order in $ORDERS; do
    [[ $(left) -gt 45 ]] || break
    KVPAGER_SEESAW_ORDER=$order timeout 60 ncu --kernel-name regex:mla_decode --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --metrics lts__t_bytes.sum.per_second,lts__t_sectors.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum.per_second \
      python3 scripts/ncu_profile.py --case 128,2,128,8192 --calls 3 >"$OUT/ncu-l2-o$order.txt" 2>&1
    echo "order $order:"; grep -E "Duration|L2 Cache Throughput|DRAM Throughput|lts__t|dram__bytes" "$OUT/ncu-l2-o$order.txt"
  done
}
step_rounds2() {
  VARIANTS="0:232:2" timeout "$(left)" bash scripts/fp8_converter_variants.sh
}

# Part a: one call does it all, in order of worth; a step starts only if the time it needs is left.
if [[ $PART == a ]]; then
  step_build
  step_tests
  time_orders "default build"
  step_fp8_time
  [[ $(left) -gt 170 ]] && step_desc
  step_ncu
  [[ $(left) -gt 150 ]] && step_rounds2
else  # part b: what part a had no time for, on the same warm machine (the stepped build may be installed)
  step_ncu
  step_rounds2
fi
echo "==== end of part $PART $(since)"
