#!/usr/bin/env bash
# Device machine: build several compile-time variants of the CUDA extension at once, each in its own
# copy of the checkout (one full build is ~80 s and uses only a few of the 16 cores, so four built
# side by side cost about what one does one after another). Each variant's module is kept as
# $VDIR/<tag>.so with its ptxas report ($VDIR/<tag>-ptxas.txt, scripts/ptxas_report.py);
# `scripts/use_variant.sh <tag>` then puts it in place of kernels/_C*.so of an editable install of
# this checkout, so the next Python process runs it.
#
#   VARIANTS="base=;sync=-DKVPAGER_SYNC_HANDOFFS" \
#     bash scripts/build_variants.sh
# Env: VARIANTS (tag=nvcc flags, ';'-separated), VDIR (default /tmp/variants), PYTHON, JOBS_EACH
# (ninja jobs a variant, default 16 / number of variants, at least 4).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VDIR=${VDIR:-/tmp/variants}
mkdir -p "$VDIR"
IFS=';' read -r -a specs <<<"${VARIANTS:?VARIANTS=tag=flags;... is required}"
jobs=$((16 / ${#specs[@]}))
((jobs < 4)) && jobs=4
begin=$SECONDS
for spec in "${specs[@]}"; do
  tag=${spec%%=*} flags=${spec#*=}
  src=$VDIR/src-$tag
  rm -rf "$src" && mkdir -p "$src"
  tar --exclude=./build --exclude=./.whl --exclude=./.git --exclude=./.venv --exclude=./.ci-venv --exclude='./kernels/_C*.so' -cf - . | tar -xf - -C "$src"
  (
    cd "$src" &&
      KVPAGER_BUILD_CUDA=1 MAX_JOBS=${JOBS_EACH:-$jobs} KVPAGER_NVCC_EXTRA="$flags" \
        timeout 420 "$PY" setup.py build_ext --inplace >"$VDIR/$tag-build.log" 2>&1
    echo $? >"$VDIR/$tag.rc"
  ) &
done
wait
for spec in "${specs[@]}"; do
  tag=${spec%%=*} flags=${spec#*=}
  so=$(ls "$VDIR/src-$tag"/kernels/_C*.so 2>/dev/null | head -1)
  if [[ "$(cat "$VDIR/$tag.rc")" == 0 && -n "$so" ]]; then
    cp "$so" "$VDIR/$tag.so"
    "$PY" scripts/ptxas_report.py "$VDIR/$tag-build.log" >"$VDIR/$tag-ptxas.txt" 2>&1
    echo "build_variants: $tag ok ($flags); kernels with spill bytes:"
    awk '$4 > 0 || $5 > 0' "$VDIR/$tag-ptxas.txt" | grep -v "spill st" | cut -c1-150
  else
    echo "build_variants: $tag FAILED ($flags):"
    grep -m3 -iE "error" "$VDIR/$tag-build.log" || tail -3 "$VDIR/$tag-build.log"
  fi
done
echo "build_variants: ${#specs[@]} variant(s) in $((SECONDS - begin)) s"
