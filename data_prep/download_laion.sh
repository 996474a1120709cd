#!/usr/bin/env bash
# Download a LAION-style URL parquet into webdataset shards, then validate them (writes sizes.json).
# Extra arguments go to `xbt prep images` (they override the preset), e.g. --image-size 384.
set -euo pipefail
URLS=${URLS:?set URLS to the URL parquet file or folder}
OUT=${OUT:?set OUT to the output shard folder}
PRESET=${PRESET:-laion400m}
PROCS=${PROCS:-$(nproc)}
THREADS=${THREADS:-64}
VALIDATE_WORKERS=${VALIDATE_WORKERS:-$(nproc)}
if command -v xbt >/dev/null; then PREP=(xbt prep); else PREP=(python -m xbt_dist.prep); fi

"${PREP[@]}" images "$URLS" "$OUT" --preset "$PRESET" \
    --processes-count "$PROCS" --thread-count "$THREADS" "$@"
"${PREP[@]}" validate "$OUT" --workers "$VALIDATE_WORKERS"
