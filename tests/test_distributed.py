"""Data-parallel scoring with torchrun (gloo on CPU) equals one process."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors import safe_open

from conftest import requires_data

ARGS = ["score", "--task", "sst2", "--max-baseline", "90", "--max-eval", "61", "--batch-size", "8",
        "--max-length", "48", "--no-progress"]


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@requires_data
def test_two_process_gloo_equals_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "skillkern"] + ARGS + ["--out", str(one)], check=True, env=env,
                   timeout=300, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    res = subprocess.run(torchrun + ["-m", "skillkern"] + ARGS + ["--out", str(two)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _read(one / "stats.safetensors"), _read(two / "stats.safetensors")
    for key in ("above", "eval_class_count", "baseline_class_count", "predictivity", "sign"):
        assert torch.equal(a[key], b[key]), key
    # Float64 sums of two shards added together differ from one sequential sum by rounding only.
    torch.testing.assert_close(a["sums"], b["sums"], rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(a["threshold"], b["threshold"], rtol=1e-13, atol=1e-15)
    assert not list(two.glob("checkpoint*")), "per-rank checkpoints are removed at the end"
