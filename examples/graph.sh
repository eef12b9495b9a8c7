#!/usr/bin/env bash
# Attribution graphs (`tc graph`, docs/method.md section 9) of the README: the built-in model on the greater-than
# prompt and stories260K on the pronoun prompt, each beside the greedy circuit `tc circuit` finds for the
# same target.
#
#   1. transcoders for every layer (reused when they exist: the same commands as examples/greater_than.sh
#      and examples/stories260k.sh, seed 0)
#   2. tc graph --logit-diff 40 20 --heads on "The war lasted from the year 1735 to the year 17" (JSON), its
#      picture (pruned harder: node threshold 0.6, edge threshold 0.9; SVG), the same prompt with the
#      default targets (the likely next tokens), tc circuit on the same target and what the graph holds
#      that the circuit does not (scripts/graph_vs_circuit.py)
#   3. the same for stories260K (logit(" she") - logit(" he")), when ../shared is beside the checkout
#
# Environment: OUT (default demo-out), DEVICE (cpu), SHARED (../shared), IMAGES (a folder to copy the SVGs
# into: the README's pictures are docs/images, made with IMAGES=docs/images).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-demo-out}
DEVICE=${DEVICE:-cpu}
SHARED=${SHARED:-../shared}
mkdir -p "$OUT"

transcoders() {  # model corpus folder: train one TopK transcoder per layer unless the folder has them
  if [ ! -e "$3/layer_0/config.json" ]; then
    echo "== tc cache + tc train for $1" >&2
    mkdir -p "$(dirname "$3")"
    tc cache --model "$1" --data "$2" --layers all --tokens 100k --context 128 --dtype float16 \
      --out "$3.acts.h5" --device "$DEVICE" --force --quiet
    tc train --cache "$3.acts.h5" --out "$3" --tokens 400k --expansion 8 --k 8 --batch-size 1024 \
      --warmup-steps 50 --quiet
  fi
}

graphs() {  # name model transcoders prompt tokenA tokenB
  local name=$1 model=$2 tcs=$3 prompt=$4
  echo "== $name: tc graph --logit-diff $5 $6 --heads" >&2
  tc graph --model "$model" --device "$DEVICE" --transcoders "$tcs" --prompt "$prompt" \
    --logit-diff "$5" "$6" --heads --out "$OUT/graph_$name.json"
  echo "== $name: the picture: the same graph pruned harder (node threshold 0.6, edge threshold 0.9)" >&2
  tc graph --model "$model" --device "$DEVICE" --transcoders "$tcs" --prompt "$prompt" \
    --logit-diff "$5" "$6" --heads --node-threshold 0.6 --edge-threshold 0.9 \
    --out "$OUT/graph_${name}_picture.json" --quiet
  tc export "$OUT/graph_${name}_picture.json" --format svg --min-edge 0 --out "$OUT/graph_$name.svg"
  echo "== $name: tc graph with the default targets (the likely next tokens)" >&2
  tc graph --model "$model" --device "$DEVICE" --transcoders "$tcs" --prompt "$prompt" \
    --out "$OUT/graph_${name}_logits.json"
  echo "== $name: tc circuit on the same target, for comparison" >&2
  tc circuit --model "$model" --device "$DEVICE" --transcoders "$tcs" --prompt "$prompt" \
    --logit-diff "$5" "$6" --iters 3 --branches 10 --format json --out "$OUT/circuit_$name.json"
  tc info "$OUT/graph_$name.json"
  tc info "$OUT/graph_${name}_logits.json"
  python scripts/graph_vs_circuit.py "$OUT/graph_$name.json" "$OUT/circuit_$name.json"
  if [ -n "${IMAGES:-}" ]; then
    mkdir -p "$IMAGES"
    cp "$OUT/graph_$name.svg" "$IMAGES/"
  fi
}

# PARTS (default "builtin stories260k"): which of the two to run (scripts/readme_figures.py runs them apart)
PARTS=${PARTS:-builtin stories260k}
if [[ " $PARTS " == *" builtin "* ]]; then
  transcoders builtin tccli/builtin/text/demo.txt "$OUT/transcoders"
  graphs greater_than builtin "$OUT/transcoders" "The war lasted from the year 1735 to the year 17" 40 20
fi
if [[ " $PARTS " != *" stories260k "* ]]; then
  exit 0
fi

STORIES=$SHARED/models/stories260K
CORPUS=$SHARED/corpora/tinystories-valid-excerpt.txt
if [ -e "$STORIES/config.json" ] && [ -e "$CORPUS" ]; then
  transcoders "$STORIES" "$CORPUS" "$OUT/stories260k/transcoders"
  graphs stories260k "$STORIES" "$OUT/stories260k/transcoders" \
    "Once upon a time, there was a little girl named Lily. One day," she he
else
  echo "graph.sh: $STORIES or $CORPUS is missing (../shared is not beside the checkout): stories260K skipped" >&2
fi
