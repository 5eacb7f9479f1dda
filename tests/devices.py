"""Tests that need a device this machine may lack: skipped where it is missing, failed where it is required.

A CUDA test skips without a GPU, so a run on a machine without one says nothing about CUDA. Where a GPU is meant to be
there (a run on a lent GPU machine), ``CINEMATIC_REQUIRE_CUDA=1`` makes a missing or unusable GPU fail every CUDA
test instead, as ``CINEMATIC_REQUIRE_BROWSER=1`` does for the browser test (tests/test_serve_browser.py).
"""

from __future__ import annotations

import os

import pytest
import torch

REQUIRE_CUDA = "CINEMATIC_REQUIRE_CUDA"


def need_cuda() -> None:
    """Return if a CUDA device is usable; otherwise skip the calling test, or fail it under CINEMATIC_REQUIRE_CUDA=1."""
    if torch.cuda.is_available():
        return
    reason = f"needs a CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda})"
    if os.environ.get(REQUIRE_CUDA) == "1":
        pytest.fail(f"{reason}; {REQUIRE_CUDA}=1 makes that an error")
    pytest.skip(reason)


def cuda(test):
    """Mark ``test`` as needing a CUDA device: ``-m cuda`` selects it, and ``cuda_device`` (conftest.py) runs
    :func:`need_cuda` before it."""
    return pytest.mark.cuda(pytest.mark.usefixtures("cuda_device")(test))
