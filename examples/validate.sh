#!/usr/bin/env bash
# tc validate on the walkthrough's two circuits (the README's "Validating circuits" section quotes this):
#   1. the built-in model's greater-than circuit (`tc circuit --logit-diff 40 20`, as examples/greater_than.sh
#      traces it) over the 100 greater-than prompts: the probability difference with the circuit ablated and
#      with only the circuit kept, against 5 random circuits of equal size and layers; zero ablation in
#      free and frozen modes, mean ablation in free mode;
#      the same on the graph's own prompt alone; and the graph's largest node ablated with only MLP 0
#      replaced (the real model downstream);
#   2. the stories260K pronoun circuit (logit(" she") - logit(" he"), as examples/stories260k.sh traces it)
#      over the 20 prompts of examples/prompts/stories260k_lily.txt, zero ablation, free and frozen modes.
# Transcoders (and the features file mean ablation needs) are reused from `make demo`,
# examples/greater_than.sh and examples/stories260k.sh when present, else made here with the same
# settings. CPU work: run it as `nice -n 10 bash examples/validate.sh`.
#
# Environment: OUT (default demo-out), DEVICE (cpu), SHARED (../shared, for stories260K; skipped if absent),
# PARTS (default "builtin stories260k": which of the two to run).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-demo-out}
DEVICE=${DEVICE:-cpu}
SHARED=${SHARED:-../shared}
PARTS=${PARTS:-builtin stories260k}
mkdir -p "$OUT"
started=$(date +%s)

transcoders() {  # MODEL DATA FOLDER: cache + train exactly as examples/demo.sh does, unless already there
  local model=$1 data=$2 folder=$3
  if [ ! -e "$folder/transcoders/layer_0/config.json" ]; then
    echo "== tc cache + tc train for $model into $folder" >&2
    mkdir -p "$folder"
    tc cache --model "$model" --data "$data" --layers all --tokens 100k --context 128 --dtype float16 \
      --out "$folder/acts.h5" --device "$DEVICE" --force --quiet
    tc train --cache "$folder/acts.h5" --out "$folder/transcoders" --tokens 400k --expansion 8 --k 8 \
      --batch-size 1024 --warmup-steps 50 --quiet
  fi
}

# ---------------------------------------------------------------------------- the built-in model: greater-than
if [[ " $PARTS " == *" builtin "* ]]; then
DATA=tccli/builtin/text/demo.txt
transcoders builtin "$DATA" "$OUT"
if [ ! -e "$OUT/features.jsonl" ]; then
  echo "== tc score (means for mean ablation)" >&2
  tc score --model builtin --device "$DEVICE" --data "$DATA" --tokens 30k --transcoders "$OUT/transcoders" \
    --out "$OUT/features.jsonl" --quiet
fi
rm -f "$OUT/greater_than.json"
tc circuit --model builtin --device "$DEVICE" --transcoders "$OUT/transcoders" \
  --prompt "The war lasted from the year 1735 to the year 17" --logit-diff 40 20 --iters 3 --branches 10 \
  --format json --out "$OUT/greater_than.json"
for setting in "free zero" "free mean" "frozen zero"; do
  read -r mode ablation <<< "$setting"
  echo "== tc validate greater-than: $mode mode, $ablation ablation" >&2
  tc validate "$OUT/greater_than.json" --device "$DEVICE" --task greater-than --mode "$mode" \
    --ablation "$ablation" --features "$OUT/features.jsonl" --random 5 --batch-size 256 --json \
    > "$OUT/validate_greater_than_${mode}_${ablation}.json"
done
for mode in free frozen; do  # the graph's own prompt alone
  tc validate "$OUT/greater_than.json" --device "$DEVICE" --mode "$mode" --random 5 --json \
    > "$OUT/validate_greater_than_prompt_${mode}.json"
done
echo "== L0.F934 (the greater-than circuit's largest node) ablated with only MLP 0 replaced (the real model downstream)" >&2
tc intervene --model builtin --device "$DEVICE" --transcoders "$OUT/transcoders/layer_0" \
  --prompt "The war lasted from the year 1735 to the year 17" --logit-diff 40 20 --ablate mlp0.f934@12 --top 3
fi

# ---------------------------------------------------------------------------- stories260K: she / he
STORIES=$SHARED/models/stories260K
if [[ " $PARTS " != *" stories260k "* ]]; then
  :
elif [ -e "$STORIES/config.json" ]; then
  transcoders "$STORIES" "$SHARED/corpora/tinystories-valid-excerpt.txt" "$OUT/stories260k"
  rm -f "$OUT/stories260k/circuit.json"
  tc circuit --model "$STORIES" --device "$DEVICE" --transcoders "$OUT/stories260k/transcoders" \
    --prompt "Once upon a time, there was a little girl named Lily. One day," --logit-diff she he \
    --iters 3 --branches 10 --format json --out "$OUT/stories260k/circuit.json"
  for mode in free frozen; do
    echo "== tc validate stories260K: $mode mode" >&2
    tc validate "$OUT/stories260k/circuit.json" --device "$DEVICE" --prompts examples/prompts/stories260k_lily.txt \
      --mode "$mode" --random 5 --batch-size 256 --json > "$OUT/validate_stories260k_${mode}.json"
  done
else
  echo "stories260K is not at $STORIES: its validation is skipped" >&2
fi

# ---------------------------------------------------------------------------- the figures the README quotes
# (scripts/readme_figures.py prints the same tables into the README)
if [[ " $PARTS " == *" builtin "* ]]; then
  python3 scripts/validation_table.py "$OUT"/validate_greater_than_{free_zero,free_mean,frozen_zero}.json
  python3 scripts/validation_table.py "$OUT"/validate_greater_than_prompt_{free,frozen}.json
fi
if [ -e "$OUT/validate_stories260k_free.json" ] && [[ " $PARTS " == *" stories260k "* ]]; then
  python3 scripts/validation_table.py "$OUT"/validate_stories260k_{free,frozen}.json --nodes 5
fi
echo "validate: done in $(( $(date +%s) - started )) s" >&2
