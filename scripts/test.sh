#!/usr/bin/env bash
# The test command: installs dependencies, builds everything (CUDA included
# when the toolkit is present) and runs every test through ctest: unit tests,
# integration tests (real daemon + clients over a unix socket) and GPU tests
# (which skip, visibly, without a device) and the real-vLLM tests (tests/vllm).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${WS_SKIP_DEPS:-0}" = 1 ] || scripts/install-deps.sh
# the real-vLLM tests' venv (cached; WS_NO_VLLM=1 skips it and those tests then skip, visibly)
[ "${WS_SKIP_DEPS:-0}" = 1 ] || [ "${WS_NO_VLLM:-0}" = 1 ] || scripts/vllm-venv.sh
scripts/build.sh
ctest --test-dir build --output-on-failure -j "${WS_TEST_JOBS:-2}" "$@"
