#!/usr/bin/env bash
# One device call for the compile-time trials: builds the VARIANTS side by side
# (scripts/build_variants.sh), then runs the named stages, each skipped once DEADLINE seconds have
# passed. Log: $OUT/trial.txt, ptxas reports: $OUT/ptxas.tgz.
#   build            all variants (base = the default build)
#   tests:<tag>      the GPU suite (tests/gpu) on variant <tag>
#   ws               FP8 ws kernel cases (16 rows), WS_TAGS in turn (default: base base;
#                    its bf16 column times b 8 and b 2 at h_q 16 too)
#   bf16             bf16 64-row cases (scripts/variant_time.py), BF16_TAGS (default: base base)
#   combine          the combine kernel's run-time modes (KVPAGER_COMBINE_GRID x _LOADS) alternated
#                    on base, case by case (scripts/combine_time.py; COMBINE_MODES to change)
#   combinesan       compute-sanitizer memcheck of the combine kernel on base, in each
#                    COMBINE_SAN_MODES (default: wave:4 wave:8 wave:16; bf16 / fp16 and FP8 cases)
#   latency          scripts/latency_probe.py (decode / combine durations and their gap), under
#                    each KVPAGER_COMBINE_GRID of LATENCY_GRIDS (default: unit wave)
#   coldcode         scripts/cold_code_probe.py on each of COLD_TAGS (default: base): each short case
#                    timed right after the L2 clear (cold) and after a warm-up call of its shape on
#                    other pages (warm code)
#   clock            scripts/clock_probe.py on base: SM clock, power and throttle reasons of cuBLAS and
#                    of the bf16 and FP8 decodes run back to back
#   ncu              Nsight Compute on base (scripts/ncu_profile.sh; NCU_CASES): $OUT/ncu.tgz
#   qmodes           the same cases on base with KVPAGER_SEESAW_Q alternated, Q_MODES (default:
#                    tma cp.async tma cp.async)
#   seesawsan        compute-sanitizer on the bf16 / fp16 kernels (scripts/sanitize_cases.py, all
#                    cases, kernels named *seesaw*): memcheck on base, racecheck on variant sync
#                    (-DKVPAGER_SYNC_HANDOFFS: racecheck does not model bar.arrive)
#   fp8seesawsan     the same on the FP8 cases (the seesaw with a converter warpgroup)
#   benchissue       `kvpager bench kernel --set issue` on base (issue 9's grid with its ceilings):
#                    $OUT/bench-issue.json
#   fp8bench:<tag>   `kvpager bench kernel --kv-cache-dtype fp8 --quick` on variant <tag>:
#                    $OUT/bench-fp8-<tag>.json (issue 14's grid)
#   fp8seesaw        FP8 seesaw cases, SEESAW_TAGS (default: base)
#   sanitize:<tag>   compute-sanitizer memcheck + racecheck of the FP8 cases on variant <tag>
#                    (kernels named *fp8_ws* instrumented; SAN_FILTER, SAN_TOOLS to change)
#   seesawtrace      the seesaw's timeline (scripts/seesaw_trace.py), b 64 s_k 1024, h_q 128 s_q 2
#                    and b 1 (SEESAWTRACE_CASES="--case b,s_q,h_q,s_k ..." to change): the segment
#                    starts and ends, every traced segment's start / pairs / epilogue, SEESAWTRACE_TAGS (default: tbase; a
#                    -DKVPAGER_TRACE_EPILOGUE_TWICE build writes the output twice, each pass stamped)
#   fp8trace         the ws kernel's per-page timeline (scripts/fp8_trace.py), TRACE_TAGS (default:
#                    tbase, the -DKVPAGER_TRACE build of the default)
# A trial adds its tag=flags to VARIANTS and its tag to the stages' tag lists. s25's validation call
# (carry [".whl"]; add a trial's tag where wanted):
#   DEADLINE=370 bash scripts/trial_call.sh build ws tests:base seesawsan fp8seesawsan benchissue \
#     fp8trace fp8bench:base
# (seesawsan and fp8seesawsan need VARIANTS to hold base and sync=-DKVPAGER_SYNC_HANDOFFS, or the tags
# named by SAN_MEMCHECK_TAG / SAN_RACECHECK_TAG: a trial and its -DKVPAGER_SYNC_HANDOFFS build)
set -uo pipefail
[[ -d /tmp/site/pydantic ]] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"; LOG=$OUT/trial.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee -a "$LOG"
(cd /tmp && python3 -c "import kvpager.kernels") 2>/dev/null || KVPAGER_BUILD_CUDA=0 python3 -m pip install -q --no-build-isolation --no-deps -e . >/tmp/editable.log 2>&1 || { tail -5 /tmp/editable.log; exit 1; }
export VARIANTS=${VARIANTS:-"base=;sync=-DKVPAGER_SYNC_HANDOFFS;tbase=-DKVPAGER_TRACE"}
t() { echo "== $* ($(date +%T))" | tee -a "$LOG"; }
# For each built variant of TAGS ($1): swap it in, name it in the log, run the rest of the line.
for_tags() {
  local tags=$1; shift
  for tag in $tags; do
    [[ -f /tmp/variants/$tag.so ]] || continue
    bash scripts/use_variant.sh $tag
    echo "-- $tag" | tee -a "$LOG"
    "$@" 2>&1 | grep -v Warning | tee -a "$LOG"
  done
}
T0=$SECONDS
for stage in "$@"; do
  if ((SECONDS - T0 > ${DEADLINE:-470})); then t "skipped $stage: past the deadline"; continue; fi
  case $stage in
  build) t build; bash scripts/build_variants.sh 2>&1 | tee -a "$LOG"
    tar -czf "$OUT/ptxas.tgz" -C /tmp/variants $(cd /tmp/variants && ls *-ptxas.txt) ;;
  fp8seesaw) t fp8seesaw
    for tag in ${SEESAW_TAGS:-base}; do
      [[ -f /tmp/variants/$tag.so ]] || continue
      bash scripts/use_variant.sh $tag
      timeout 100 python3 scripts/fp8_seesaw_time.py --label "$tag" 2>&1 | grep -v Warning | tee -a "$LOG"
    done ;;
  ws) t ws
    ceiling=--read-ceiling  # measured once, in the first process
    for tag in ${WS_TAGS:-base base}; do
      bash scripts/use_variant.sh $tag
      timeout 100 python3 scripts/fp8_seesaw_time.py --set ws --label "$tag" $ceiling 2>&1 | grep -v Warning | tee -a "$LOG"
      ceiling=
    done ;;
  bf16) t bf16
    for tag in ${BF16_TAGS:-base base}; do
      bash scripts/use_variant.sh $tag
      timeout 100 python3 scripts/variant_time.py --label "$tag" 2>&1 | grep -v Warning | tee -a "$LOG"
    done ;;
  combine) t combine; bash scripts/use_variant.sh base
    timeout 200 python3 scripts/combine_time.py ${COMBINE_MODES:+--modes $COMBINE_MODES} 2>&1 | grep -v Warning | tee -a "$LOG" ;;
  combinesan) t combinesan; bash scripts/use_variant.sh base
    for mode in ${COMBINE_SAN_MODES:-wave:4 wave:8 wave:16}; do
      for cases in "" --fp8; do
        echo "-- $mode $cases" | tee -a "$LOG"
        KVPAGER_COMBINE_GRID=${mode%:*} KVPAGER_COMBINE_LOADS=${mode#*:} CASES_ARGS=$cases KERNEL_FILTER=combine TOOLS=memcheck \
          timeout 150 bash scripts/sanitize.sh 2>&1 | grep -E "ERROR SUMMARY|sanitize|error|FAIL|==" | tail -4 | tee -a "$LOG"
      done
    done ;;
  latency) t latency; bash scripts/use_variant.sh base
    for grid in ${LATENCY_GRIDS:-unit wave}; do
      echo "-- KVPAGER_COMBINE_GRID=$grid" | tee -a "$LOG"
      KVPAGER_COMBINE_GRID=$grid timeout 120 python3 scripts/latency_probe.py 2>&1 | grep -v Warning | tee -a "$LOG"
    done ;;
  coldcode) t coldcode; for_tags "${COLD_TAGS:-base}" timeout 150 python3 scripts/cold_code_probe.py ;;
  clock) t clock; bash scripts/use_variant.sh base
    timeout 120 python3 scripts/clock_probe.py 2>&1 | grep -v Warning | tee -a "$LOG" ;;
  ncu) t ncu; bash scripts/use_variant.sh base
    OUT=$OUT timeout 300 bash scripts/ncu_profile.sh 2>&1 | grep -v Warning | tee -a "$LOG" ;;
  qmodes) t qmodes; bash scripts/use_variant.sh base
    for mode in ${Q_MODES:-tma cp.async tma cp.async}; do
      KVPAGER_SEESAW_Q=$mode timeout 100 python3 scripts/variant_time.py --label "q=$mode" 2>&1 | grep -v Warning | tee -a "$LOG"
    done ;;
  seesawsan) t "seesawsan (memcheck on ${SAN_MEMCHECK_TAG:-base}, racecheck on ${SAN_RACECHECK_TAG:-sync})"
    bash scripts/use_variant.sh ${SAN_MEMCHECK_TAG:-base}
    KERNEL_FILTER=seesaw TOOLS=memcheck timeout 150 bash scripts/sanitize.sh 2>&1 | grep -E "ERROR SUMMARY|sanitize|error|FAIL|==" | tail -8 | tee -a "$LOG"
    bash scripts/use_variant.sh ${SAN_RACECHECK_TAG:-sync}
    KERNEL_FILTER=seesaw TOOLS=racecheck timeout 150 bash scripts/sanitize.sh 2>&1 | grep -E "RACECHECK SUMMARY|sanitize|error|FAIL|==" | tail -8 | tee -a "$LOG" ;;
  benchissue) t benchissue; bash scripts/use_variant.sh base
    timeout 240 python3 -m kvpager.cli bench kernel --set issue --plain --out "$OUT/bench-issue.json" 2>&1 | grep -v Warning | tee -a "$LOG" ;;
  fp8trace) t fp8trace; for_tags "${TRACE_TAGS:-tbase}" timeout 100 python3 scripts/fp8_trace.py ;;
  fp8seesawsan) t fp8seesawsan  # the FP8 seesaw (64-row blocks on an FP8 cache): memcheck on base, racecheck on sync
    for run in "${SAN_MEMCHECK_TAG:-base} memcheck" "${SAN_RACECHECK_TAG:-sync} racecheck"; do set -- $run
      bash scripts/use_variant.sh $1
      CASES_ARGS=--fp8 KERNEL_FILTER=seesaw TOOLS=$2 timeout 200 bash scripts/sanitize.sh 2>&1 |
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize|error|FAIL" | tail -6 | tee -a "$LOG"
    done ;;
  fp8bench:*) tag=${stage#fp8bench:}; t "fp8 bench on $tag"; bash scripts/use_variant.sh $tag
    timeout 240 python3 -m kvpager.cli bench kernel --kv-cache-dtype fp8 --quick --plain --out "$OUT/bench-fp8-$tag.json" 2>&1 |
      grep -v Warning | tee -a "$LOG" ;;
  sanitize:*) tag=${stage#sanitize:}; t "sanitize on $tag"; bash scripts/use_variant.sh $tag
    CASES_ARGS=--fp8 KERNEL_FILTER=${SAN_FILTER:-fp8_ws} TOOLS=${SAN_TOOLS:-"memcheck racecheck"} \
      timeout 200 bash scripts/sanitize.sh 2>&1 | grep -E "ERROR SUMMARY|sanitize|error|FAIL" | tail -12 | tee -a "$LOG" ;;
  seesawtrace) t seesawtrace
    for_tags "${SEESAWTRACE_TAGS:-tbase}" timeout 120 python3 scripts/seesaw_trace.py \
      ${SEESAWTRACE_CASES:---case 64,1,128,1024 --case 128,2,128,8192 --case 1,1,128,4096} ;;
  tests:*) tag=${stage#tests:}; t "tests on $tag"; bash scripts/use_variant.sh $tag
    timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -x -p no:cacheprovider tests/gpu ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tail -15 | tee -a "$LOG" ;;
  esac
done
t done
