"""Shared benchmark tools: one timing protocol, one row schema, results appended to one CSV per benchmark and
device kind, one table of device peaks. A script in this folder imports it as ``from _common import ...`` (its own
folder is first on ``sys.path``); the package is the installed ``skillkern``.

Timing (:func:`bench`): ``triton.testing.do_bench`` on a GPU (CUDA events; its L2 flush before every call), and
the same protocol on the CPU (the host clock): a first untimed call, warm-up calls, then timed calls, each after
an untimed cache flush; summarised as median, p20 and p80 (:func:`quantiles`). :func:`bench_rounds` interleaves
several functions round by round for a shared, loaded machine.

Rows (:func:`row`): long format, one measurement per row: ``bench, op, provider, shape, dtype, metric, median, p20,
p80, unit, n, device, torch, skillkern, commit, timestamp``. Metric names, one per concept:

=====================  ===========  ================================================================================
metric                 unit         meaning
=====================  ===========  ================================================================================
time                   s            seconds per call
speedup_vs_<base>      x            <base>'s median time / this time (per sample)
ratio_vs_<base>        x            this time / <base>'s time (paired by round where rounds interleave)
roofline_fraction      fraction     roofline time / measured time (max of bytes / bandwidth, FLOPs / peak FLOP rate)
tflops                 TFLOP/s      FLOP rate reached
bandwidth              GB/s         bytes read + written per second
fraction_of_limit      fraction     measured speed-up / the speed-up the removed FLOPs allow
matmul_time_share      fraction     share of profiled time in matrix products
peak_rss               MiB          peak resident set size of the process
peak_rss_growth        MiB          peak resident set size above the point before the measured work
=====================  ===========  ================================================================================

Results are appended, not overwritten (:func:`write_rows`): rows are upserted by :data:`KEY` (bench, op, provider,
shape, dtype, metric, device, commit), so a rerun on the same device and commit replaces its own rows while another
device or commit adds rows, and earlier runs stay comparable in the CSV itself. ``plot.py`` draws the PNGs.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

FIELDS = ["bench", "op", "provider", "shape", "dtype", "metric", "median", "p20", "p80", "unit", "n",
          "device", "torch", "skillkern", "commit", "timestamp"]
#: what identifies a measurement in a results CSV: a row with the same key replaces the older one
KEY = ("bench", "op", "provider", "shape", "dtype", "metric", "device", "commit")
#: a CPU cache flush writes this many bytes: twice the last-level cache of this project's CPU machine (32 MiB)
CPU_FLUSH_BYTES = 64 << 20

# Dense peaks by device name: (memory bandwidth GB/s, 16-bit tensor-core TFLOP/s with fp32 accumulation, fp32
# TFLOP/s without TF32), vendor data sheets, no sparsity. Looked up by :func:`peak`: the first key whose
# space-separated parts all occur in the device name, so the more specific names come first.
PEAKS = {
    "H200 NVL": (4800.0, 835.0, 60.0),
    "H200": (4800.0, 989.0, 67.0),
    "H100 NVL": (3900.0, 835.0, 60.0),
    "H100 PCIe": (2000.0, 756.0, 51.0),
    "H100 SXM": (3350.0, 989.0, 67.0),
    "H100 80GB HBM3": (3350.0, 989.0, 67.0),  # how an H100 SXM names itself
    "H100": (2000.0, 756.0, 51.0),  # another H100: the PCIe figures, the lowest
    "A100-SXM4-80GB": (2039.0, 312.0, 19.5),
    "A100 80GB PCIe": (1935.0, 312.0, 19.5),
    "A100": (1555.0, 312.0, 19.5),  # the 40 GB parts
    "L40S": (864.0, 362.0, 91.6),
    "L4": (300.0, 121.0, 30.3),
    "A10G": (600.0, 70.0, 31.2),
    "A10": (600.0, 125.0, 31.2),
    "RTX 4090": (1008.0, 165.2, 82.6),
    "V100": (900.0, 125.0, 15.7),
    "T4": (320.0, 65.0, 8.1),
}


# ------------------------------------------------------------------------------------------------ the device
def device_name(device: str | torch.device = "cpu") -> str:
    """Human-readable device name: the GPU's name, or the CPU model and the cores torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def peak(name: str, dtype: torch.dtype) -> Optional[tuple[float, float]]:
    """(memory bandwidth GB/s, dense TFLOP/s in ``dtype``) of the device called ``name`` from :data:`PEAKS`, or
    None for a device the table does not know (a CPU: measure it, :func:`measured_peaks`)."""
    for key, (gbs, half, single) in PEAKS.items():
        if all(part in name for part in key.split()):
            return gbs, (single if dtype == torch.float32 else half)
    return None


def measured_peaks(device: str, dtype: torch.dtype) -> tuple[list[float], list[float]]:
    """Peaks measured on ``device``: GB/s samples of a STREAM-like copy of a 256 MiB tensor (bytes read + bytes
    written) and TFLOP/s samples of a 2048^3 matmul in ``dtype``."""
    src = torch.ones(64 << 20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    gbs = [2 * src.numel() * 4 / s / 1e9 for s in bench(lambda: dst.copy_(src), device=device, repeats=10)]
    a = torch.randn(2048, 2048, device=device).to(dtype)
    b = torch.randn(2048, 2048, device=device).to(dtype)
    tflops = [2 * 2048 ** 3 / s / 1e12 for s in bench(lambda: a @ b, device=device, repeats=5)]
    return gbs, tflops


def commit() -> str:
    """Short hash of the checked-out commit, ``+dirty`` when tracked files differ from it, ``unknown`` outside git."""
    def git(*args: str) -> str:
        return subprocess.check_output(["git", *args], text=True, stderr=subprocess.DEVNULL,
                                       cwd=Path(__file__).parent).strip()

    try:
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain",
                                                                       "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------- timing
def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of a list of samples."""
    s = sorted(samples)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")
    return statistics.median(s), q[1], q[7]


def _count(rep_ms: float, per_call_ms: float, min_repeats: int, max_repeats: int) -> int:
    return max(min_repeats, min(max_repeats, int(rep_ms / max(per_call_ms, 1e-6))))


def bench(fn: Callable[[], object], *, device: str | torch.device = "cpu", repeats: Optional[int] = None,
          rep_ms: float = 100.0, warmup_ms: float = 25.0, min_repeats: int = 1, max_repeats: int = 10_000,
          flush: bool = True) -> list[float]:
    """Seconds of each timed call of ``fn``, by one protocol on every device (that of ``triton.testing.do_bench``):

    1. a first untimed call (compilation, allocation), which also estimates the time of a call;
    2. warm-up: untimed calls filling ``warmup_ms`` (the first call counts; none at all with ``warmup_ms=0`` and
       a given ``repeats``: the caller warmed ``fn`` already);
    3. ``repeats`` timed calls, or as many as fill ``rep_ms`` (at least ``min_repeats``, at most
       ``max_repeats``), each after an untimed cache flush and each timed alone.

    On a CUDA ``device`` ``triton.testing.do_bench`` does steps 1-3 (CUDA events on the current stream; it always
    flushes the L2 cache, so ``flush=False`` is refused there); for a count of calls, which do_bench does not take,
    its time budget is sized from an estimate of a flushed call and the last ``n`` of its samples are kept. On
    the CPU the host clock times each call and the flush writes :data:`CPU_FLUSH_BYTES` (in a real model every
    layer has its own weights, which come from memory, not from a cache warmed by the previous call).
    """
    if torch.device(device).type == "cuda":
        return _bench_cuda(fn, repeats, rep_ms, warmup_ms, min_repeats, max_repeats, flush)
    scratch = torch.empty(CPU_FLUSH_BYTES, dtype=torch.uint8) if flush else None
    wake = torch.zeros(1 << 18)  # above torch's grain size: one parallel region
    first = None
    if warmup_ms > 0 or repeats is None:
        t = time.perf_counter()
        fn()
        first = (time.perf_counter() - t) * 1e3
        for _ in range(int(warmup_ms / max(first, 1e-6)) - 1):
            fn()
    n = repeats if repeats is not None else _count(rep_ms, first, min_repeats, max_repeats)
    out = []
    for _ in range(n):
        if scratch is not None:
            scratch.zero_()
            # the flush is long enough for idle intra-op worker threads to go to sleep; wake them untimed, as a
            # layer inside a model (run right after the previous one) never waits for them
            wake.add_(1)
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _bench_cuda(fn, repeats, rep_ms, warmup_ms, min_repeats, max_repeats, flush) -> list[float]:
    import triton
    from triton.testing import do_bench

    if not flush:
        raise ValueError("on a GPU triton.testing.do_bench flushes the L2 cache before every call; flush=False is "
                         "for the CPU only")
    if repeats is None and min_repeats <= 1 and max_repeats >= 10_000:
        return [ms / 1e3 for ms in do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")]
    # do_bench takes a time budget, not a count: estimate a flushed call as do_bench does (after a first call,
    # synchronised), ask for the calls still missing until there are n, keep the last n (after the most warm-up)
    driver = triton.runtime.driver.active
    cache = driver.get_empty_cache_for_benchmark()
    clear = getattr(driver, "clear_cache", None) or (lambda c: c.zero_())
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        clear(cache)
        fn()
    end.record()
    end.synchronize()
    per_call = start.elapsed_time(end) / 5
    n = repeats if repeats is not None else _count(rep_ms, per_call, min_repeats, max_repeats)
    out: list[float] = []
    while len(out) < n:  # each do_bench call times at least one call
        out += do_bench(fn, warmup=warmup_ms if not out else 0, rep=(n - len(out) + 0.5) * per_call,
                        return_mode="all")
    return [ms / 1e3 for ms in out[-n:]]


def bench_rounds(fns: dict[str, Callable[[], object]], rounds: int, *, device: str | torch.device = "cpu",
                 flush: bool = True) -> dict[str, list[float]]:
    """Interleaved timing: each of ``fns`` is called once untimed, then every round times each once with
    :func:`bench`'s protocol, so that a change of load on a shared machine hits all of them alike (a ratio metric
    then pairs the samples of one round). Returns ``{name: [seconds per round]}``."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += bench(fn, device=device, repeats=1, warmup_ms=0, flush=flush)
    return samples


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------------ results
def row(bench: str, op: str, provider: str, shape: str, metric: str, samples: list[float], unit: str,
        device: str, dtype: str = "float32") -> dict:
    """One long-format row: the samples' median, p20 and p80, with the device, versions, commit and date."""
    import skillkern

    med, p20, p80 = quantiles(samples)
    return {"bench": bench, "op": op, "provider": provider, "shape": shape, "dtype": dtype, "metric": metric,
            "median": f"{med:.6g}", "p20": f"{p20:.6g}", "p80": f"{p80:.6g}", "unit": unit, "n": len(samples),
            "device": device, "torch": torch.__version__, "skillkern": skillkern.__version__, "commit": commit(),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a results CSV (none when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def upsert(old: Iterable[dict], new: Iterable[dict]) -> list[dict]:
    """``old`` without the rows whose :data:`KEY` a row of ``new`` has, then ``new``: a rerun on the same device
    and commit replaces its own rows, other devices and commits keep theirs."""
    new = list(new)
    keys = {tuple(str(r[k]) for k in KEY) for r in new}
    return [r for r in old if tuple(str(r.get(k, "")) for k in KEY) not in keys] + new


def write_rows(path: str | Path, rows: list[dict]) -> Path:
    """Upsert ``rows`` into the results CSV ``path`` (:func:`upsert`), written atomically (temp file, fsync,
    rename), so an interrupted run never leaves half a file."""
    from skillkern.files import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(upsert(read_rows(path), rows))
    return atomic_write_text(path, buf.getvalue())


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
