#!/usr/bin/env bash
# Stage-1 text corpus from caption parquets / txt files / webdataset shards.
# Extra arguments go to `xbt prep text`, e.g. --min-chars 10 --texts-per-shard 200000.
set -euo pipefail
SRC=${SRC:?set SRC to caption sources (a folder, file or glob)}
OUT=${OUT:?set OUT to the text shard folder}
CAPTION_COL=${CAPTION_COL:-TEXT}
if command -v xbt >/dev/null; then PREP=(xbt prep); else PREP=(python -m xbt_dist.prep); fi

# shellcheck disable=SC2086  # SRC may be a glob on purpose
"${PREP[@]}" text $SRC --out "$OUT" --caption-col "$CAPTION_COL" "$@"
"${PREP[@]}" validate "$OUT" --kind text
