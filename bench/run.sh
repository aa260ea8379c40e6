#!/usr/bin/env bash
# Reproduce bench/results/latest.json and the table on docs/performance.md with one command.
#   bash bench/run.sh                 # full plan: 10/100/300/1000 classes x 16/64 views (hours on 2 cores)
#   bash bench/run.sh --quick         # smoke run in seconds (tiny-random)
#   bash bench/run.sh --committed     # the reduced plan the committed table was made with (the flags
#                                     # below; docs/performance.md says what it leaves out)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [[ "${1:-}" == "--committed" ]]; then
  shift
  set -- --jobs 4 --requests 1 --baseline-requests 1 --side-classes 1000 --onnx-classes 100 --large-view-classes 100,300,1000 \
         --methods zeroshot,zero,tpt,tda "$@"
fi
exec "$PY" -m bench.run "$@"
