"""Statistics memory against rows scored (flat) and against neuron count (linear), at the op level.

Each (shape, rows) pair runs in a fresh process: it allocates the :class:`NeuronStats` of an ``L x D`` model,
feeds ``rows`` synthetic activation rows per layer through both passes in batches, and reports its peak
resident set size above what the process held before the statistics existed. The prediction is

    state bytes = 8 * (2 * L * S * C * D + L * S * D + 2 * C)     (float64 sums, int64 counts, float64 thresholds)

plus one batch of rows (R x D float32) that is reused. Shapes: MiniLM (6 x 1536), BERT-base (12 x 3072),
Llama-7B (32 x 11008), Llama-70B (80 x 28672).

    python benchmarks/bench_stats_memory.py            # writes benchmarks/results/stats_memory_cpu.csv + png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import device_name, peak_rss_mib, row, write_rows

SHAPES = {"minilm": (6, 1536), "bert-base": (12, 3072), "llama-7b": (32, 11008), "llama-70b": (80, 28672)}
S, C = 1, 2


def predicted_bytes(L: int, D: int) -> int:
    return 8 * (2 * L * S * C * D + L * S * D + 2 * C)


def child(shape: str, rows: int, batch: int) -> None:
    from skillkern.stats import NeuronStats

    L, D = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(batch, D, generator=g)
    label = torch.arange(batch) % C
    slot = torch.zeros(batch, dtype=torch.long)
    before = peak_rss_mib()
    started = time.perf_counter()
    stats = NeuronStats(L, S, D, C)
    for phase in range(2):
        for _ in range(rows // batch):
            for layer in range(L):
                stats.add_rows(layer, h, slot, label, check=False)
            stats.count_rows(label)
        if phase == 0:
            stats.finalize_baseline()
    seconds = time.perf_counter() - started
    print(json.dumps({"growth_mib": peak_rss_mib() - before, "seconds": seconds,
                      "rows_per_s": 2 * rows * L / seconds}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1024,10240", help="rows per layer per pass, 10x apart")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "stats_memory_cpu.csv"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.batch)
        return
    dev = device_name("cpu")
    out = []
    for shape in args.shapes.split(","):
        L, D = SHAPES[shape]
        predicted = (predicted_bytes(L, D) + args.batch * D * 4) / 2**20
        for rows in [int(r) for r in args.rows.split(",")]:
            cmd = [sys.executable, __file__, "--child", shape, str(rows), "--batch", str(args.batch)]
            res = json.loads(subprocess.check_output(cmd, text=True).strip().splitlines()[-1])
            tag = f"{shape}:L={L}:D={D}:rows={rows}"
            out.append(row("stats_memory", "stats", "NeuronStats", tag, "peak_rss_growth", [res["growth_mib"]], "MiB", dev))
            out.append(row("stats_memory", "stats", "formula", tag, "predicted_state", [predicted], "MiB", dev))
            out.append(row("stats_memory", "stats", "NeuronStats", tag, "throughput", [res["rows_per_s"]],
                           "layer-rows/s", dev))
            print(f"{tag:>40}: peak growth {res['growth_mib']:8.1f} MiB, predicted {predicted:8.1f} MiB, "
                  f"{res['rows_per_s']:.3g} layer-rows/s", file=sys.stderr)
    write_rows(args.out, out)
    plot(Path(args.out))
    print(f"wrote {args.out}")


def plot(path: Path) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in csv.DictReader(open(path)) if r["metric"] in ("peak_rss_growth", "predicted_state")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    by_shape: dict = {}
    for r in rows:
        shape, L, D, n = r["shape"].split(":")
        neurons = int(L[2:]) * int(D[2:])
        by_shape.setdefault((shape, neurons), {}).setdefault(r["metric"], []).append((int(n[5:]), float(r["median"])))
    for (shape, neurons), m in sorted(by_shape.items(), key=lambda kv: kv[0][1]):
        xs, ys = zip(*sorted(m["peak_rss_growth"]))
        ax1.plot(xs, ys, "o-", label=f"{shape} ({neurons:,} neurons)")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("rows scored per layer per pass")
    ax1.set_ylabel("peak RSS growth [MiB]")
    ax1.set_title("flat in rows")
    ax1.legend(fontsize=7)
    pts = sorted((n, dict(m["peak_rss_growth"])[max(dict(m["peak_rss_growth"]))], m["predicted_state"][0][1])
                 for (s, n), m in by_shape.items())
    ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="measured")
    ax2.plot([p[0] for p in pts], [p[2] for p in pts], "k--", label="formula")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("neurons (layers x width)")
    ax2.set_ylabel("MiB")
    ax2.set_title("linear in neurons")
    ax2.legend(fontsize=8)
    fig.suptitle(f"statistics memory on {rows[0]['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
