"""Shared test helpers. Tests run on a CPU-only machine; GPU tests skip with a reason.

Without CUDA the session runs the Triton kernels in the interpreter (``TRITON_INTERPRET=1``, set here before
anything imports skillkern or triton, unless the variable is already set), so ``python -m pytest -q tests`` runs
the kernel tests as CI does. ``TRITON_INTERPRET=0`` keeps the interpreter off (the kernel tests then skip).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    if "skillkern.ops" in sys.modules:  # its kernels were decorated already: the switch would come too late
        warnings.warn("skillkern was imported before tests/conftest.py could set TRITON_INTERPRET=1: the Triton "
                      "kernel tests will skip; set the variable in the environment")
    else:
        os.environ["TRITON_INTERPRET"] = "1"

from tiny_models import TYPES  # noqa: E402  (imports skillkern: after the interpreter switch)

# CI sets SKILLKERN_DATA=../shared/data; a developer checkout next to shared/ works without it.
_DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if "SKILLKERN_DATA" not in os.environ and _DEFAULT_DATA.is_dir():
    os.environ["SKILLKERN_DATA"] = str(_DEFAULT_DATA)

DATA_DIR = os.environ.get("SKILLKERN_DATA")
HAVE_DATA = bool(DATA_DIR) and (Path(DATA_DIR) / "sst2" / "task.json").is_file()

requires_data = pytest.mark.skipif(not HAVE_DATA, reason="task data not found: set SKILLKERN_DATA to ../shared/data")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (thread start-up dominates at these sizes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=TYPES)
def model_type(request) -> str:
    """Every row of the architecture table, one test each (build its model with tiny_models.tiny_model)."""
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
