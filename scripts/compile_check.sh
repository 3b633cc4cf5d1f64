#!/usr/bin/env bash
# Compile every kernels/csrc/*.cu (and the standalone probes in scripts/*.cu) for sm_90a on a
# machine without a GPU (CI): the kernel translation units include no torch headers, so nvcc + the
# CuTe headers of the nvidia-cutlass wheel are all they need. Prints per-file timings and any
# register spills; fails on an error.
#
#   scripts/compile_check.sh [file.cu ...]     (default: kernels/csrc/*.cu and the probes in scripts/*.cu)
# Env: NVCC (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc), PYTHON (default python3),
#      JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then NVCC=$CUDA_HOME/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "compile_check: SKIP: nvcc not found (set NVCC or CUDA_HOME to check the CUDA sources)"
  exit 0
fi
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$NVCC")")")}

if [[ $# -gt 0 ]]; then files=("$@"); else shopt -s nullglob; files=(kernels/csrc/*.cu scripts/*.cu); shopt -u nullglob; fi
if [[ ${#files[@]} -eq 0 ]]; then
  echo "compile_check: SKIP: no kernels/csrc/*.cu to compile"
  exit 0
fi

PYTHON=${PYTHON:-python3}
# Locate the headers without importing cutlass_library (importing it pulls optional modules).
find_cutlass='import importlib.util as u; s = u.find_spec("cutlass_library"); print(s.submodule_search_locations[0] if s else "")'
CUTLASS_ROOT=$("$PYTHON" -c "$find_cutlass")
if [[ -z "$CUTLASS_ROOT" ]]; then
  echo "compile_check: installing nvidia-cutlass==4.2.0.0 for the CuTe headers"
  "$PYTHON" -m pip install -q nvidia-cutlass==4.2.0.0
  CUTLASS_ROOT=$("$PYTHON" -c "$find_cutlass")
fi

# The flags of setup.py's nvcc build (minus -lineinfo / debug), so CI sees what the build sees.
FLAGS=(
  -gencode=arch=compute_90a,code=sm_90a -std=c++17 --expt-relaxed-constexpr -O3 -c
  --use_fast_math -DNDEBUG --ptxas-options=-v,--warn-on-spills
  -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__
  -U__CUDA_NO_BFLOAT16_OPERATORS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__
  -I"$CUTLASS_ROOT/source/include" -I"$CUTLASS_ROOT/source/tools/util/include"
  -I"$CUDA_HOME/include/cccl" -Ikernels/csrc
)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

compile_one() {  # file -> prints one status line; log in $TMP/<name>.log
  local src=$1 name start rc=0
  name=$(basename "$src" .cu)
  start=$(date +%s.%N)
  "$NVCC" "${FLAGS[@]}" "$src" -o "$TMP/$name.o" >"$TMP/$name.log" 2>&1 || rc=$?
  local secs
  secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [[ $rc -eq 0 ]]; then
    echo "  ok    ${secs}s  $src"
    grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$TMP/$name.log" | sed "s|^|        spill in $src: |" || true
  else
    echo "  FAIL  ${secs}s  $src"
    return 1
  fi
}
export -f compile_one
export NVCC TMP
export FLAGS_STR
FLAGS_STR=$(printf '%q ' "${FLAGS[@]}")

echo "compile_check: $("$NVCC" --version | tail -1) | CUTLASS $CUTLASS_ROOT | ${#files[@]} file(s), ${JOBS:-2} jobs"
begin=$SECONDS
status=0
printf '%s\n' "${files[@]}" |
  xargs -P "${JOBS:-2}" -I{} bash -c 'eval "FLAGS=($FLAGS_STR)"; compile_one "$1"' _ {} || status=$?
if [[ $status -ne 0 ]]; then
  for src in "${files[@]}"; do
    log="$TMP/$(basename "$src" .cu).log"
    if [[ -f "$log" ]] && ! [[ -f "$TMP/$(basename "$src" .cu).o" ]]; then
      echo "---- $src ----"
      grep -v "^ptxas info" "$log" | head -60
    fi
  done
  echo "compile_check: FAILED after $((SECONDS - begin))s"
  exit 1
fi
echo "compile_check: all ${#files[@]} file(s) compiled in $((SECONDS - begin))s"
