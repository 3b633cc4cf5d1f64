#!/usr/bin/env bash
# One device call for what is on trial since s18 and has not run on a GPU yet (docs/kernel-perf.md
# "s18", docs/fp8-cache.md "s18"): build the default, run the FP8 and order-19 GPU tests (the FP8
# seesaw's 0-spill rewrite is the default and ran only through ptxas), time seesaw orders 15 vs 19
# with the ceilings of the same run, time the FP8 seesaw against bf16, then rebuild with the
# rounds-2 converter and time it. Between them, Nsight Compute's L2 throughput of orders 15 and 19
# at h_q 128 s_q 2 (docs/kernel-perf.md "The L2 hypothesis"). Everything on stdout; ptxas.txt / variants.txt under $OUT.
#
# Device call (carry [".whl"], timeout_s 600):   bash scripts/device_trials.sh
# Env: CAP (seconds for the whole script, default 540; later steps are cut first).
set -u
cd "$(dirname "$0")/.."
CAP=${CAP:-540}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
  export PYTHONPATH=/tmp/site || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
T0=$SECONDS
left() { echo $((CAP - SECONDS + T0)); }
STAGES="build" DEADLINE=200 bash scripts/run_device.sh >"$OUT/build-summary.txt" 2>&1
tail -3 "$OUT/build-summary.txt"
echo "==== order 19 tests alone first: a hang or failure drops order 19 from later steps ($((SECONDS - T0)) s)"
ORDERS="15 19"
timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_seesaw_kernel.py -k "order_19 or bad_switch" 2>&1 | tail -4
[[ ${PIPESTATUS[0]} -eq 0 ]] || { ORDERS="15"; echo "order 19 FAILED or hung: timing order 15 alone"; }
echo "==== FP8 tests ($((SECONDS - T0)) s)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_gpu.py tests/gpu/test_seesaw_kernel.py -k fp8 2>&1 | tail -4
echo "==== seesaw orders ${ORDERS// /, } ($((SECONDS - T0)) s)"
timeout 100 python3 scripts/seesaw_order_time.py --orders "${ORDERS// /,}" 2>&1 | tail -14
echo "==== L2 throughput at h_q 128 s_q 2, orders ${ORDERS// /, } (ncu; the L2 hypothesis) ($((SECONDS - T0)) s)"
for order in $ORDERS; do
  KVPAGER_SEESAW_ORDER=$order timeout 60 ncu --kernel-name regex:mla_decode --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --metrics lts__t_bytes.sum.per_second,lts__t_sectors.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum.per_second \
    python3 scripts/ncu_profile.py --case 128,2,128,8192 --calls 3 >"$OUT/ncu-l2-o$order.txt" 2>&1
  echo "order $order:"; grep -E "Duration|L2 Cache Throughput|DRAM Throughput|lts__t|dram__bytes" "$OUT/ncu-l2-o$order.txt"
done
echo "==== FP8 seesaw vs bf16, default converter ($((SECONDS - T0)) s)"
timeout 50 python3 scripts/fp8_seesaw_time.py --label default
VARIANTS="0:232:2" timeout "$(left)" bash scripts/fp8_converter_variants.sh
echo "==== end ($((SECONDS - T0)) s)"
