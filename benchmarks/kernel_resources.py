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
import os
import sys
from pathlib import Path

from plot import plot  # benchmarks/plot.py, the plotter of every benchmark

RESULTS = Path(__file__).resolve().parent / "results"
TABLE = RESULTS / "kernel_resources.csv"


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
    print(f"wrote {plot(TABLE)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
