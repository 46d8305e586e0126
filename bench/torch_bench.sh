#!/usr/bin/env bash
# Torch-side benchmark (FSDP2 on CPU, 4 ranks, >= 1 GB model): weightsync vs every rank calling
# full_tensor() with the engine slicing its part. Needs the built daemon ($WS_BUILD_DIR, default build/)
# and a Python with torch, transformers, grpcio, protobuf (tests/python/requirements.txt).
#   bench/torch_bench.sh [--ranks 4] [--tp 2] [--layers 10] [--repeats 3] [--json out.json]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" bench/torch_bench.py run "$@"
