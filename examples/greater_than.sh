#!/usr/bin/env bash
# The paper's greater-than case study (section 6 of docs/docs/method.md) on tc's built-in model.
#
#   1. the model's probability difference on 100 prompts "The war lasted from the year 17YY to the year 17"
#   2. transcoders for every layer (reused from `make demo` when demo-out/transcoders exists)
#   3. the probability difference with each MLP replaced by its transcoder, and with all replaced
#   4. `tc circuit --logit-diff 40 20` from the last token of "... from the year 1735 to the year 17"
#   5. the graph as SVG, and its top features (with the tokens they de-embed to) and heads
#
# Environment: MODEL (default builtin), DATA (text for the cache), OUT (default demo-out), DEVICE (cpu).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-builtin}
DATA=${DATA:-tccli/builtin/text/demo.txt}
OUT=${OUT:-demo-out}
DEVICE=${DEVICE:-cpu}
PROMPT="The war lasted from the year 1735 to the year 17"
mkdir -p "$OUT"

echo "== the model alone" >&2
tc greater-than --model "$MODEL" --device "$DEVICE"

if [ ! -e "$OUT/transcoders/layer_0/config.json" ]; then
  echo "== tc cache + tc train (every layer): transcoders to splice in and trace through" >&2
  tc cache --model "$MODEL" --data "$DATA" --tokens 100k --out "$OUT/acts.h5" --device "$DEVICE" --force --quiet
  tc train --cache "$OUT/acts.h5" --out "$OUT/transcoders" --tokens 400k --expansion 8 --k 8 \
    --batch-size 1024 --warmup-steps 50 --force --quiet
fi

echo "== tc circuit --logit-diff 40 20 on: $PROMPT" >&2
tc circuit --model "$MODEL" --device "$DEVICE" --transcoders "$OUT/transcoders" --prompt "$PROMPT" \
  --logit-diff 40 20 --iters 3 --branches 10 --format json --out "$OUT/greater_than.json" --force
tc export "$OUT/greater_than.json" --format svg --out "$OUT/greater_than.svg" --force
echo "== the probability difference with MLPs replaced, and the circuit's top nodes" >&2
tc greater-than --model "$MODEL" --device "$DEVICE" --transcoders "$OUT/transcoders" \
  --graph "$OUT/greater_than.json" --top 10
echo "wrote $OUT/greater_than.svg" >&2
