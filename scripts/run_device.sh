#!/usr/bin/env bash
# One device call: carried wheels -> build the extension -> smoke check (scripts/quick_check.py,
# both 64-row kernels, short timeout: a hung kernel stops the run here) -> GPU tests -> kernel
# benchmark (-> compute-sanitizer, demo). Everything logs under $OUT (the device tool brings it
# back: at most 8 files): ptxas.txt smoke.log gpu-tests.log bench.log bench-kernel.json sanitize.log
# summary.txt, and trace.txt (build.log only when the build failed; it is kept in /tmp otherwise)
#
# Device call (carry [".whl"], timeout_s 600):
#   bash scripts/run_device.sh
#   STAGES="build test" PYTEST_ARGS="-k metadata" bash scripts/run_device.sh
#   STAGES="build fp8check" bash scripts/run_device.sh   # FP8 cache vs bf16 cache on the trained
#     model: fp8check.log + fp8check.txt (its one summary line)
#   STAGES="build bench trace" TRACE_ARGS="--orders 11,15 --case 128,2,128,8192" bash scripts/run_device.sh
#     # trace: rebuilds with -DKVPAGER_TRACE (so it runs last) and prints scripts/seesaw_trace.py's
#     # per-pair timeline into trace.txt
#   STAGES="build racecheck": a -DKVPAGER_SYNC_HANDOFFS rebuild and racecheck of the seesaw kernel (last)
# Env: STAGES (default "build smoke test bench"; also "fp8", "fp8check", "probe", "sanitize", "demo", "trace", "racecheck"), CLEAN=1 (rebuild from scratch:
#      fresh ptxas report), PYTEST_ARGS (default "-x"), PYTEST_K (a -k expression for the test stage), BENCH_ARGS (e.g. "--quick"),
#      CASES_ARGS / TOOLS (scripts/sanitize.sh), DEMO_ARGS, TRACE_ARGS, DEADLINE (seconds for the whole
#      script, default 570: stages are cut so the summary always prints), *_TIMEOUT per stage.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
STAGES=${STAGES:-"build smoke test bench"}
DEADLINE=${DEADLINE:-570}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

# ---- environment --------------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "run_device: installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "run_device: no .whl/ here (name .whl in carry): pydantic / CUTLASS headers may be missing"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "|", torch.cuda.get_device_name(), torch.cuda.get_device_capability())' || true
nvcc --version | tail -1 || true

declare -A STATUS SECS NOTE
ORDER=()
has() { [[ " $STAGES " == *" $1 "* ]]; }
budget() {  # min(stage default, time left before the deadline - 15 s)
  local left=$((DEADLINE - (SECONDS - T0) - 15))
  ((left < 1)) && left=1
  echo $(($1 < left ? $1 : left))
}
stage() {  # name timeout log cmd...: runs cmd with output to the terminal and $OUT/log
  local name=$1 limit log=$OUT/$3 begin=$SECONDS rc
  limit=$(budget "$2")
  shift 3
  ORDER+=("$name")
  echo
  echo "==== $name (limit ${limit}s) ===="
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  SECS[$name]=$((SECONDS - begin))
  if [[ $rc -eq 0 ]]; then STATUS[$name]=ok
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then STATUS[$name]="TIMEOUT"
  else STATUS[$name]="FAIL($rc)"; fi
  return $rc
}
skip() { ORDER+=("$1"); STATUS[$1]=skipped; SECS[$1]=0; NOTE[$1]=$2; }

# ---- stages -------------------------------------------------------------------------------
built=1
if has build; then
  [[ "${CLEAN:-0}" == 1 ]] && rm -rf build kernels/_C*.so
  export MAX_JOBS=${MAX_JOBS:-16} KVPAGER_BUILD_CUDA=1
  if ! stage build "${BUILD_TIMEOUT:-300}" build.log "$PY" -m pip install --no-build-isolation --no-deps -v -e .; then
    built=0
    NOTE[build]=$(grep -m1 -E "error|Error" "$OUT/build.log" | cut -c1-110)
  fi
  "$PY" scripts/ptxas_report.py "$OUT/build.log" | tee "$OUT/ptxas.txt"
  [[ $built == 1 ]] && mv "$OUT/build.log" /tmp/build.log  # only 8 files come back: keep it when it failed
  [[ $built == 1 ]] && NOTE[build]=$(grep -E "^\*" "$OUT/ptxas.txt" | awk '{printf "%sregs/%s+%sB spill  ", $2, $4, $5}' | cut -c1-110)
  [[ $built == 1 && -z "${NOTE[build]}" ]] && NOTE[build]=$(tail -1 "$OUT/ptxas.txt")
fi
"$PY" -c 'from kvpager import kernels as k; import sys; print("kvpager.kernels.available():", k.available(), k.unavailable_reason()); sys.exit(0 if k.available() else 1)' || built=0

if has smoke; then
  if [[ $built == 1 ]]; then
    # A wrong result still lets the tests run (they say which shapes); a hang stops the run.
    stage smoke "${SMOKE_TIMEOUT:-120}" smoke.log "$PY" scripts/quick_check.py --kernels seesaw,lockstep
    [[ ${STATUS[smoke]} == TIMEOUT ]] && built=0
    NOTE[smoke]=$(grep -E "^quick_check" "$OUT/smoke.log" | tr '\n' ' ' | cut -c1-110)
  else skip smoke "extension not available"; fi
fi

if has test; then
  if [[ $built == 1 ]]; then
    stage test "${TEST_TIMEOUT:-300}" gpu-tests.log "$PY" -m pytest -q -rs -p no:cacheprovider --durations=8 \
      ${PYTEST_ARGS:--x} ${PYTEST_K:+-k "$PYTEST_K"} tests/gpu
    NOTE[test]=$(grep -E "(passed|failed|error|skipped)" "$OUT/gpu-tests.log" | tail -1 | cut -c1-110)
  else skip test "extension not available"; fi
fi

if has bench; then
  if [[ $built == 1 ]]; then
    stage bench "${BENCH_TIMEOUT:-240}" bench.log "$PY" -m kvpager.cli bench kernel --out "$OUT/bench-kernel.json" \
      --plain ${BENCH_ARGS:-}
    NOTE[bench]=$("$PY" - "$OUT/bench-kernel.json" <<'PYEOF' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))
c = r["ceilings"]
pick = lambda **k: [x for x in r["results"] if all(x[a] == v for a, v in k.items())]
mem = " ".join(f"{x['frac_read']:.2f}" for x in pick(b=128, s_q=1, h_q=16, s_k=8192))
comp = " ".join(f"{x['kernel'][:4]} {x['frac_matmul']:.2f}" for x in pick(b=128, s_q=2, h_q=128, s_k=8192))
print(f"read {c['read_gbps']:.0f} GB/s, mm {c['matmul_tflops']:.0f} TF | h16 sq1 8k xread {mem} | h128 sq2 8k xmm {comp}")
PYEOF
    )
  else skip bench "extension not available"; fi
fi

if has fp8; then  # the fused FP8 decode: its GPU tests, the FP8 bench, a summary (scripts/fp8_device_check.sh)
  if [[ $built == 1 ]]; then
    stage fp8 "${FP8_TIMEOUT:-540}" fp8.log env OUT="$OUT" PYTHON="$PY" bash scripts/fp8_device_check.sh
    NOTE[fp8]=$(grep -E "^(tests:|bar |sanitize:)" "$OUT/fp8-summary.txt" | cut -c1-60 | tr '\n' ' ' | cut -c1-110)
  else skip fp8 "extension not available"; fi
fi

if has fp8check; then  # issue 14's end-to-end figure: the trained copy model, FP8 cache vs bf16 cache
  if [[ $built == 1 ]]; then
    stage fp8check "${FP8CHECK_TIMEOUT:-240}" fp8check.log "$PY" -m kvpager.examples.deepseek.gpu_check \
      --fp8 --device cuda --summary "$OUT/fp8check.txt"
    NOTE[fp8check]=$(cut -c1-110 "$OUT/fp8check.txt" 2>/dev/null)
  else skip fp8check "extension not available"; fi
fi

if has probe; then  # small-batch latency: per-kernel durations (PDL on and off), split-count sweep
  if [[ $built == 1 ]]; then
    stage probe "${PROBE_TIMEOUT:-150}" probe.log bash -c "for pdl in 1 0; do echo \"KVPAGER_PDL=\$pdl\"; \
      KVPAGER_PDL=\$pdl $PY scripts/latency_probe.py; done; $PY scripts/split_sweep.py"
    NOTE[probe]=$(grep -m2 "b=64" "$OUT/probe.log" | cut -c1-55 | tr '\n' ' ')
  else skip probe "extension not available"; fi
fi

if has sanitize; then
  if [[ $built == 1 ]]; then
    stage sanitize "${SANITIZE_TIMEOUT:-300}" sanitize.log bash scripts/sanitize.sh
    NOTE[sanitize]=$(grep -E "^== (memcheck|racecheck|synccheck|initcheck):" "$OUT/sanitize.log" | tr '\n' ' ' | cut -c1-110)
  else skip sanitize "extension not available"; fi
fi

if has demo; then
  stage demo "${DEMO_TIMEOUT:-120}" demo.log "$PY" -m kvpager.cli demo ${DEMO_ARGS:-}
  NOTE[demo]=$(tail -1 "$OUT/demo.log" | cut -c1-110)
fi

if has trace; then  # last: it replaces the installed extension with a -DKVPAGER_TRACE build
  if [[ $built == 1 ]]; then
    stage trace "${TRACE_TIMEOUT:-240}" trace.txt bash -c "KVPAGER_BUILD_CUDA=1 KVPAGER_NVCC_EXTRA=-DKVPAGER_TRACE \
      $PY -m pip install -q --no-build-isolation --no-deps -e . >/tmp/trace-build.log 2>&1 \
      || { tail -20 /tmp/trace-build.log; exit 1; }; cd scripts && $PY seesaw_trace.py ${TRACE_ARGS:-}"
    NOTE[trace]=$(grep -E "period median" "$OUT/trace.txt" | head -2 | cut -c1-50 | tr '\n' ' ')
  else skip trace "extension not available"; fi
fi

if has racecheck; then  # after trace: rebuilds with -DKVPAGER_SYNC_HANDOFFS (racecheck does not model bar.arrive)
  if [[ $built == 1 ]]; then
    stage racecheck "${RACECHECK_TIMEOUT:-240}" racecheck.log bash -c "KVPAGER_BUILD_CUDA=1 \
      KVPAGER_NVCC_EXTRA=-DKVPAGER_SYNC_HANDOFFS $PY -m pip install -q --no-build-isolation --no-deps -e . \
      >/tmp/racecheck-build.log 2>&1 || { tail -20 /tmp/racecheck-build.log; exit 1; }; \
      TOOLS=racecheck KERNEL_FILTER=seesaw PYTHON=$PY bash scripts/sanitize.sh"
    NOTE[racecheck]=$(grep -E "^== racecheck:" "$OUT/racecheck.log" | cut -c1-110)
  else skip racecheck "extension not available"; fi
fi

# ---- summary ------------------------------------------------------------------------------
{
  echo
  echo "==== summary ($((SECONDS - T0))s, $(date -u +%H:%M:%SZ)) ===="
  printf "%-9s %-10s %5s  %s\n" stage status secs note
  for s in "${ORDER[@]}"; do printf "%-9s %-10s %5s  %s\n" "$s" "${STATUS[$s]}" "${SECS[$s]}" "${NOTE[$s]:-}"; done
} | tee "$OUT/summary.txt"
for s in "${ORDER[@]}"; do [[ ${STATUS[$s]} == ok || ${STATUS[$s]} == skipped ]] || exit 1; done
exit 0
