"""FFN up-projection with scoring statistics vs the plain up-projection (ops/ffn_stats.py).

Providers, on the same inputs (R token rows, one tracked row per 128 tokens as with cls pooling):

    plain-ffn     h = act(x W1^T + b1) (gated: act(x Wg^T) * (x W1^T)), no statistics: the reference
    hook-torch    plain-ffn, then gather the tracked rows and run the PyTorch reference of stats_update
                  (what the hook-based scorer does per layer)
    hook-ext      the same with the compiled stats_update op (when skillkern._C is built)
    host-copy     plain-ffn, then copy h to host memory as numpy and compare/accumulate there (the
                  released code of the skill-neuron paper works this way)
    fused-triton  ops.ffn_stats with backend="triton": statistics in the GEMM epilogue (CUDA only)

Modes (--modes): ``sums`` and ``counts`` (the scoring passes: one tracked row per sequence) and ``moments`` (the
pruning criteria's float64 sum, sum of squares and sum of |h|, over every token row: stats_moments in the hooks).

Every provider's statistics are checked against hook-torch before timing. Timing (_common.bench_rounds:
triton.testing.do_bench on a GPU, its protocol on the CPU) interleaves providers round by round (so a load change
hits all of them alike); ratio_vs_plain pairs the samples of one round. On a GPU the FLOP rate (tflops) and the
fraction of the FLOP roofline (roofline_fraction; 2*R*H*D flops per GEMM) are reported when the device's peak is
known (_common.PEAKS, or given with --peak-tflops).

    python benchmarks/bench_ffn_stats.py --quick          # CPU: a minute or two
    python benchmarks/bench_ffn_stats.py                  # adds rows to results/ffn_stats_<cpu|cuda>.csv, draws .png
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _common import bench_rounds, device_name, peak, row, write_rows
from plot import plot

BENCH = "ffn_stats"
TOKENS_PER_SEQ = 128

# name: (hidden, neurons, activation, gated)
SHAPES = {
    "bert-base": (768, 3072, "gelu", False),
    "roberta-large": (1024, 4096, "gelu", False),
    "llama-7b": (4096, 11008, "silu", True),
}

def make_inputs(name, rows, dtype, device, mode, seed=0):
    hidden, width, act, gated = SHAPES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g).to(device, dtype)
    w1 = (torch.randn(width, hidden, generator=g) / hidden ** 0.5).to(device, dtype)
    wg = (torch.randn(width, hidden, generator=g) / hidden ** 0.5).to(device, dtype) if gated else None
    b1 = None if gated else (torch.randn(width, generator=g) * 0.1).to(device, dtype)
    slot = torch.full((rows,), -1, dtype=torch.int64)
    slot[::TOKENS_PER_SEQ] = 0  # one tracked row per sequence
    if mode == "moments":
        slot[:] = 0  # the pruning criteria's moments: every real token
    label = torch.randint(0, 2, (rows,), generator=g)
    threshold = (torch.randn(1, width, generator=g, dtype=torch.float64) * 0.1) if mode == "counts" else None
    return dict(x=x, w1=w1, b1=b1, w_gate=wg, act=act, slot=slot.to(device), label=label.to(device),
                threshold=None if threshold is None else threshold.to(device))


def providers(inp, mode, device, with_ext, with_triton):
    """name -> (run(out) -> None, fresh out). Each run adds one batch to its ``out``."""
    from skillkern.ops.activations import apply_act
    from skillkern.ops.ffn_stats import ffn_stats
    from skillkern.ops.stats_moments import stats_moments
    from skillkern.ops.stats_update import stats_update

    x, w1, b1, wg, act = inp["x"], inp["w1"], inp["b1"], inp["w_gate"], inp["act"]
    slot, label, thr = inp["slot"], inp["label"], inp["threshold"]
    tracked = (slot >= 0).nonzero().flatten()
    slot_t, label_t = slot[tracked], label[tracked]
    width = w1.shape[0]
    out_dtype = torch.int64 if mode == "counts" else torch.float64
    cells = 3 if mode == "moments" else 2  # (slot, moment, neuron) or (slot, class, neuron)

    def fresh():
        return torch.zeros(1, cells, width, dtype=out_dtype, device=device)

    def plain():
        if wg is None:
            return apply_act(F.linear(x, w1, b1), act)
        return apply_act(F.linear(x, wg), act) * F.linear(x, w1, b1)

    def hook(backend):
        def run(out):
            h = plain()
            if mode == "moments":
                stats_moments(h[tracked], slot_t, out, backend=backend, check=False)
            else:
                stats_update(h[tracked], slot_t, label_t, out, thr, backend=backend, check=False)
        return run

    thr_np = None if thr is None else thr.cpu().numpy()
    slot_np, label_np = slot_t.cpu().numpy(), label_t.cpu().numpy()
    tracked_np = tracked.cpu().numpy()

    def host_copy(out_np):
        h = plain().float()
        h_np = h.cpu().numpy() if h.is_cuda else h.numpy().copy()  # a host copy of every activation, as numpy
        rows = h_np[tracked_np].astype(np.float64)
        if mode == "moments":
            for k, part in enumerate((rows, rows * rows, np.abs(rows))):
                np.add.at(out_np[:, k], slot_np, part)
        elif thr_np is None:
            np.add.at(out_np, (slot_np, label_np), rows)
        else:
            np.add.at(out_np, (slot_np, label_np), (rows > thr_np[slot_np]).astype(np.int64))

    def fused(out):
        ffn_stats(x, w1, b1, act=act, w_gate=wg, slot=slot, label=None if mode == "moments" else label, out=out,
                  threshold=thr, mode=mode, backend="triton")

    result = {"plain-ffn": (lambda out: plain(), fresh), "hook-torch": (hook("torch"), fresh),
              "host-copy": (host_copy, lambda: fresh().cpu().numpy())}
    if with_ext:
        result["hook-ext"] = (hook("ext"), fresh)
    if with_triton:
        result["fused-triton"] = (fused, fresh)
    return result


def verify(provs, mode):
    """Every provider's statistics after one batch against hook-torch's (counts exact; sums to rounding:
    fused h rounds once, the others round GEMM output and activation separately)."""
    ref_run, ref_fresh = provs["hook-torch"]
    ref = ref_fresh()
    ref_run(ref)
    ref = torch.as_tensor(np.asarray(ref.cpu()))
    for name, (run, fresh) in provs.items():
        if name in ("plain-ffn", "hook-torch"):
            continue
        out = fresh()
        run(out)
        got = torch.as_tensor(np.asarray(out.cpu() if isinstance(out, torch.Tensor) else out))
        if name != "fused-triton":  # same h, same float64 compare / row-order sums
            ok = torch.equal(got, ref) if mode == "counts" else torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
        elif mode == "counts":  # rounding differences flip a few near-threshold comparisons at most
            ok = int((got - ref).abs().sum()) <= max(1, ref.numel() // 1000)
        else:
            ok = torch.allclose(got, ref, rtol=1e-2, atol=1e-2)
        if not ok:
            raise AssertionError(f"{name}: statistics differ from hook-torch (max diff {(got - ref).abs().max()})")


def time_providers(provs, repeats, device):
    """Interleaved rounds: {name: [seconds per round]}; each provider adds to its own statistics."""
    outs = {name: fresh() for name, (_, fresh) in provs.items()}
    return bench_rounds({name: (lambda run=run, out=outs[name]: run(out)) for name, (run, _) in provs.items()},
                        repeats, device=device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {list(SHAPES)}")
    p.add_argument("--modes", default="sums,counts", help="comma-separated: sums, counts, moments")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: bfloat16 on CUDA, "
                   "float32 on CPU)")
    p.add_argument("--rows", type=int, default=32 * TOKENS_PER_SEQ, help="token rows per batch (32 x 128)")
    p.add_argument("--max-gflop", type=float, default=None,
                   help="cap the rows of a shape so one GEMM stays under this (default: 100 on CPU, none on GPU)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="BERT-base and RoBERTa-large only, 1024 rows, 5 repeats")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the roofline fraction")
    p.add_argument("--out", default=None, help="CSV the rows are added to (default "
                   "benchmarks/results/ffn_stats_<cpu|cuda>.csv)")
    args = p.parse_args()

    import skillkern
    from skillkern import _ext
    from skillkern.ops.activations import HAVE_TRITON

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    shapes = args.shapes.split(",")
    if args.quick:
        shapes = [s for s in shapes if s != "llama-7b"]
        args.rows, args.repeats = min(args.rows, 8 * TOKENS_PER_SEQ), min(args.repeats, 5)
    max_gflop = args.max_gflop if args.max_gflop is not None else (None if cuda else 100.0)
    dev = device_name(device)
    known = peak(dev, dtype) if cuda else None
    peak_tflops = args.peak_tflops or (known and known[1])
    with_triton = cuda and HAVE_TRITON
    dname = str(dtype).replace("torch.", "")
    rows_out = []
    torch.set_grad_enabled(False)
    for name in shapes:
        hidden, width, act, gated = SHAPES[name]
        gemms = 2 if gated else 1
        rows = args.rows
        if max_gflop is not None:  # keep CPU runs to minutes: fewer sequences for the 7B shape
            while rows > TOKENS_PER_SEQ and 2e-9 * rows * hidden * width * gemms > max_gflop:
                rows //= 2
        flops = 2.0 * rows * hidden * width * gemms
        for mode in args.modes.split(","):
            inp = make_inputs(name, rows, dtype, device, mode)
            with_ext = _ext.has_op("stats_moments" if mode == "moments" else "stats_update", device)
            provs = providers(inp, mode, device, with_ext, with_triton)
            verify(provs, mode)
            samples = time_providers(provs, args.repeats, device)
            shape = f"{name}:H={hidden}:D={width}{':gated' if gated else ''}:rows={rows}:mode={mode}"
            op = BENCH
            plain = samples["plain-ffn"]
            for prov, s in samples.items():
                rows_out.append(row(BENCH, op, prov, shape, "time", s, "s", dev, dname))
                if prov != "plain-ffn":
                    ratios = [a / b for a, b in zip(s, plain)]
                    rows_out.append(row(BENCH, op, prov, shape, "ratio_vs_plain", ratios, "x", dev, dname))
                if cuda and prov in ("plain-ffn", "fused-triton"):
                    rows_out.append(row(BENCH, op, prov, shape, "tflops", [flops / t / 1e12 for t in s],
                                        "TFLOP/s", dev, dname))
                    if peak_tflops:
                        rows_out.append(row(BENCH, op, prov, shape, "roofline_fraction",
                                            [flops / t / 1e12 / peak_tflops for t in s], "fraction", dev, dname))
                med = statistics.median(s)
                ratio = statistics.median([a / b for a, b in zip(s, plain)])  # as in the CSV: paired rounds
                print(f"{name:>14} {mode:>6} R={rows:<5} {prov:>13}: {med * 1e3:9.2f} ms  {ratio:5.3f}x plain  "
                      f"{flops / med / 1e9:8.1f} GFLOP/s", file=sys.stderr)
    out = Path(args.out or Path(__file__).parent / "results" / f"ffn_stats_{device.type}.csv")
    write_rows(out, rows_out)
    png = plot(out)
    print(f"wrote {out} and {png} (skillkern {skillkern.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
