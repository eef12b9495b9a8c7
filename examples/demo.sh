#!/usr/bin/env bash
# The method end to end on a model that needs no download (`make demo` runs this with .venv/bin on PATH).
# Later steps (train, eval, score, circuit) are appended by their issues.
set -euo pipefail
cd "$(dirname "$0")/.."

# The built-in model (tccli/builtin/model, a 4-layer GPT-2) and the text shipped beside it: no download,
# no ../shared. MODEL/CORPUS may point elsewhere (examples/stories260k.sh does that for stories260K).
MODEL=${MODEL:-builtin}
CORPUS=${CORPUS:-tccli/builtin/text/demo.txt}
OUT=${OUT:-demo-out}
DEVICE=${DEVICE:-cpu}
# SKIP: steps to leave out, among "eval score" (scripts/readme_figures.py runs the eval itself, and
# stories260K's figures need no features file)
SKIP=${SKIP:-}
mkdir -p "$OUT"
started=$(date +%s)

echo "== tc cache: MLP inputs and outputs of every layer of the $MODEL model" >&2
tc cache --model "$MODEL" --data "$CORPUS" --layers all --tokens 100k --context 128 \
  --dtype float16 --out "$OUT/acts.h5" --device "$DEVICE" --force
echo "== tc info" >&2
tc info "$OUT/acts.h5"

# ---------------------------------------------------------------------------- issue 6: the rest of the method
echo "== tc train: one transcoder per layer (TopK, k 8, 8 x d_model features, 400k tokens)" >&2
tc train --cache "$OUT/acts.h5" --out "$OUT/transcoders" --tokens 400k --expansion 8 --k 8 \
  --batch-size 1024 --warmup-steps 50 --force --quiet
if [[ " $SKIP " != *" eval "* ]]; then
  echo "== tc eval: fidelity on text the cache did not read (--seed 1 packs other rows first)" >&2
  tc eval --model "$MODEL" --device "$DEVICE" --data "$CORPUS" --seed 1 --tokens 50k \
    --transcoders "$OUT/transcoders" --quiet
fi
if [[ " $SKIP " != *" score "* ]]; then
  echo "== tc score: density, examples, de-embeddings, logit effects of every feature" >&2
  tc score --model "$MODEL" --device "$DEVICE" --data "$CORPUS" --tokens 30k \
    --transcoders "$OUT/transcoders" --out "$OUT/features.jsonl" --force --quiet
  tc show "$OUT/features.jsonl" --html "$OUT/features.html" --limit 40 --force
fi
PROMPT=${PROMPT:-The war lasted from the year 1735 to the year 17}
TARGET=${TARGET:-40 20}
echo "== tc circuit --logit-diff $TARGET on: $PROMPT" >&2
# shellcheck disable=SC2086  # TARGET is two tokens
tc circuit --model "$MODEL" --device "$DEVICE" --transcoders "$OUT/transcoders" --prompt "$PROMPT" \
  --logit-diff $TARGET --iters 3 --branches 10 --format json --out "$OUT/circuit.json" --force
tc export "$OUT/circuit.json" --format dot --out "$OUT/circuit.dot" --force
tc export "$OUT/circuit.json" --format svg --out "$OUT/circuit.svg" --force
if [[ " $SKIP " != *" score "* ]]; then
  echo "== tc view: the circuit as a page to explore in a browser, with the features' labels and cards" >&2
  tc view "$OUT/circuit.json" --features "$OUT/features.jsonl" --out "$OUT/circuit.html" --force
fi
echo "demo: done in $(( $(date +%s) - started )) s; the picture is $OUT/circuit.svg, the page to explore it $OUT/circuit.html, the features $OUT/features.html" >&2
