#!/usr/bin/env bash
# A cross-layer transcoder against a per-layer set on stories260K (docs/commands/clt.md), at equal total
# features (5 x 1,024 CLT features against five 1,024-feature transcoders), the same activation (TopK, k 8
# per layer and token), the same cache and the same training tokens:
#
#   1. tc cache: every layer's MLP input and output on TinyStories text
#   2. tc train: the per-layer set, and tc train --kind clt: the CLT
#   3. tc eval of both on text the cache did not read (per-layer FVU and CE recovered, and all MLPs at once)
#   4. tc graph of both on the 20 prompts of examples/prompts/stories260k_twenty.txt (likely next tokens)
#   5. scripts/clt_comparison.py: the table (per-layer FVU, CE recovered, mean replacement and completeness
#      scores, mean nodes kept); and the picture of the CLT's graph on the first prompt
#
# Environment: OUT (default demo-out/clt), DEVICE (cpu), SHARED (../shared), TOKENS (training tokens, 1M),
# IMAGES (a folder to copy the picture into: the docs' picture is docs/images, made with IMAGES=docs/images).
set -euo pipefail
cd "$(dirname "$0")/.."

SHARED=${SHARED:-../shared}
MODEL=$SHARED/models/stories260K
CORPUS=$SHARED/corpora/tinystories-valid-excerpt.txt
OUT=${OUT:-demo-out/clt}
DEVICE=${DEVICE:-cpu}
TOKENS=${TOKENS:-1M}
PROMPTS=examples/prompts/stories260k_twenty.txt
for needed in "$MODEL/config.json" "$CORPUS"; do
  if [ ! -e "$needed" ]; then
    echo "clt: $needed is missing: this example needs ../shared beside the checkout" >&2
    exit 1
  fi
done
mkdir -p "$OUT/graphs"

echo "== tc cache: stories260K, every layer, 250k tokens" >&2
tc cache --model "$MODEL" --data "$CORPUS" --layers all --tokens 250k --context 128 --dtype float16 \
  --out "$OUT/acts.h5" --device "$DEVICE" --force --quiet
echo "== tc train: five per-layer transcoders, 1,024 features each (TopK, k 8), $TOKENS tokens" >&2
tc train --cache "$OUT/acts.h5" --out "$OUT/per_layer" --tokens "$TOKENS" --expansion 16 --k 8 \
  --batch-size 1024 --warmup-steps 50 --force --quiet
echo "== tc train --kind clt: one CLT, 1,024 features per layer (TopK, k 8 per layer), $TOKENS tokens" >&2
tc train --kind clt --cache "$OUT/acts.h5" --out "$OUT/clt_run" --tokens "$TOKENS" --expansion 16 --k 8 \
  --batch-size 1024 --warmup-steps 50 --force --quiet
tc info "$OUT/clt_run/clt"

for name in per_layer clt; do
  transcoders=$OUT/per_layer
  [ "$name" = clt ] && transcoders=$OUT/clt_run/clt
  echo "== tc eval ($name) on text the cache did not read (--seed 1)" >&2
  tc eval --model "$MODEL" --device "$DEVICE" --data "$CORPUS" --seed 1 --tokens 50k \
    --transcoders "$transcoders" --json --quiet > "$OUT/eval_$name.json"
  echo "== tc graph ($name) on the 20 prompts" >&2
  i=0
  while IFS= read -r prompt; do
    tc graph --model "$MODEL" --device "$DEVICE" --transcoders "$transcoders" --prompt "$prompt" \
      --out "$OUT/graphs/${name}_$i.json" --quiet
    i=$((i + 1))
  done < "$PROMPTS"
done

python scripts/clt_comparison.py "$OUT"

echo "== the picture: the CLT's graph on the first prompt, pruned harder" >&2
tc graph --model "$MODEL" --device "$DEVICE" --transcoders "$OUT/clt_run/clt" --prompt "$(head -1 "$PROMPTS")" \
  --node-threshold 0.6 --edge-threshold 0.9 --out "$OUT/graph_clt_picture.json" --quiet
tc export "$OUT/graph_clt_picture.json" --format svg --min-edge 0 --out "$OUT/graph_clt.svg"
if [ -n "${IMAGES:-}" ]; then
  mkdir -p "$IMAGES"
  cp "$OUT/graph_clt.svg" "$IMAGES/"
fi
