"""Shared benchmark plumbing: timing statistics, device naming, long-format CSV rows."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

FIELDS = ["bench", "op", "provider", "shape", "dtype", "metric", "median", "p20", "p80", "unit", "n",
          "device", "torch", "skillkern", "commit", "timestamp"]


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


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL, cwd=Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of a list of samples."""
    s = sorted(samples)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")
    return statistics.median(s), q[1], q[7]


def time_it(fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None,
            before: Callable[[], None] | None = None) -> list[float]:
    """Seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs; ``before()`` runs untimed ahead of every
    timed call (e.g. to evict caches). With ``sync`` (device work to wait for) on a CUDA machine, each run is
    timed by CUDA events around it on the current stream (the GPU's own clock; launch latency included where
    the GPU waits for the host), else by the host's clock between two syncs."""
    for _ in range(warmup):
        fn()
    if sync is not None and torch.cuda.is_available():
        out = []
        for _ in range(repeats):
            if before:
                before()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        return out
    out = []
    for _ in range(repeats):
        if before:
            before()
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t)
    return out


def row(bench: str, op: str, provider: str, shape: str, metric: str, samples: list[float], unit: str,
        device: str, dtype: str = "float32") -> dict:
    import skillkern

    med, p20, p80 = quantiles(samples)
    return {"bench": bench, "op": op, "provider": provider, "shape": shape, "dtype": dtype, "metric": metric,
            "median": f"{med:.6g}", "p20": f"{p20:.6g}", "p80": f"{p80:.6g}", "unit": unit, "n": len(samples),
            "device": device, "torch": torch.__version__, "skillkern": skillkern.__version__, "commit": commit(),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def write_rows(path: str | Path, rows: list[dict], append: bool = False) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not (append and path.exists())
    with open(path, "a" if append else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
