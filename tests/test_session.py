"""The test session itself: ``python -m pytest -q tests`` (the README's command) runs the Triton kernel tests on a
machine without CUDA, because tests/conftest.py turns the interpreter on when nobody set ``TRITON_INTERPRET``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skillkern.ops.dispatch import HAVE_TRITON

PROBE = "_SKILLKERN_SESSION_PROBE"


@pytest.mark.skipif(os.environ.get(PROBE) != "1", reason="runs inside the child session of the test below")
def test_probe_kernels_are_interpreted():
    from skillkern.ops.dispatch import triton_interpreted

    assert os.environ.get("TRITON_INTERPRET") == "1" and triton_interpreted()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the kernels are compiled, not interpreted")
@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")
def test_session_without_cuda_turns_on_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[PROBE] = "1"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "probe"],
                          env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                          timeout=300)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
