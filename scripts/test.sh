#!/usr/bin/env bash
# The test command: installs dependencies, builds everything (CUDA included
# when the toolkit is present) and runs every test through ctest: unit tests,
# integration tests (real daemon + clients over a unix socket) and GPU tests
# (which skip, visibly, without a device).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${WS_SKIP_DEPS:-0}" = 1 ] || scripts/install-deps.sh
scripts/build.sh
ctest --test-dir build --output-on-failure -j "${WS_TEST_JOBS:-2}" "$@"
