#!/usr/bin/env bash
# Before scripts/device_check.sh: gather here (where pip reaches its registry) what the lent GPU machine
# lacks, into folders git ignores, to be named in the device call's `carry`:
#   .whl/        wheels of tc's dependencies missing from the machine's image (as seen on 2026-11-27)
#   .devshared/  a copy of ../shared (the device call sends the checkout only)
#   .base/       with BASE=<commit>: that commit's tccli, for device_check.sh's train_ab step
#
#   [BASE=<commit>] bash scripts/device_prepare.sh
#
# then, through the device tool: command `OUT=$OUT BUDGET=480 bash scripts/device_check.sh`,
# carry [".whl", ".devshared"] (and ".base").
set -euo pipefail
cd "$(dirname "$0")/.."
for folder in .whl .devshared .base; do
  grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >> .git/info/exclude
done
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl \
  transformer-lens==4.3.0 beartype==0.23.1 fancy-einsum==0.0.3 typeguard==4.6.1 graphviz==0.21 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
rm -rf .devshared && cp -r ../shared .devshared
if [ -n "${BASE:-}" ]; then rm -rf .base && mkdir .base && git archive "$BASE" tccli | tar -x -C .base; fi
du -sh .whl .devshared ${BASE:+.base}
