"""Draw the plots of benchmark CSVs (long format written by benchmarks/_common.py).

    python benchmarks/plot.py benchmarks/results/score_cpu.csv [more.csv ...]

One PNG per CSV, next to it: every (op, metric) pair gets a panel of median with p20-p80 bars per provider
and shape.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(path)))
    panels = defaultdict(list)
    for r in rows:
        panels[(r["op"], r["metric"], r["unit"])].append(r)
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
    for ax, ((op, metric, unit), rs) in zip(axes[:, 0], sorted(panels.items())):
        labels = [f"{r['provider']}\n{r['shape'].split(':', 2)[-1]}" for r in rs]
        med = [float(r["median"]) for r in rs]
        lo = [m - float(r["p20"]) for m, r in zip(med, rs)]
        hi = [float(r["p80"]) - m for m, r in zip(med, rs)]
        ax.bar(range(len(rs)), med, yerr=[lo, hi], capsize=3, color="tab:blue")
        if metric.startswith("ratio"):
            ax.axhline(1.0, color="grey", ls="--", lw=0.8)
            ax.axhline(1.10, color="tab:red", ls=":", lw=0.8, label="goal 1.10x (CPU)")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels(labels, fontsize=7, rotation=0)
        ax.set_ylabel(f"{metric} [{unit}]")
        ax.set_title(f"{op}: {metric}", fontsize=10)
    fig.suptitle(f"{path.stem} on {rows[0]['device']} (torch {rows[0]['torch']}, commit {rows[0]['commit']})", fontsize=10)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"wrote {plot(Path(arg))}")
