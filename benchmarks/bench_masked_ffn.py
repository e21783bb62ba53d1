"""Masked / pruned FFN: time against the dense FFN and against the strongest baseline, a dense FFN whose
weights were sliced to the kept neurons ahead of time ("presliced"), plus the fraction of the roofline.

Providers (one FFN layer, weights in nn.Linear layout):
  dense          the full FFN
  presliced      the dense FFN on weights sliced to K beforehand (what a pruned checkpoint runs)
  mask-mul       the full FFN with the intermediate multiplied by a 0/1 mask (what naive pruning does)
  masked-torch   skillkern.masked_ffn(backend="torch"): index_select at call time, then F.linear;
                 masked-torch[w2t] the same with W2 stored transposed (row gathers instead of column gathers)
  masked-triton  skillkern.masked_ffn(backend="triton") with W2 stored transposed (CUDA only); also
                 masked-triton[fused], masked-triton[two_pass] and masked-triton[w2-rowmajor]

Every call starts with cold caches (a 64 MiB / 256 MiB buffer is zeroed, untimed, before it), as a layer of a
real model does: otherwise the kept weights of small cases stay in the last-level cache between calls and
beat the memory roofline. --warm-cache turns that off.

Metrics per (shape, rows, keep fraction): time (median, p20, p80 over repeats), speedup_vs_dense and
ratio_vs_presliced (each sample over the baseline's median measured in the same run), and roofline_frac =
roofline time / measured time, where roofline time = max(bytes / peak bandwidth, FLOPs / peak FLOP/s) for the
work the provider must do (kept weights + x + y; the full weights for dense). Peaks: --peak-gbs /
--peak-tflops, else a table of known GPUs, else measured in the same run (a STREAM-like copy of a 256 MiB
tensor, a 2048^3 matmul in the benchmark dtype) and written as their own rows.

    python benchmarks/bench_masked_ffn.py --quick                     # CPU, a few minutes
    python benchmarks/bench_masked_ffn.py --device cuda --dtype float16 --out benchmarks/results/masked_ffn_h100.csv
    python benchmarks/bench_masked_ffn.py --plot benchmarks/results/masked_ffn_cpu.csv   # redraw the PNG

--quick caps the rows of the Llama-7B shape at 256 (4096 rows of it take ~10 s per dense call in fp32 on 2 CPU
cores); the shape column then says "rows=256(quick)".
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import device_name, row, time_it, write_rows

BENCH = OP = "masked_ffn"
SHAPES = {  # name: (hidden, neurons, activation, gated)
    "bert-base": (768, 3072, "gelu", False),
    "roberta-large": (1024, 4096, "gelu", False),
    "llama-7b": (4096, 11008, "silu", True),
}
KEEP = (0.02, 0.10, 0.50)
ROWS = (1, 64, 4096)
QUICK_ROWS_CAP = {"llama-7b": 256}
PEAK_GBS = {"H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H200": 4800.0, "A100-SXM4-80GB": 2039.0}
PEAK_TFLOPS_16 = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "A100": 312.0}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _lookup(table: dict, name: str):
    for key, value in table.items():
        if all(part.lower() in name.lower() for part in key.split()):
            return value
    return None


def measure_bandwidth(device: str, sync) -> list[float]:
    """STREAM-like copy of a 256 MiB tensor: GB/s samples (bytes read + bytes written)."""
    src = torch.ones(64 << 20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    samples = time_it(lambda: dst.copy_(src), repeats=10, warmup=2, sync=sync)
    return [2 * src.numel() * 4 / s / 1e9 for s in samples]


def measure_flops(device: str, dtype: torch.dtype, sync) -> list[float]:
    """A 2048^3 matmul in ``dtype``: GFLOP/s samples."""
    a = torch.randn(2048, 2048, device=device).to(dtype)
    b = torch.randn(2048, 2048, device=device).to(dtype)
    samples = time_it(lambda: a @ b, repeats=5, warmup=1, sync=sync)
    return [2 * 2048 ** 3 / s / 1e9 for s in samples]


def ffn(x, w1, b1, w2, b2, wg, act):
    from skillkern.ops.activations import apply_act

    if wg is None:
        return F.linear(apply_act(F.linear(x, w1, b1), act), w2, b2)
    return F.linear(apply_act(F.linear(x, wg), act) * F.linear(x, w1, b1), w2, b2)


def ffn_mask_mul(x, w1, b1, w2, b2, wg, act, mask):
    from skillkern.ops.activations import apply_act

    if wg is None:
        return F.linear(apply_act(F.linear(x, w1, b1), act) * mask, w2, b2)
    return F.linear(apply_act(F.linear(x, wg), act) * F.linear(x, w1, b1) * mask, w2, b2)


def work(rows: int, hidden: int, neurons: int, gated: bool, esize: int) -> tuple[float, float]:
    """(bytes, FLOPs) an FFN over ``neurons`` neurons must at least move and compute."""
    mats = 3 if gated else 2
    weights = mats * neurons * hidden + neurons + hidden  # + biases
    return (weights + 2 * rows * hidden) * esize, 2.0 * rows * neurons * hidden * mats


def time_cold(fn, repeats: int, sync, flush) -> list[float]:
    """_common.time_it with the caches evicted before every call (untimed): in a real model every layer has its
    own weights, so a layer's weights come from memory, not from a cache warmed by the last call."""
    return time_it(fn, repeats, warmup=0, sync=sync, before=flush)


def measure(fn, sync, flush, args) -> list[float]:
    """One warm-up call that also sizes the run, then enough timed calls to fill ``args.budget`` seconds."""
    t = time_cold(fn, 1, sync, flush)[0]
    n = max(args.min_repeats, min(args.max_repeats, int(args.budget / max(t, 1e-6))))
    return time_cold(fn, n, sync, flush)


def run(args) -> list[dict]:
    from skillkern.ops.masked_ffn import masked_ffn

    device, dtype = args.device, DTYPES[args.dtype]
    on_cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if on_cuda else None
    dev = device_name(device)
    esize = torch.empty(0, dtype=dtype).element_size()
    out: list[dict] = []
    flush = None
    if not args.warm_cache:  # twice the last-level cache of this CPU (32 MiB here) / of an H100-H200 (50 MB)
        scratch = torch.empty((256 if on_cuda else 64) << 20, dtype=torch.uint8, device=device)
        flush = scratch.zero_

    gbs = args.peak_gbs or (_lookup(PEAK_GBS, dev) if on_cuda else None)
    if gbs is None:
        samples = measure_bandwidth(device, sync)
        out.append(row(BENCH, "stream-copy", "torch", "256MiB", "bandwidth", samples, "GB/s", dev, args.dtype))
        gbs = max(samples)
    tflops = args.peak_tflops or (_lookup(PEAK_TFLOPS_16, dev) if on_cuda and esize == 2 else None)
    if tflops is None:
        samples = measure_flops(device, dtype, sync)
        out.append(row(BENCH, "matmul", "torch", "2048x2048x2048", "flops", samples, "GFLOP/s", dev, args.dtype))
        tflops = max(samples) / 1e3
    logging.info("roofline peaks: %.1f GB/s, %.2f TFLOP/s", gbs, tflops)

    shapes = [s for s in args.shapes.split(",")]
    rows_list = [int(r) for r in args.rows.split(",")]
    keeps = [float(k) for k in args.keep.split(",")]
    g = torch.Generator().manual_seed(0)
    for name in shapes:
        hidden, neurons, act, gated = SHAPES[name]

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

        w1 = rnd(neurons, hidden, scale=hidden ** -0.5)
        wg = rnd(neurons, hidden, scale=hidden ** -0.5) if gated else None
        b1 = None if gated else rnd(neurons)
        w2 = rnd(hidden, neurons, scale=neurons ** -0.5)
        b2 = None if gated else rnd(hidden)
        w2_fast = w2.t().contiguous().t()  # W2 stored transposed: each kept neuron's output weights contiguous
        for rows_req in rows_list:
            rows = min(rows_req, QUICK_ROWS_CAP.get(name, rows_req)) if args.quick else rows_req
            tag = f"rows={rows}" + ("(quick)" if rows != rows_req else "")
            x = rnd(rows, hidden)
            dense_fn = lambda: ffn(x, w1, b1, w2, b2, wg, act)  # noqa: E731
            dense = measure(dense_fn, sync, flush, args)
            dense_med = statistics.median(dense)
            d_bytes, d_flops = work(rows, hidden, neurons, gated, esize)
            dense_roof = max(d_bytes / (gbs * 1e9), d_flops / (tflops * 1e12))
            for frac in keeps:
                kept = max(1, round(frac * neurons))
                keep = torch.randperm(neurons, generator=g)[:kept].sort().values.to(device)
                shape = f"{name}:H={hidden}:D={neurons}:{tag}:keep={frac:.0%}(K={kept})"
                mask = torch.zeros(neurons, dtype=dtype, device=device)
                mask[keep] = 1
                pre = (w1[keep].contiguous(), None if b1 is None else b1[keep].contiguous(), w2[:, keep].contiguous(),
                       None if wg is None else wg[keep].contiguous())
                providers = {
                    "presliced": lambda: ffn(x, pre[0], pre[1], pre[2], b2, pre[3], act),
                    "mask-mul": lambda: ffn_mask_mul(x, w1, b1, w2, b2, wg, act, mask),
                    "masked-torch": lambda: masked_ffn(x, w1, b1, w2, b2, keep, act=act, w_gate=wg,
                                                       backend="torch", check=False),
                    "masked-torch[w2t]": lambda: masked_ffn(x, w1, b1, w2_fast, b2, keep, act=act, w_gate=wg,
                                                            backend="torch", check=False),
                }
                if on_cuda:
                    for label, w, sched in (("masked-triton", w2_fast, "auto"),
                                            ("masked-triton[fused]", w2_fast, "fused"),
                                            ("masked-triton[two_pass]", w2_fast, "two_pass"),
                                            ("masked-triton[w2-rowmajor]", w2, "auto")):
                        providers[label] = (lambda w=w, sched=sched: masked_ffn(
                            x, w1, b1, w, b2, keep, act=act, w_gate=wg, backend="triton", schedule=sched,
                            check=False))
                times = {"dense": dense}
                for label, fn in providers.items():
                    times[label] = measure(fn, sync, flush, args)
                pre_med = statistics.median(times["presliced"])
                k_bytes, k_flops = work(rows, hidden, kept, gated, esize)
                kept_roof = max(k_bytes / (gbs * 1e9), k_flops / (tflops * 1e12))
                for label, samples in times.items():
                    roof = dense_roof if label == "dense" else kept_roof
                    out.append(row(BENCH, OP, label, shape, "time", samples, "s", dev, args.dtype))
                    out.append(row(BENCH, OP, label, shape, "speedup_vs_dense", [dense_med / s for s in samples],
                                   "x", dev, args.dtype))
                    out.append(row(BENCH, OP, label, shape, "ratio_vs_presliced", [s / pre_med for s in samples],
                                   "x", dev, args.dtype))
                    out.append(row(BENCH, OP, label, shape, "roofline_frac", [roof / s for s in samples],
                                   "fraction", dev, args.dtype))
                logging.info("%s: %s", shape, "  ".join(f"{k} {statistics.median(v) * 1e3:.3f} ms"
                                                        for k, v in times.items()))
            del x
    return out


def plot(path: Path) -> Path:
    """Time vs keep fraction, one panel per (shape, rows), one line per provider (median, p20-p80 bars);
    below, the ratio to presliced. Written next to the CSV as .png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedFormatter, FixedLocator, FuncFormatter, NullFormatter, NullLocator

    rows = list(csv.DictReader(open(path)))
    series = defaultdict(lambda: defaultdict(list))  # (shape, rows) -> provider -> [(keep, med, p20, p80)]
    ratios = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["op"] != OP or r["metric"] not in ("time", "ratio_vs_presliced"):
            continue
        parts = r["shape"].split(":")
        panel = (parts[0], parts[3])
        keep = float(parts[4].split("=")[1].split("%")[0])
        point = (keep, float(r["median"]), float(r["p20"]), float(r["p80"]))
        (series if r["metric"] == "time" else ratios)[panel][r["provider"]].append(point)
    panels = list(series)
    shapes = list(dict.fromkeys(p[0] for p in panels))
    row_tags = list(dict.fromkeys(p[1] for p in panels))
    ncol = max(len([p for p in panels if p[0] == s]) for s in shapes)
    fig, axes = plt.subplots(2 * len(shapes), ncol, figsize=(4.2 * ncol, 3.6 * 2 * len(shapes)), squeeze=False)
    colors = {}
    for i, shape in enumerate(shapes):
        mine = [p for p in panels if p[0] == shape]
        for j in range(ncol):
            ax, axr = axes[2 * i, j], axes[2 * i + 1, j]
            if j >= len(mine):
                ax.axis("off")
                axr.axis("off")
                continue
            panel = mine[j]
            for prov, pts in sorted(series[panel].items()):
                pts.sort()
                k, med, lo, hi = zip(*pts)
                line = ax.errorbar(k, [m * 1e3 for m in med], yerr=[[(m - l) * 1e3 for m, l in zip(med, lo)],
                                                                     [(h - m) * 1e3 for m, h in zip(med, hi)]],
                                   marker="o", ms=3, capsize=2, lw=1.2, label=prov, color=colors.get(prov))
                colors[prov] = line[0].get_color()
                if prov in ratios[panel]:
                    rp = sorted(ratios[panel][prov])
                    axr.plot([p[0] for p in rp], [p[1] for p in rp], marker="o", ms=3, lw=1.2, color=colors[prov],
                             label=prov)
            for a in (ax, axr):
                a.set_xscale("log")
                a.xaxis.set_major_locator(FixedLocator([2, 10, 50]))
                a.xaxis.set_major_formatter(FixedFormatter(["2%", "10%", "50%"]))
                a.xaxis.set_minor_locator(NullLocator())
                a.grid(True, which="major", alpha=0.3)
            ax.set_yscale("log")
            ax.set_title(f"{panel[0]}  {panel[1]}", fontsize=9)
            ax.set_ylabel("time [ms]")
            axr.set_yscale("log")
            for a in (ax, axr):
                a.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                a.yaxis.set_minor_formatter(NullFormatter())
            axr.axhline(1.0, color="grey", lw=0.8)
            axr.axhline(1.1, color="tab:red", ls=":", lw=0.8)
            axr.set_ylabel("time / presliced")
            axr.set_xlabel("keep fraction")
    axes[0, 0].legend(fontsize=7, loc="best")
    first = rows[0]
    fig.suptitle(f"{path.stem} on {first['device']}, {first['dtype']} "
                 f"(torch {first['torch']}, commit {first['commit']})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rows", default=",".join(map(str, ROWS)))
    p.add_argument("--keep", default=",".join(map(str, KEEP)))
    p.add_argument("--quick", action="store_true", help="cap the Llama-7B rows at 256 and time less")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per cell (default 1.5, quick 0.6)")
    p.add_argument("--min-repeats", type=int, default=5)
    p.add_argument("--max-repeats", type=int, default=200)
    p.add_argument("--peak-gbs", type=float, default=None, help="peak memory bandwidth, GB/s")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense FLOP rate in --dtype, TFLOP/s")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a loaded machine)")
    p.add_argument("--warm-cache", action="store_true",
                   help="do not evict the caches between calls (small kept weights then stay cache-resident)")
    p.add_argument("--out", default=None, help="CSV (default benchmarks/results/masked_ffn_<cpu|cuda>.csv)")
    p.add_argument("--plot", metavar="CSV", default=None, help="only redraw the PNG of an existing CSV")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.plot:
        logging.info("wrote %s", plot(Path(args.plot)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.budget is None:
        args.budget = 0.6 if args.quick else 1.5
    if args.quick:
        args.min_repeats = min(args.min_repeats, 3)
        args.max_repeats = min(args.max_repeats, 60)
    path = Path(args.out or Path(__file__).parent / "results" / f"masked_ffn_{args.device.split(':')[0]}.csv")
    start = time.perf_counter()
    rows = run(args)
    write_rows(path, rows)
    logging.info("wrote %d rows to %s in %.0f s; plot: %s", len(rows), path, time.perf_counter() - start, plot(path))


if __name__ == "__main__":
    main()
