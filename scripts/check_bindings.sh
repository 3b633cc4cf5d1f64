#!/usr/bin/env bash
# Syntax-check kernels/csrc/bindings.cpp (the only torch translation unit) on a machine without
# the CUDA math libraries: torch's CUDA headers come from a CUDA torch wheel (unzipped headers
# only), and the five library headers they include are stubbed with the handle types they name.
# Catches binding compile errors before a device call spends minutes on a failed build.
#
#   scripts/check_bindings.sh /path/to/torch-<version>-<cuda build>.whl
# Env: CXX (default g++), CUDA_HOME (default: the toolkit of the nvcc on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
wheel=${1:?usage: scripts/check_bindings.sh TORCH_CUDA_WHEEL}
# nvcc may be a wrapper script: ask it where its toolkit is.
CUDA_HOME=${CUDA_HOME:-$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

unzip -q "$wheel" 'torch/include/*' -d "$work"
mkdir -p "$work/stubs"
echo 'typedef struct cusparseContext* cusparseHandle_t;' >"$work/stubs/cusparse.h"
echo 'typedef struct cublasContext* cublasHandle_t; typedef int cublasStatus_t;' >"$work/stubs/cublas_v2.h"
echo 'typedef struct cublasLtContext* cublasLtHandle_t;' >"$work/stubs/cublasLt.h"
echo 'typedef struct cusolverDnContext* cusolverDnHandle_t;' >"$work/stubs/cusolverDn.h"
echo 'typedef int cusolverStatus_t;' >"$work/stubs/cusolver_common.h"
pyinc=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')

"${CXX:-g++}" -std=c++20 -fsyntax-only -DTORCH_EXTENSION_NAME=_C \
  -I"$work/torch/include" -I"$work/torch/include/torch/csrc/api/include" -I"$pyinc" \
  -I"$CUDA_HOME/include" -I"$work/stubs" -Ikernels/csrc kernels/csrc/bindings.cpp
echo "check_bindings: kernels/csrc/bindings.cpp compiles against $(basename "$wheel")"
