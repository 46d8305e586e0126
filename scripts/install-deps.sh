#!/usr/bin/env bash
# Installs everything weightsync needs on a fresh Debian 12 machine:
# compilers (gcc; clang with its sanitizer and libFuzzer runtimes for
# scripts/sanitize.sh and scripts/fuzz.sh), gRPC/Protobuf, spdlog, CLI11,
# nlohmann-json, GoogleTest, ccache, openssl (the TLS tests make their
# certificates with it), cpp-httplib (/metrics), libsystemd (sd_notify),
# prometheus (the metrics test scrapes the daemon with a real server), dpkg-dev
# and file (cpack -G DEB), and a Python venv (.venv) for the integration
# tests' independent reference.
# Idempotent: skips what is already present. Needs root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(build-essential cmake ninja-build pkg-config ccache git clang libclang-rt-14-dev
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
      libspdlog-dev libcli11-dev nlohmann-json3-dev libgtest-dev libgmock-dev
      python3 python3-venv python3-pip systemd openssl
      python3-grpcio python3-protobuf passwd util-linux
      libcpp-httplib-dev libsystemd-dev prometheus dpkg-dev file libucx-dev iproute2)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PY=${WS_PYTHON_BIN:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r tests/requirements.txt
# torch + transformers build real Hugging Face checkpoints for the layout tests
# and run the Python client's FSDP tests (PyPI's torch wheel brings its CUDA
# libraries: several GB). WS_NO_TORCH=1 skips them; those tests then fall back
# to committed checkpoints or skip, visibly.
if [ "${WS_NO_TORCH:-0}" != 1 ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r tests/requirements-hf.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt
fi
# The Python client package itself (pure Python: grpcio + protobuf).
.venv/bin/python -m pip install -q --disable-pip-version-check ./client/python
echo "dependencies ready"
