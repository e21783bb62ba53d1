"""Statistics memory against rows scored (flat) and against neuron count (linear), at the op level.

Each (shape, rows) pair runs in a fresh process: it allocates the :class:`NeuronStats` of an ``L x D`` model,
feeds ``rows`` synthetic activation rows per layer through both passes in batches, and reports its peak
resident set size above what the process held before the statistics existed. The prediction is

    state bytes = 8 * (2 * L * S * C * D + L * S * D + 2 * C)     (float64 sums, int64 counts, float64 thresholds)

plus one batch of rows (R x D float32) that is reused. Shapes: MiniLM (6 x 1536), BERT-base (12 x 3072),
Llama-7B (32 x 11008), Llama-70B (80 x 28672).

    python benchmarks/bench_stats_memory.py    # adds rows to benchmarks/results/stats_memory_cpu.csv, draws .png
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
from plot import plot

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
            stats.finalize_thresholds()
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
    print(f"wrote {args.out} and {plot(args.out)}")


if __name__ == "__main__":
    main()
