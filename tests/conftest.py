"""Test setup: run the real Triton kernels on the CPU through the interpreter when no GPU is here.

TRITON_INTERPRET must be set before triton is first imported, so this runs at collection.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed(request):
    # A fixed seed per test, different per test id: fresh data for each case, reproducible runs.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
