"""Masked / pruned FFN: time against the dense FFN and against the strongest reference, a dense FFN whose
weights were sliced to the kept neurons ahead of time ("presliced"), plus the fraction of the roofline.

Providers (one FFN layer, weights in nn.Linear layout):
  dense          the full FFN
  presliced      the dense FFN on weights sliced to K beforehand (what a pruned checkpoint runs)
  mask-mul       the full FFN with the intermediate multiplied by a 0/1 mask (what naive pruning does)
  masked-torch   skillkern.masked_ffn(backend="torch"): index_select at call time, then F.linear;
                 masked-torch[w2t] the same with W2 stored transposed (row gathers instead of column gathers)
  masked-triton  skillkern.masked_ffn(backend="triton") with W2 stored transposed (CUDA only); also
                 masked-triton[fused], masked-triton[two_pass] and masked-triton[w2-rowmajor]

Timing: _common.bench, triton.testing.do_bench on a GPU and its protocol on the CPU. Every call starts with cold
caches (the cache is flushed, untimed, before it), as a layer of a real model does: otherwise the kept weights of
small cases stay in the last-level cache between calls and beat the memory roofline. --warm-cache turns that
off (CPU only: do_bench always flushes).

Metrics per (shape, rows, keep fraction): time (median, p20, p80 over repeats), speedup_vs_dense and
ratio_vs_presliced (each sample over the reference's median measured in the same run), and roofline_fraction =
roofline time / measured time, where roofline time = max(bytes / peak bandwidth, FLOPs / peak FLOP/s) for the
work the provider must do (kept weights + x + y; the full weights for dense). Peaks: --peak-gbs /
--peak-tflops, else _common.PEAKS for a known GPU, else measured in the same run (a STREAM-like copy of a
256 MiB tensor, a 2048^3 matmul in the benchmark dtype) and written as their own rows (bandwidth, tflops).

    python benchmarks/bench_masked_ffn.py --quick                     # CPU, a few minutes
    python benchmarks/bench_masked_ffn.py --device cuda --dtype float16   # -> benchmarks/results/masked_ffn_cuda.csv
    python benchmarks/plot.py benchmarks/results/masked_ffn_cpu.csv       # redraw the PNG

Rows are added to the CSV (a rerun on the same device and commit replaces its own rows).

--quick caps the rows of the Llama-7B shape at 256 (4096 rows of it take ~10 s per dense call in fp32 on 2 CPU
cores); the shape column then says "rows=256(quick)".
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import bench, device_name, measured_peaks, peak, row, write_rows
from plot import plot

BENCH = OP = "masked_ffn"
SHAPES = {  # name: (hidden, neurons, activation, gated)
    "bert-base": (768, 3072, "gelu", False),
    "roberta-large": (1024, 4096, "gelu", False),
    "llama-7b": (4096, 11008, "silu", True),
}
KEEP = (0.02, 0.10, 0.50)
ROWS = (1, 64, 4096)
QUICK_ROWS_CAP = {"llama-7b": 256}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def measure(fn, args) -> list[float]:
    """Seconds per call of ``fn``: as many timed calls as fill ``args.budget`` seconds (at least
    ``args.min_repeats``, at most ``args.max_repeats``), each after a cache flush unless ``--warm-cache``."""
    return bench(fn, device=args.device, rep_ms=args.budget * 1e3, min_repeats=args.min_repeats,
                 max_repeats=args.max_repeats, flush=not args.warm_cache)


def run(args) -> list[dict]:
    from skillkern.ops.masked_ffn import masked_ffn

    device, dtype = args.device, DTYPES[args.dtype]
    on_cuda = device.startswith("cuda")
    dev = device_name(device)
    esize = torch.empty(0, dtype=dtype).element_size()
    out: list[dict] = []

    known = peak(dev, dtype) if on_cuda else None
    gbs, tflops = args.peak_gbs or (known and known[0]), args.peak_tflops or (known and known[1])
    if gbs is None or tflops is None:
        gbs_samples, tflops_samples = measured_peaks(device, dtype)
        if gbs is None:
            out.append(row(BENCH, "stream-copy", "torch", "256MiB", "bandwidth", gbs_samples, "GB/s", dev,
                           args.dtype))
            gbs = max(gbs_samples)
        if tflops is None:
            out.append(row(BENCH, "matmul", "torch", "2048x2048x2048", "tflops", tflops_samples, "TFLOP/s", dev,
                           args.dtype))
            tflops = max(tflops_samples)
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
            dense = measure(dense_fn, args)
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
                    times[label] = measure(fn, args)
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
                    out.append(row(BENCH, OP, label, shape, "roofline_fraction", [roof / s for s in samples],
                                   "fraction", dev, args.dtype))
                logging.info("%s: %s", shape, "  ".join(f"{k} {statistics.median(v) * 1e3:.3f} ms"
                                                        for k, v in times.items()))
            del x
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
    p.add_argument("--warm-cache", action="store_true", help="do not evict the caches between calls (small kept "
                   "weights then stay cache-resident; CPU only: on a GPU do_bench always flushes)")
    p.add_argument("--out", default=None, help="CSV the rows are added to (default "
                   "benchmarks/results/masked_ffn_<cpu|cuda>.csv)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.warm_cache and args.device.startswith("cuda"):
        p.error("--warm-cache is for the CPU: on a GPU triton.testing.do_bench flushes the L2 cache before every call")
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
