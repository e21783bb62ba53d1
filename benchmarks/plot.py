"""Draw every benchmark's PNG from its CSV: the one plotter of this folder.

    python benchmarks/plot.py benchmarks/results/*.csv                 # one PNG next to each CSV
    python benchmarks/plot.py benchmarks/results/masked_ffn_cuda.csv --device "NVIDIA H200" --dtype float16

A results CSV keeps every run (``_common.write_rows``: rows keyed by op, provider, shape, dtype, metric, device
and commit). A plot shows one device and dtype, by default those of the newest row, and of each measurement its
newest row; the title names the commits drawn. The figure follows the ``bench`` column: ``masked_ffn`` (time and
ratio to pre-sliced against the keep fraction), ``pruned_model`` (speed-up beside the FLOP limit),
``stats_memory`` (memory against rows and neurons), the compile gate's ``kernel_resources`` table (registers and
shared memory per kernel variant), any other (``score``, ``ffn_stats``) as grouped bars: one panel per op and
metric, one group per shape, one bar per provider (median, p20-p80 whiskers).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Optional

from _common import read_rows

#: a ratio panel marks 1 and DESIGN.md's goal for a scoring pass / masked FFN against its reference
RATIO_GOAL = 1.10


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def select(rows: list[dict], device: Optional[str] = None, dtype: Optional[str] = None
           ) -> tuple[list[dict], str, str]:
    """The rows to draw: those of ``device`` and ``dtype`` (default: the newest row's), the newest of each
    measurement (the same key without the commit). Returns ``(rows, device, dtype)``."""
    if device is None:
        device = max(rows, key=lambda r: r["timestamp"])["device"]
    mine = [r for r in rows if r["device"] == device]
    if not mine:
        raise SystemExit(f"no rows of device {device!r}; the CSV has {sorted({r['device'] for r in rows})}")
    if dtype is None:
        dtype = max(mine, key=lambda r: r["timestamp"])["dtype"]
    newest: dict = {}
    for r in mine:
        if r["dtype"] != dtype:
            continue
        key = tuple(r[k] for k in ("bench", "op", "provider", "shape", "metric"))
        if key not in newest or r["timestamp"] >= newest[key]["timestamp"]:
            newest[key] = r
    if not newest:
        raise SystemExit(f"no {dtype} rows of {device!r}")
    return list(newest.values()), device, dtype


def plot(path: str | Path, device: Optional[str] = None, dtype: Optional[str] = None) -> Path:
    """Draw the PNG of the results CSV ``path`` next to it (same name, ``.png``); returns the PNG's path."""
    path = Path(path)
    rows = read_rows(path)
    if not rows:
        raise SystemExit(f"{path}: no rows to plot")
    if "registers" in rows[0]:  # the compile gate's table (skillkern/ops/aot.py), a format of its own
        kind = "kernel_resources"
        fig = kernel_resources_figure(rows)
    else:
        rows, device, dtype = select(rows, device, dtype)
        commits = ", ".join(sorted({r["commit"] for r in rows}))
        torches = ", ".join(sorted({r["torch"] for r in rows}))
        title = f"{path.stem} on {device}, {dtype} (torch {torches}, commit {commits})"
        kind = rows[0]["bench"]
        fig = FIGURES.get(kind, bars_figure)(rows, title)
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=FIG_DPI.get(kind, 100))
    _plt().close(fig)
    return out


# ----------------------------------------------------------------------------------------- generic: bars
def bars_figure(rows: list[dict], title: str):
    """One panel per (op, metric): groups = shapes, bars = providers, median with p20-p80 whiskers."""
    plt = _plt()
    panels: dict = defaultdict(list)
    for r in rows:
        panels[(r["op"], r["metric"], r["unit"])].append(r)
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    width = max(9.0, min(18.0, 2.8 + 0.22 * max(len(rs) for rs in panels.values())))
    height = 3.4 * len(panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, height), squeeze=False)
    for ax, ((op, metric, unit), rs) in zip(axes[:, 0], panels.items()):
        shapes = list(dict.fromkeys(r["shape"] for r in rs))
        provs = [p for p in providers if any(r["provider"] == p for r in rs)]
        w = 0.8 / len(provs)
        for j, prov in enumerate(provs):
            found = [(i, r) for i, s in enumerate(shapes) for r in rs if r["shape"] == s and r["provider"] == prov]
            med = [float(r["median"]) for _, r in found]
            err = [[m - float(r["p20"]) for m, (_, r) in zip(med, found)],
                   [float(r["p80"]) - m for m, (_, r) in zip(med, found)]]
            ax.bar([i - 0.4 + w * (j + 0.5) for i, _ in found], med, w, yerr=err, capsize=2, color=colors[prov],
                   label=prov)
        if metric.startswith("ratio_vs"):
            ax.axhline(1.0, color="grey", ls="--", lw=0.8)
            ax.axhline(RATIO_GOAL, color="tab:red", ls=":", lw=0.8, label=f"goal {RATIO_GOAL:.2f}x")
        values = [float(r["median"]) for r in rs if float(r["median"]) > 0]
        if metric == "time" and values and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([s.replace(":", "\n") for s in shapes], fontsize=7)
        ax.set_ylabel(f"{metric} [{unit}]")
        ax.set_title(f"{op}: {metric}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height))
    return fig


# ------------------------------------------------------------------------------------------------ masked_ffn
def masked_ffn_figure(rows: list[dict], title: str):
    """Time vs keep fraction, one panel per (shape, rows), one line per provider (median, p20-p80 bars);
    below, the ratio to presliced."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, FuncFormatter, NullFormatter, NullLocator

    plt = _plt()
    series = defaultdict(lambda: defaultdict(list))  # (shape, rows) -> provider -> [(keep, med, p20, p80)]
    ratios = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["op"] != "masked_ffn" or r["metric"] not in ("time", "ratio_vs_presliced"):
            continue
        parts = r["shape"].split(":")  # name:H=..:D=..:rows=..:keep=2%(K=..)
        panel = (parts[0], parts[3])
        keep = float(parts[4].split("=")[1].split("%")[0])
        point = (keep, float(r["median"]), float(r["p20"]), float(r["p80"]))
        (series if r["metric"] == "time" else ratios)[panel][r["provider"]].append(point)
    panels = list(series)
    shapes = list(dict.fromkeys(p[0] for p in panels))
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
                line = ax.errorbar(k, [m * 1e3 for m in med], yerr=[[(m - lo_) * 1e3 for m, lo_ in zip(med, lo)],
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
                a.set_yscale("log")
                a.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                a.yaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{panel[0]}  {panel[1]}", fontsize=9)
            ax.set_ylabel("time [ms]")
            axr.axhline(1.0, color="grey", lw=0.8)
            axr.axhline(RATIO_GOAL, color="tab:red", ls=":", lw=0.8)
            axr.set_ylabel("time / presliced")
            axr.set_xlabel("keep fraction")
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    return fig


# ---------------------------------------------------------------------------------------------- pruned_model
def pruned_model_figure(rows: list[dict], title: str):
    """Measured speed-up beside the FLOP limit, one panel per model, one bar group per (batch, seq)."""
    plt = _plt()
    rows = [r for r in rows if r["metric"] == "speedup_vs_dense"]
    models = list(dict.fromkeys(r["shape"].split(":")[0] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        shapes = [r["shape"] for r in rows if r["shape"].startswith(m + ":") and r["provider"] == "flop-limit"]
        labels = [":".join(x.split(":")[1:3]).replace("batch=", "b").replace("seq=", "t") for x in shapes]
        lim = [float(next(r for r in rows if r["shape"] == x and r["provider"] == "flop-limit")["median"])
               for x in shapes]
        provs = [p for p in ("pruned-sliced", "pruned-masked_ffn") if any(r["provider"] == p for r in rows)]
        xs = range(len(shapes))
        w = 0.8 / (len(provs) + 1)
        for j, prov in enumerate(provs):
            found = [(x, next((r for r in rows if r["shape"] == sh and r["provider"] == prov), None))
                     for x, sh in zip(xs, shapes)]
            found = [(x, r) for x, r in found if r is not None]
            pos = [x - 0.4 + w * (j + 0.5) for x, _ in found]
            med = [float(r["median"]) for _, r in found]
            err = [[v - float(r["p20"]) for v, (_, r) in zip(med, found)],
                   [float(r["p80"]) - v for v, (_, r) in zip(med, found)]]
            ax.bar(pos, med, w, yerr=err, capsize=3, label=f"measured, {prov[7:]}")
        ax.bar([x - 0.4 + w * (len(provs) + 0.5) for x in xs], lim, w, color="lightgrey", label="FLOP limit")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(m, fontsize=10)
        ax.axhline(1, color="k", lw=0.6)
    axes[0][0].set_ylabel("speed-up over dense")
    axes[0][0].legend(fontsize=7, loc="lower right")
    plan = rows[0]["shape"].split(":keep=")[-1].split(":layers=")  # the pruning plan is the same in every shape
    fig.suptitle(f"{float(plan[0]):.0%} of neurons kept in layers {plan[-1]}, end to end\n{title}", fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- stats_memory
def stats_memory_figure(rows: list[dict], title: str):
    """Peak memory growth against rows (flat) and against neurons (linear, beside the formula)."""
    plt = _plt()
    rows = [r for r in rows if r["metric"] in ("peak_rss_growth", "predicted_state")]
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
    fig.suptitle(f"statistics memory: {title}", fontsize=9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ kernel_resources
def kernel_resources_figure(rows: list[dict]):
    """Registers of every variant per kernel and target (auto's choices filled, spills marked), and shared
    memory against each target's per-block limit; one column per Triton version."""
    plt = _plt()
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
    return fig


FIGURES = {"masked_ffn": masked_ffn_figure, "pruned_model": pruned_model_figure,
           "stats_memory": stats_memory_figure}
#: resolution by kind of figure (large figures a little coarser)
FIG_DPI = {"masked_ffn": 90, "kernel_resources": 90, "pruned_model": 110}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", help="results CSV files (benchmarks/results/*.csv)")
    p.add_argument("--device", default=None, help="the device to draw (default: that of the newest row)")
    p.add_argument("--dtype", default=None, help="the dtype to draw (default: that of the device's newest row)")
    args = p.parse_args()
    for path in args.csv:
        print(f"wrote {plot(path, args.device, args.dtype)}")


if __name__ == "__main__":
    main()
