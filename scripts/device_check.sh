#!/usr/bin/env bash
# The GPU check, as one script for a lent machine: the benchmarks with --device cuda and the test suite
# (whose default device, auto, is cuda there), each under its own time limit, logs written to $OUT.
#
#   OUT=/some/folder BUDGET=480 [STEPS="train_throughput tests ..."] bash scripts/device_check.sh
#
# The test suite runs with --device cuda (tests/conftest.py), so the commands' default device is the GPU.
# STEPS names the steps to run, in order (default: all but the profiles and the A/B); see the case below.
# train_ab compares the tccli in .base/ (an older checkout's package, copied there) with this one, in
# the same call, so the two figures come from one machine.
# scripts/device_prepare.sh makes .whl/, .devshared/ and .base/ here first. Wheels in .whl/ are
# installed into /tmp/site there (and those in .whl2/, if present, when tc or TransformerLens still fails
# to import); ../shared is copied from .devshared/ when it is not beside the checkout. Nothing is
# installed into the machine's own environment. On 2026-11-27 the image lacked transformer-lens 4.3.0,
# beartype, fancy-einsum, typeguard, graphviz, datasets, dill and multiprocess; its own transformers,
# huggingface_hub and torch 2.11 served.
set -u
OUT=${OUT:-/tmp/device_check}
BUDGET=${BUDGET:-480}          # seconds for everything; each step gets what is left of it, capped
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
# step NAME CAP COMMAND...: runs COMMAND under min(CAP, time left - 5) seconds, output to $OUT/NAME.log
step() {
  local name=$1 cap=$2; shift 2
  local limit; limit=$(left); limit=$(( limit - 5 < cap ? limit - 5 : cap ))
  if [ "$limit" -lt 10 ]; then echo "$name: skipped (no time left)" | tee -a "$OUT/summary.txt"; return; fi
  local t0; t0=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: rc $? in $(( $(date +%s) - t0 )) s (limit $limit)" | tee -a "$OUT/summary.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; python3 --version; } \
  > "$OUT/env.txt" 2>&1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$OUT/env.txt" 2>&1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
imports() { python3 -c "import tccli.cli.app, tccli.model.loading; from transformer_lens.model_bridge import TransformerBridge"; }
if ! imports >> "$OUT/env.txt" 2>&1 && [ -d .whl2 ]; then
  echo "imports failed; installing .whl2 too" >> "$OUT/env.txt"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl2/*.whl \
    >> "$OUT/env.txt" 2>&1
  imports >> "$OUT/env.txt" 2>&1 || echo "imports still fail" >> "$OUT/env.txt"
fi
python3 -c "import torch, transformers, transformer_lens, numpy, h5py; print('torch', torch.__version__, 'cuda', \
torch.cuda.is_available(), 'transformers', transformers.__version__, 'numpy', numpy.__version__, 'h5py', h5py.__version__)" \
  >> "$OUT/env.txt" 2>&1
[ -d ../shared ] || { [ -d .devshared ] && cp -r .devshared ../shared; }
cat "$OUT/env.txt"

run_step() {
  case $1 in
    # issue 12's GPU items: the step loop on cuda from memory and HDF5, then bf16 autocast (memory only)
    train_throughput) step train_throughput 110 python3 benchmarks/train_throughput.py --device cuda --steps 20 ;;
    train_throughput_bf16) step train_throughput_bf16 50 python3 benchmarks/train_throughput.py --device cuda \
                             --steps 20 --autocast bfloat16 --no-hdf5 ;;
    train_ab) step train_base 60 env PYTHONPATH="$PWD/.base:$PYTHONPATH" python3 benchmarks/train_throughput.py \
                --device cuda --steps 20
              step train_profiled 80 python3 benchmarks/train_throughput.py --device cuda --steps 20 --profile ;;
    score_profile) step score_profile 40 python3 benchmarks/score_throughput.py --device cuda --tokens-gpt2 0 \
                     --repeats 1 --profile ;;
    # -v names every test as it ends, so a run cut short still says which failed
    tests) step tests 230 python3 -m pytest --device cuda -p xdist -n 14 --dist loadfile --timeout 200 -p no:cacheprovider -v \
             --tb=short --durations 15 tests ;;
    graph_latency) step graph_latency 70 python3 benchmarks/graph_latency.py --device cuda --tokens 32 128 ;;
    score_throughput) step score_throughput 50 python3 benchmarks/score_throughput.py --device cuda --repeats 2 ;;
    distributed_scaling) step distributed_scaling 40 python3 benchmarks/distributed_scaling.py --device cuda --procs 1 ;;
    cache_throughput) step cache_throughput 50 python3 benchmarks/cache_throughput.py --repeats 2 ;;
    circuit_latency) step circuit_latency 50 python3 benchmarks/circuit_latency.py --repeats 3 ;;
    *) echo "unknown step $1" | tee -a "$OUT/summary.txt" ;;
  esac
}
for name in ${STEPS:-train_throughput train_throughput_bf16 tests graph_latency score_throughput distributed_scaling \
                    cache_throughput circuit_latency}; do
  run_step "$name"
done
cat "$OUT/summary.txt"
