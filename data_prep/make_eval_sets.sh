#!/usr/bin/env bash
# Eval shard sets in the usual layout under $EVAL_ROOT:
#   karpathy/dataset_coco.json, karpathy/dataset_flickr30k.json, coco/{val2014,train2014}/,
#   flickr30k/images/, nocaps/nocaps_val_4500_captions.json, nocaps/val/,
#   imagenet/val/<wnid>/*.JPEG, imagenet/classes.txt, imagenet/templates.txt
# Sets whose inputs are absent are skipped with a note.
set -euo pipefail
EVAL_ROOT=${EVAL_ROOT:?set EVAL_ROOT to the folder holding the raw eval data}
OUT_ROOT=${OUT_ROOT:-$EVAL_ROOT/shards}
if command -v xbt >/dev/null; then PREP=(xbt prep); else PREP=(python -m xbt_dist.prep); fi
have() { [ -e "$1" ] || { echo "skip: $1 not found"; return 1; }; }

if have "$EVAL_ROOT/karpathy/dataset_coco.json"; then
  "${PREP[@]}" evalset "$EVAL_ROOT/karpathy/dataset_coco.json" --format coco \
      --image-root "$EVAL_ROOT/coco" --split test --out "$OUT_ROOT/coco_karpathy_test"
fi
if have "$EVAL_ROOT/karpathy/dataset_flickr30k.json"; then
  "${PREP[@]}" evalset "$EVAL_ROOT/karpathy/dataset_flickr30k.json" --format flickr30k \
      --image-root "$EVAL_ROOT/flickr30k/images" --split test --out "$OUT_ROOT/flickr30k_test"
fi
if have "$EVAL_ROOT/nocaps/nocaps_val_4500_captions.json"; then
  "${PREP[@]}" evalset "$EVAL_ROOT/nocaps/nocaps_val_4500_captions.json" --format nocaps \
      --image-root "$EVAL_ROOT/nocaps/val" --out "$OUT_ROOT/nocaps_val"
fi
if have "$EVAL_ROOT/imagenet/val"; then
  args=()
  [ -f "$EVAL_ROOT/imagenet/classes.txt" ] && args+=(--class-names "$EVAL_ROOT/imagenet/classes.txt")
  [ -f "$EVAL_ROOT/imagenet/templates.txt" ] && args+=(--templates "$EVAL_ROOT/imagenet/templates.txt")
  "${PREP[@]}" zeroshot "$EVAL_ROOT/imagenet/val" --out "$OUT_ROOT/imagenet_val" "${args[@]}"
fi
for d in "$OUT_ROOT"/*/; do "${PREP[@]}" validate "$d" --no-decode; done
