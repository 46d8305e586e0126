"""Fixtures of the Python tests (helpers live in ws_helpers.py)."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ws_helpers import DaemonProcess  # noqa: E402


@pytest.fixture(scope="module")
def daemon():
    tmp = tempfile.mkdtemp(prefix="ws-py-")
    d = DaemonProcess(tmp)
    yield d
    d.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def checkpoints():
    """{arch: path} of tiny random checkpoints written with save_pretrained."""
    import models
    tmp = tempfile.mkdtemp(prefix="ws-ckpt-")
    out = {arch: models.save_checkpoint(arch, os.path.join(tmp, arch)) for arch in models.CONFIGS}
    yield out
    shutil.rmtree(tmp, ignore_errors=True)
