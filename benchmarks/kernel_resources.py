"""The compile gate's resource table: every Triton kernel variant the launchers can choose, compiled for sm_80 and
sm_90 without a GPU (skillkern.ops.aot), with registers, spill bytes, shared memory and tensor-core family.

    python benchmarks/kernel_resources.py            # compile what the table lacks, rewrite it, draw the PNG
    python benchmarks/kernel_resources.py --plot     # only redraw the PNG

Writes benchmarks/results/kernel_resources.csv (rows of every Triton version it was run with; run it again with
the oldest supported Triton on PYTHONPATH to add that version's rows) and kernel_resources.png. Unset
TRITON_INTERPRET first: the interpreter's kernels cannot be compiled.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TABLE = RESULTS / "kernel_resources.csv"


def plot(table: Path = TABLE) -> Path:
    """Registers of every variant per kernel and target (auto's choices filled, spills marked), and shared
    memory against each target's per-block limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(table)))
    versions = sorted({r["triton"] for r in rows})
    kernels = sorted({r["kernel"] for r in rows})
    targets = sorted({r["target"] for r in rows})
    fig, axes = plt.subplots(2, len(versions), figsize=(7.5 * len(versions), 8), squeeze=False)
    for col, version in enumerate(versions):
        mine = [r for r in rows if r["triton"] == version and not r["error"]]
        groups = defaultdict(list)
        for r in mine:
            groups[(r["kernel"], r["target"])].append(r)
        ax, axs = axes[0, col], axes[1, col]
        for i, kernel in enumerate(kernels):
            for j, target in enumerate(targets):
                pts = groups.get((kernel, target), [])
                xpos = i + (j - (len(targets) - 1) / 2) * 0.3
                for metric, a in (("registers", ax), ("shared_bytes", axs)):
                    auto = [int(r[metric]) for r in pts if r["auto"] == "True"]
                    other = [int(r[metric]) for r in pts if r["auto"] != "True"]
                    color = f"C{j}"
                    a.scatter([xpos] * len(other), other, s=12, facecolors="none", edgecolors=color, lw=0.7)
                    a.scatter([xpos] * len(auto), auto, s=12, color=color,
                              label=f"{target} (filled: auto's choice)" if i == 0 and metric == "registers" else None)
                spills = [int(r["registers"]) for r in pts if int(r["spill_bytes"])]
                ax.scatter([xpos] * len(spills), spills, marker="x", color="red", s=40,
                           label="spills" if spills and i == 0 else None)
        ax.axhline(255, color="grey", ls=":", lw=0.8)
        ax.set_ylabel("registers per thread")
        ax.set_title(f"triton {version}: {len(mine)} variants, "
                     f"{sum(1 for r in mine if int(r['spill_bytes']))} with spills", fontsize=10)
        limits = {r["target"]: int(r["smem_limit"]) for r in mine}
        for j, target in enumerate(targets):
            if target in limits:
                axs.axhline(limits[target], color=f"C{j}", ls="--", lw=0.8, label=f"{target} block limit")
        axs.set_ylabel("shared memory per block [B]")
        for a in (ax, axs):
            a.set_xticks(range(len(kernels)))
            a.set_xticklabels([k.strip("_").replace("_kernel", "") for k in kernels], fontsize=8)
            a.grid(True, axis="y", alpha=0.3)
            a.legend(fontsize=7, loc="lower right")
    fig.suptitle("Triton kernels of skillkern compiled ahead of time for A100 (sm_80) and H100 (sm_90): "
                 "every configuration the launchers choose over the grid of skillkern/ops/aot.py", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out = table.with_suffix(".png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plot", action="store_true", help="only redraw the PNG from the CSV")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    args = p.parse_args()
    rc = 0
    if not args.plot:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            sys.exit("kernel_resources.py: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
        from skillkern.ops import aot

        rc = aot.main(["--write", "--table", str(TABLE)] + (["--jobs", str(args.jobs)] if args.jobs else []))
    print(f"wrote {plot()}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
