"""The CUDA kernels in csrc/*.cu: compiled by nvcc wherever nvcc exists, run against the CPU op on a GPU.

Compile check (no GPU and no CUDA build of torch needed): each csrc/*.cu is compiled to an object file with
nvcc, torch's headers and the flags setup.py's build uses (BuildExtension's nvcc flags, -O3 -lineinfo, the
-gencode list from SKILLKERN_CUDA_ARCHS), so a compile error shows up on a CPU-only machine instead of at the
first GPU build. A CPU wheel of torch ships the c10/cuda and ATen/cuda headers but not the configure-generated
c10/cuda/impl/cuda_cmake_macros.h (it only sets the Windows DLL export macro); where it is missing, the test
defines C10_CUDA_NO_CMAKE_CONFIGURE_FILE, the switch c10/cuda/CUDAMacros.h offers for builds without that
file. Nothing is linked (libc10_cuda is not in a CPU wheel). The test also checks, from nvcc's intermediate
files, that every kernel the host code launches has device code for every architecture (the .cu keeps torch
out of the device passes, so it instantiates its kernels explicitly; a missing instantiation would otherwise
only fail on a GPU, with "invalid device function").

GPU tests (marked ``gpu``) compare the CUDA op with the CPU op on the same inputs: counts exactly, float64
sums bit for bit (both add each element's rows in row order), on awkward shapes.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

from kernel_checks import assert_equal, every_other, random_state, stats_inputs
from skillkern import _ext
from skillkern.ops.dispatch import resolve
from skillkern.ops.stats_moments import stats_moments
from skillkern.ops.stats_update import stats_update

ROOT = Path(__file__).resolve().parents[1]
CU_SOURCES = sorted(glob.glob(str(ROOT / "csrc" / "*.cu")))


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    found = re.search(r"release [^\n]*", out)
    return found.group(0) if found else out.strip().splitlines()[-1]


def _arch_flags() -> list[str]:
    # As setup.py: SKILLKERN_CUDA_ARCHS (default "80;90"), SASS for each, PTX for the last.
    archs = [a.strip() for a in os.environ.get("SKILLKERN_CUDA_ARCHS", "80;90").split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def _compile_flags() -> list[str]:
    includes = cpp_extension.include_paths()
    flags = [f"-I{p}" for p in includes]
    if not any(os.path.exists(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in includes):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # CPU wheel: see the module docstring
    # What BuildExtension adds for .cu files (COMMON_NVCC_FLAGS, -fPIC, the C++ standard torch's headers need),
    # then setup.py's own nvcc flags.
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    std = "-std=c++20" if (major, minor) >= (2, 10) else "-std=c++17"
    flags += list(cpp_extension.COMMON_NVCC_FLAGS) + ["--compiler-options", "-fPIC", std, "-O3", "-lineinfo"]
    return flags + _arch_flags()


def _short(name: str) -> str:
    """'void ns::k<__half, true>(...)' or 'ns::k< __half, true> ' -> 'k<__half,true>'."""
    name = re.sub(r"^void ", "", name.split("(")[0].strip())
    return re.sub(r"\s+", "", re.sub(r"^(\w+::)+", "", name))


def _launched_kernels(keep: Path) -> set[str]:
    # cudafe++ rewrites `k<<<grid, block, 0, stream>>>(args)` as
    # `(__cudaPushCallConfiguration(grid, block, 0, stream)) ? (void)0 : k(args)`.
    host = "".join(p.read_text() for p in keep.glob("*.cudafe1.cpp"))
    pattern = r"__cudaPushCallConfiguration\([^;]*?\)\) \? \(void\)0 : ((?:\w+::)*\w+(?:<[^;(]*?>)?)\s?\("
    return {_short(m) for m in re.findall(pattern, host)}


def _ptx_kernels(ptx: Path) -> set[str]:
    entries = re.findall(r"\.entry (_Z\w+)\(", ptx.read_text())
    demangled = subprocess.run(["c++filt"], input="\n".join(entries), capture_output=True, text=True, timeout=30)
    return {_short(line) for line in demangled.stdout.splitlines() if line.strip()}


@pytest.mark.skipif(not CU_SOURCES, reason="no csrc/*.cu")
@pytest.mark.parametrize("source", [os.path.basename(s) for s in CU_SOURCES])
def test_cuda_source_compiles(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (neither CUDA_HOME/bin/nvcc nor nvcc on PATH): CUDA sources not compile-checked")
    version = _nvcc_version(nvcc)
    if _ext.has_op("stats_update", torch.device("cuda")):
        pytest.skip(f"the installed extension already contains the CUDA kernels (built by setup.py); nvcc {version}")
    keep = tmp_path / "keep"
    keep.mkdir()
    # --threads 0: the nvcc phases run in parallel. --keep: the intermediate files, read below.
    cmd = [nvcc, "-c", str(ROOT / "csrc" / source), "-o", str(tmp_path / (source + ".o")), "--threads", "0",
           "--keep", "--keep-dir", str(keep)] + _compile_flags()
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    seconds = time.monotonic() - start
    log = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, f"nvcc ({version}) failed on csrc/{source}:\n{' '.join(cmd)}\n{log[-6000:]}"
    # Warnings from torch's headers are not ours to fix; warnings in our sources are.
    ours = [line for line in log.splitlines() if "csrc/" in line and "warning" in line.lower()]
    assert not ours, f"nvcc ({version}) warns on csrc/{source}:\n" + "\n".join(ours)
    # Every kernel the host code launches must have device code for every architecture: the device passes see
    # neither torch's headers nor the launches (see the .cu), so a kernel instantiated only by a launch would
    # fail at run time with "invalid device function". Launches are read from the host pass's output.
    launched = _launched_kernels(keep)
    assert launched, f"no kernel launches found in the host pass output of csrc/{source} (nvcc {version})"
    if shutil.which("c++filt") is None:
        print("c++filt (binutils) not found: launched kernels not matched against the PTX")
    else:
        for ptx in sorted(keep.glob("*.ptx")):
            missing = launched - _ptx_kernels(ptx)
            assert not missing, f"csrc/{source}: {ptx.name} has no device code for launched kernels {sorted(missing)}"
    shutil.rmtree(keep)  # about 20 MB of preprocessed sources
    print(f"csrc/{source}: {len(launched)} launched kernels compiled with nvcc {version} for "
          f"{' '.join(_arch_flags())} in {seconds:.0f} s")


# ---------------------------------------------------------------------------------------------- GPU runtime

def _require_cuda_kernel():
    """Skip without a CUDA build of the extension (fail under SKILLKERN_REQUIRE_EXT=1 when torch has CUDA)."""
    if _ext.has_op("stats_update", torch.device("cuda")):
        return
    reason = _ext.unavailable_reason() or "skillkern._C was built without its CUDA kernels"
    if os.environ.get("SKILLKERN_REQUIRE_EXT") == "1" and torch.version.cuda:
        pytest.fail(f"SKILLKERN_REQUIRE_EXT=1 but the CUDA kernel of stats_update is missing: {reason}")
    pytest.skip(f"CUDA kernel of stats_update unavailable: {reason}")


gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(rows, width, slots, classes, dtype, seed=0, untracked=0.25):
    """(h, slot, label, threshold) on the CPU: the shared maker, with ties (h equal to its threshold counts as
    not above)."""
    return stats_inputs(rows, width, slots, classes, dtype, untracked=untracked, seed=seed, device="cpu")


def _assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal bit for bit (so -0.0 != +0.0); NaNs only need to sit at the same places (payloads may differ)."""
    assert_equal(actual, expected, what, "(slot, class, neuron)", bitwise=True)


def _cuda_vs_cpu(h, slot, label, threshold, slots, classes, what, seed=1):
    start = random_state(slots, classes, h.shape[1], counts=threshold is not None, seed=seed, device="cpu")
    expected = start.clone()
    torch.ops.skillkern.stats_update(h, slot, label, expected, threshold)
    got = start.cuda()
    thr = None if threshold is None else threshold.cuda()
    torch.ops.skillkern.stats_update(h.cuda(), slot.cuda(), label.cuda(), got, thr)
    _assert_bitwise(got, expected, what)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("rows,width", ((1, 1), (57, 123), (31, 431), (1000, 129), (4099, 33)))
@pytest.mark.parametrize("slots,classes", ((1, 1), (1, 2), (3, 5), (40, 3)))
def test_cuda_matches_cpu(dtype, rows, width, slots, classes):
    _require_cuda_kernel()
    h, slot, label, threshold = _inputs(rows, width, slots, classes, dtype, seed=rows + width)
    where = f"{dtype} rows={rows} width={width} slots={slots} classes={classes}"
    _cuda_vs_cpu(h, slot, label, None, slots, classes, f"sums, {where}")
    _cuda_vs_cpu(h, slot, label, threshold, slots, classes, f"counts, {where}")


@gpu
@needs_gpu
def test_cuda_edge_cases():
    _require_cuda_kernel()
    # Every row in one group (more rows per warp chunk than loads in flight), all untracked, zero rows.
    h, slot, label, threshold = _inputs(100, 70, 1, 1, torch.float32, untracked=0.0)
    _cuda_vs_cpu(h, slot, label, None, 1, 1, "sums, one group")
    _cuda_vs_cpu(h, slot, label, threshold, 1, 1, "counts, one group")
    _cuda_vs_cpu(h, torch.full_like(slot, -1), label, None, 1, 1, "sums, all untracked")
    _cuda_vs_cpu(h[:0], slot[:0], label[:0], threshold, 1, 1, "counts, zero rows")
    # More groups than a grid's y dimension holds (65535): blocks loop over groups.
    h, slot, label, threshold = _inputs(300, 3, 70000, 1, torch.float32, untracked=0.0)
    _cuda_vs_cpu(h, slot, label, threshold, 70000, 1, "counts, 70000 groups")
    # Signed zeros, infinities and NaNs: -0.0 + (-0.0) stays -0.0; inf - inf is NaN on both.
    h = torch.tensor([[-0.0, float("inf"), float("nan"), 1.0], [-0.0, float("-inf"), 2.0, -1.0]])
    slot, label = torch.tensor([0, 0]), torch.tensor([1, 1])
    start = torch.full((1, 2, 4), -0.0, dtype=torch.float64)
    expected, got = start.clone(), start.cuda()
    torch.ops.skillkern.stats_update(h, slot, label, expected, None)
    torch.ops.skillkern.stats_update(h.cuda(), slot.cuda(), label.cuda(), got, None)
    _assert_bitwise(got, expected, "signed zeros and non-finite values")


def _moments_cuda_vs_cpu(h, slot, slots, what, seed=1):
    """stats_moments on CUDA against the CPU op from the same random start: bit for bit (row order, no FMA)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(slots, 3, h.shape[1], generator=g, dtype=torch.float64)
    start[:, 1:] = start[:, 1:].abs()
    expected = start.clone()
    torch.ops.skillkern.stats_moments(h, slot, expected)
    got = start.cuda()
    torch.ops.skillkern.stats_moments(h.cuda(), slot.cuda(), got)
    assert_equal(got, expected, what, "(slot, moment, neuron)", bitwise=True)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("rows,width", ((1, 1), (57, 123), (31, 431), (1000, 129), (4099, 33), (4096, 3072)))
@pytest.mark.parametrize("slots", (1, 3, 40))
def test_cuda_moments_match_cpu(dtype, rows, width, slots):
    _require_cuda_kernel()
    h, slot, _, _ = _inputs(rows, width, slots, 1, dtype, seed=rows + width + slots)
    _moments_cuda_vs_cpu(h, slot, slots, f"moments, {dtype} rows={rows} width={width} slots={slots}")


@gpu
@needs_gpu
def test_cuda_moments_edge_cases():
    _require_cuda_kernel()
    h, slot, _, _ = _inputs(100, 70, 1, 1, torch.float32, untracked=0.0)
    _moments_cuda_vs_cpu(h, slot, 1, "moments, one group")
    _moments_cuda_vs_cpu(h, torch.full_like(slot, -1), 1, "moments, all untracked")
    _moments_cuda_vs_cpu(h[:0], slot[:0], 1, "moments, zero rows")
    h, slot, _, _ = _inputs(300, 3, 70000, 1, torch.float32, untracked=0.0)
    _moments_cuda_vs_cpu(h, slot, 70000, "moments, 70000 groups")
    h = torch.tensor([[-0.0, float("inf"), float("nan"), 1.0], [-0.0, float("-inf"), 2.0, -1.0]])
    _moments_cuda_vs_cpu(h, torch.tensor([0, 0]), 1, "moments, signed zeros and non-finite values")
    # strided h on a side stream, through the public function
    h, slot, _, _ = _inputs(45, 123, 3, 1, torch.bfloat16)
    expected = torch.zeros(3, 3, 123, dtype=torch.float64)
    torch.ops.skillkern.stats_moments(every_other(h), slot, expected)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = stats_moments(every_other(h.cuda()), slot.cuda(), torch.zeros(3, 3, 123, dtype=torch.float64,
                                                                           device="cuda"), backend="ext")
    stream.synchronize()
    assert_equal(got, expected, "moments: strided h on a side stream", "(slot, moment, neuron)", bitwise=True)


@gpu
@needs_gpu
def test_cuda_strided_inputs_and_side_stream():
    _require_cuda_kernel()
    h, slot, label, threshold = _inputs(45, 123, 3, 2, torch.bfloat16)
    expected = torch.zeros(3, 2, 123, dtype=torch.int64)
    torch.ops.skillkern.stats_update(every_other(h), slot, label, expected, every_other(threshold))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # the op launches on the current stream
        got = torch.zeros(3, 2, 123, dtype=torch.int64, device="cuda")
        h_cuda, thr_cuda = every_other(h.cuda()), every_other(threshold.cuda())
        torch.ops.skillkern.stats_update(h_cuda, slot.cuda(), label.cuda(), got, thr_cuda)
    stream.synchronize()
    _assert_bitwise(got, expected, "strided h and threshold on a side stream")
    # The public function runs the compiled op for CUDA tensors when asked for it.
    assert resolve("stats_update", "ext", torch.device("cuda")) == "ext"
    got = stats_update(h_cuda, slot.cuda(), label.cuda(), torch.zeros_like(got), thr_cuda, backend="ext")
    _assert_bitwise(got, expected, "public stats_update on CUDA tensors")


@gpu
@needs_gpu
def test_cuda_argument_checks():
    _require_cuda_kernel()
    h, slot, label, threshold = _inputs(6, 5, 2, 3, torch.float32)
    out = torch.zeros(2, 3, 5, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match=r"stats_update \(CUDA kernel\): h is on cpu, expected cuda"):
        torch.ops.skillkern.stats_update(h, slot.cuda(), label.cuda(), out, threshold.cuda())
    with pytest.raises(RuntimeError, match=r"counts are accumulated in int64"):
        torch.ops.skillkern.stats_update(h.cuda(), slot.cuda(), label.cuda(), out.double(), threshold.cuda())
    with pytest.raises(RuntimeError, match=r"h must be float32, float64, float16 or bfloat16"):
        torch.ops.skillkern.stats_update(h.cuda().int(), slot.cuda(), label.cuda(), out, threshold.cuda())


@gpu
@needs_gpu
def test_cuda_bad_index_is_a_device_assert():
    # No host sync in the op: a bad index is a device-side assert (the CUDA context is lost: own process).
    _require_cuda_kernel()
    code = """
import torch, skillkern._ext as e
assert e.available()
out = torch.zeros(2, 3, 5, dtype=torch.float64, device="cuda")
torch.ops.skillkern.stats_update(torch.ones(4, 5, device="cuda"), torch.tensor([0, -1, 7, 1], device="cuda"),
                                 torch.zeros(4, dtype=torch.int64, device="cuda"), out, None)
torch.cuda.synchronize()
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    log = result.stdout + result.stderr
    assert result.returncode != 0, f"a slot index of 7 for 2 slots did not fail:\n{log}"
    # The kernel prints the row before asserting; where the print is lost, torch still names the assert.
    assert "row 2 has slot 7" in log or "device-side assert" in log, log


@gpu
@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_second_device():
    _require_cuda_kernel()
    h, slot, label, threshold = _inputs(57, 123, 3, 2, torch.float16)
    expected = torch.zeros(3, 2, 123, dtype=torch.float64)
    torch.ops.skillkern.stats_update(h, slot, label, expected, None)
    dev = torch.device("cuda", 1)
    got = torch.zeros(3, 2, 123, dtype=torch.float64, device=dev)
    with torch.cuda.device(0):  # current device 0, tensors on device 1: the op switches itself
        torch.ops.skillkern.stats_update(h.to(dev), slot.to(dev), label.to(dev), got, None)
    _assert_bitwise(got, expected, "tensors on cuda:1")
