#!/usr/bin/env bash
# The figure the docs quote for `make demo` from a fresh clone: clones this checkout (HEAD) into a temporary
# folder beside it (so ../shared is found as in CI), runs `make demo` there with a fresh .venv, and prints
# the wall time, the CPU time and the machine's load average before and after. The clone is removed at
# the end unless KEEP=1.
#   bash scripts/time_demo.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "$(dirname "$here")/time-demo.XXXXXX")
trap '[ "${KEEP:-0}" = 1 ] || rm -rf "$work"' EXIT
git clone -q "$here" "$work/tc"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
cd "$work/tc"
start=$(date +%s.%N)
/usr/bin/time -f "make demo from a fresh clone: %e s wall, %U s user + %S s system CPU" make demo >"$work/demo.log" 2>&1 \
  || { tail -20 "$work/demo.log" >&2; exit 1; }
tail -1 "$work/demo.log"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores; started $(date -d @"${start%.*}" -u +%FT%TZ)"
