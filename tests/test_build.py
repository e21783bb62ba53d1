"""The extension is optional: skillkern imports and works without it, and it loads on its own when built."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from skillkern import _ext


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


def test_import_without_extension():
    code = """
import torch, skillkern
from skillkern import _ext
from skillkern.ops.stats_update import stats_update
assert not _ext.available(), "extension loaded despite SKILLKERN_NO_EXT=1"
assert "SKILLKERN_NO_EXT" in _ext.unavailable_reason(), _ext.unavailable_reason()
out = torch.zeros(1, 2, 3, dtype=torch.float64)
stats_update(torch.ones(2, 3), torch.tensor([0, -1]), torch.tensor([1, 0]), out)  # auto: PyTorch fallback
assert out[0, 1].tolist() == [1.0, 1.0, 1.0] and out[0, 0].sum() == 0, out
try:
    stats_update(torch.ones(2, 3), torch.tensor([0, -1]), torch.tensor([1, 0]), out, backend="ext")
except RuntimeError as err:
    assert "SKILLKERN_NO_EXT=1" in str(err), err
else:
    raise AssertionError("backend='ext' did not raise without the extension")
"""
    result = run_python(code, SKILLKERN_NO_EXT="1")
    assert result.returncode == 0, result.stderr


def test_extension_imports_before_torch():
    # The brief's smoke test: `import skillkern._C` first must find libtorch by itself (setup.py sets an rpath).
    if not _ext.available():
        if os.environ.get("SKILLKERN_REQUIRE_EXT") == "1":
            pytest.fail(f"SKILLKERN_REQUIRE_EXT=1 but {_ext.unavailable_reason()}")
        pytest.skip(f"compiled extension unavailable: {_ext.unavailable_reason()}")
    result = run_python("import skillkern._C, torch; print(torch.ops.skillkern.stats_update.default.name())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "skillkern::stats_update"
