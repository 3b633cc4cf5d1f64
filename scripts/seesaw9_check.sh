#!/usr/bin/env bash
# v9 of the seesaw kernel (KVPAGER_MLA_KERNEL=seesaw9, issue 9) on the device in about 90 s: its
# GPU tests (tests/gpu/test_seesaw_kernel.py -k seesaw9: the pairwise grid against the reference,
# lockstep agreement, CUDA-graph capture), each under a 30 s timeout so a hang costs the stage and
# not the run, then `kvpager bench kernel --set issue --kernels seesaw,seesaw9 --plain`, then a
# 5-line summary. Needs the extension built: it is scripts/run_device.sh's `v9` stage
# (STAGES="build v9" bash scripts/run_device.sh).
#
# Output: stdout; under $OUT only bench-v9.json and v9-summary.txt. Env: PYTHON,
# V9_TEST_TIMEOUT (whole test run, default 90 s), V9_BENCH_TIMEOUT (default 100 s).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
LOG=$(mktemp -d)
trap 'rm -rf "$LOG"' EXIT

# A hung kernel never returns to Python, so pytest-timeout must use its thread method (it ends
# the process); the outer timeout covers a device without pytest-timeout (-o keys then unused).
timeout -k 5 "${V9_TEST_TIMEOUT:-90}" "$PY" -m pytest -q -rs -p no:cacheprovider -o timeout=30 \
  -o timeout_method=thread -k seesaw9 tests/gpu/test_seesaw_kernel.py 2>&1 | tee "$LOG/tests.log"
test_rc=${PIPESTATUS[0]}
bench_rc=skipped
# pytest-timeout's "+++ Timeout +++" = a test hung: the bench would hang too. The outer timeout
# alone may also be a slow machine, so the bench (bounded by its own timeout) still runs then.
if grep -q "Timeout +++" "$LOG/tests.log"; then
  echo "seesaw9_check: a test hung: no bench (it would hang too)"
  test_rc=hang
else
  timeout -k 5 "${V9_BENCH_TIMEOUT:-100}" "$PY" -m kvpager.cli bench kernel --set issue --kernels seesaw,seesaw9 \
    --plain --out "$OUT/bench-v9.json"
  bench_rc=$?
fi

"$PY" - "$OUT/bench-v9.json" "$LOG/tests.log" "$test_rc" "$bench_rc" <<'PYEOF' | tee "$OUT/v9-summary.txt"
import json, os, re, sys
path, test_log, test_rc, bench_rc = sys.argv[1:]
tail = [l for l in open(test_log).read().splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
tests = tail[-1].strip("= ") if tail else "no result line"
ok_tests = test_rc == "0"
print(f"v9 tests: {'PASS' if ok_tests else 'FAIL' if test_rc != 'hang' else 'HANG'} ({tests})")
r = json.load(open(path)) if bench_rc == "0" and os.path.exists(path) else None
worst = None
if r is None:
    for _ in range(3):
        print(f"bench: not run or failed (rc {bench_rc})")
else:
    pick = lambda k, **c: next((x for x in r["results"] if x["kernel"] == k and all(x[a] == v for a, v in c.items())), None)
    for name, c, frac in (("h128 s_q1 8k", dict(b=128, s_q=1, h_q=128, s_k=8192, varlen=False), "frac_matmul"),
                          ("h128 s_q2 8k", dict(b=128, s_q=2, h_q=128, s_k=8192, varlen=False), "frac_matmul"),
                          ("b64 s_k1024 ", dict(b=64, s_q=1, h_q=128, s_k=1024, varlen=False), "frac_matmul")):
        a, b = pick("seesaw", **c), pick("seesaw9", **c)
        if a and b:
            print(f"{name}: seesaw {a['time_us']:.1f} us ({a[frac]:.2f} xmm) | seesaw9 {b['time_us']:.1f} us "
                  f"({b[frac]:.2f} xmm) | speed-up {a['time_us'] / b['time_us']:.3f}")
        else:
            print(f"{name}: missing from the bench")
    v9 = [x for x in r["results"] if x["kernel"] == "seesaw9"]
    worst = max((x["one_minus_cos_vs_first"] for x in v9), default=float("nan"))
    finite = all(x["finite"] for x in v9)
    c = r["ceilings"]
if r is None:
    print(f"verdict: v9 {'PASS' if ok_tests else 'FAIL'}; no timings")
else:
    ok = ok_tests and finite and worst <= 1e-5
    print(f"verdict: v9 {'PASS' if ok else 'FAIL'} (tests {'ok' if ok_tests else 'bad'}, all finite {finite}, "
          f"max 1-cos vs seesaw {worst:.1e}); ceilings read {c['read_gbps']:.0f} GB/s, mm {c['matmul_tflops']:.0f} TF")
PYEOF
[[ $test_rc == 0 && $bench_rc == 0 ]]
