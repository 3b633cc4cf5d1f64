#!/usr/bin/env bash
# Device machine: make variant <tag> of scripts/build_variants.sh the extension that this checkout's
# editable install loads (kernels/_C*.so), for the next Python process.
#   bash scripts/use_variant.sh b4
set -euo pipefail
cd "$(dirname "$0")/.."
VDIR=${VDIR:-/tmp/variants}
tag=${1:?usage: use_variant.sh <tag>}
so=$(ls kernels/_C*.so 2>/dev/null | head -1 || true)
so=${so:-kernels/$(basename "$(ls "$VDIR/src-$tag"/kernels/_C*.so | head -1)")}
cp "$VDIR/$tag.so" "$so"
