"""The compile gate: every Triton launch the host code can choose, compiled for sm_80 and sm_90 (skillkern.ops.aot).

The interpreter checks what the kernels compute; this checks that a GPU compiler takes them as the launchers
configure them, within shared memory and without register spills where ``auto`` chooses. It runs in a child
process with ``TRITON_INTERPRET`` unset (the kernels of this process may be interpreter objects), against the
committed table ``benchmarks/results/kernel_resources.csv``, which is also its cache by kernel source: variants
the table lacks are compiled, and a sample of those it has is compiled again and must match it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skillkern.ops.dispatch import HAVE_TRITON

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "benchmarks" / "results" / "kernel_resources.csv"


def _child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")
def test_compile_gate():
    done = subprocess.run([sys.executable, "-m", "skillkern.ops.aot", "--check", "--table", str(TABLE)],
                          env=_child_env(), capture_output=True, text=True, timeout=1500)
    if done.returncode and ("ptxas" in done.stderr and "No such file" in done.stderr):
        pytest.skip(f"Triton's ptxas is missing here: {done.stderr.strip().splitlines()[-1]}")
    report = "\n".join(line for line in done.stdout.splitlines() if not line.startswith("compiling"))
    assert done.returncode == 0, f"the compile gate failed:\n{report[-6000:]}\n{done.stderr[-3000:]}"
    assert "variants over the grid" in done.stdout, done.stdout[-2000:]


_CAPTURE_CHILD = r"""
import torch
from skillkern.ops import dispatch
from skillkern.ops.masked_ffn import masked_ffn_triton

m = lambda *s, dtype=torch.float16: torch.empty(*s, dtype=dtype, device="meta")
x, w1, w2 = m(1, 768), m(3072, 768), m(3072, 768).t()
keep = m(3072, dtype=torch.int64)
blocks = {}
for sms in (8, 132):
    with dispatch.capturing(sms) as launches:
        masked_ffn_triton(x, w1, None, w2, None, keep, act="gelu", schedule="fused")
    assert [type(l.kernel).__name__ for l in launches] == ["JITFunction"], launches
    assert launches[0].kwargs["enable_fp_fusion"] is True
    blocks[sms] = launches[0].kwargs["BLOCK_K"]
print(blocks[8], blocks[132])
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")
def test_capture_records_the_launchers_configurations():
    """capturing() records launches instead of running them, sized for the GPU it is given: the SM count
    reaches the host code. One row, 3,072 kept neurons: 8 SMs want 16 programs, which 64-wide K chunks give; 132
    SMs want 264, which not even 16-wide chunks give, so the smallest is taken. Run in a child process: the
    kernels of this one may be interpreter objects."""
    done = subprocess.run([sys.executable, "-c", _CAPTURE_CHILD], env=_child_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["64", "16"], done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAVE_TRITON, reason="needs a CUDA GPU and triton")
def test_gpu_compiled_kernels_match_table():
    """On a GPU, Triton's own register and spill counts of launched kernels equal the gate's table rows (at grid
    points of aot.GRID: plain FFNs with biases, gated ones without, as the grid builds them)."""
    from skillkern.ops import aot, dispatch
    from skillkern.ops.masked_ffn import masked_ffn
    from skillkern.ops.ffn_stats import ffn_stats

    props = torch.cuda.get_device_properties(0)
    cap = props.major * 10 + props.minor
    gpu = aot.GPU(props.name, cap, props.multi_processor_count, 0)
    table = aot.read_table(TABLE)
    version = aot._triton_version()
    rows = {k[2:]: r for k, r in table.items() if k[0] == version and k[1] == f"sm_{cap}"}
    if not rows:
        pytest.skip(f"the table has no rows for triton {version} on sm_{cap}")
    checked = 0
    for dtype, n_rows, frac, gated in ((torch.float16, 1, 0.02, False), (torch.bfloat16, 4096, 0.1, True),
                                      (torch.float32, 64, 0.5, False)):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(n_rows, 768, device="cuda", generator=g).to(dtype)
        w1 = torch.randn(3072, 768, device="cuda", generator=g).to(dtype) / 30
        wg = torch.randn(3072, 768, device="cuda", generator=g).to(dtype) / 30 if gated else None
        w2 = (torch.randn(3072, 768, device="cuda", generator=g).to(dtype) / 50).t()
        b1 = None if gated else torch.randn(3072, device="cuda", generator=g).to(dtype)
        b2 = None if gated else torch.randn(768, device="cuda", generator=g).to(dtype)
        keep = torch.randperm(3072, device="cuda")[: int(3072 * frac)]
        compiled = []
        real_launch = dispatch.launch

        def spy(kernel, grid, *args, **kwargs):
            k = real_launch(kernel, grid, *args, **kwargs)
            compiled.append((kernel, grid, args, kwargs, k))
            return k

        dispatch.launch = spy
        try:
            masked_ffn(x, w1, b1, w2, b2, keep, w_gate=wg, backend="triton")
            ffn_stats(x, w1, b1, w_gate=wg, backend="triton")
        finally:
            dispatch.launch = real_launch
        torch.cuda.synchronize()
        for kernel, grid, args, kwargs, k in compiled:
            v = aot.bind(dispatch.Launch(kernel, grid, args, dispatch.launch_options(kwargs)), gpu)
            key = (aot.source_key(v.kernel), v.key)
            row = rows.get(key)
            assert row is not None, f"{v.kernel} [{v.config()}] launched on {props.name} is not in the table"
            # n_spills is the local memory per thread / 4: zero exactly when ptxas spilled nothing
            assert k.n_regs == row["registers"] and (k.n_spills > 0) == (row["spill_bytes"] > 0), \
                f"{v.kernel} [{v.config()}]: GPU says {k.n_regs} registers / {k.n_spills} spills, table {row}"
            checked += 1
    assert checked >= 4
