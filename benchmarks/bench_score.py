"""Scoring pass vs plain inference: time ratio on the same rows, and peak memory as rows grow 10x.

Time: in one process, the same rows go through (a) a plain inference pass (the same batching, no hooks),
(b) the baseline (sums) pass and (c) the evaluation (counts) pass of the scorer, for each stats backend;
interleaved rounds (_common.bench_rounds), ratio against (a) of the same round. DESIGN.md's goal: <= 1.10x on CPU.

Memory: each (provider, rows) pair runs in a fresh process that reports its peak resident set size; the
scorer's must stay flat as the number of rows grows 10x, and close to plain inference's.

    python benchmarks/bench_score.py --task sst2 --rows 512 --memory-rows 1000,10000   # rows added to the CSV
    python benchmarks/plot.py benchmarks/results/score_cpu.csv                          # redraw the PNG
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from _common import bench_rounds, device_name, peak_rss_mib, row, write_rows
from plot import plot

BENCH = "score"


def _setup(model_name: str, task_name: str, rows: int, device: str):
    from skillkern.data import load_task
    from skillkern.models import load_model

    task = load_task(task_name)
    examples = task.split("train")
    if rows > len(examples):
        examples = (examples * (rows // len(examples) + 1))
    model, tokenizer = load_model(model_name, device=device)
    return model, tokenizer, examples[:rows], task.num_classes


def plain_pass(model, tokenizer, examples, settings) -> None:
    from skillkern.scoring import iter_batches

    device = next(model.parameters()).device
    with torch.inference_mode():
        for batch in iter_batches(tokenizer, examples, settings.batch_size, settings.max_length,
                                  settings.pad_multiple, device):
            model(**batch.inputs)


def bench_time(args) -> list[dict]:
    """Rounds of [plain pass, then every scoring pass]; each pass's ratio is taken against the plain pass of
    the same round, so slow drifts of a shared machine cancel out."""
    from skillkern import _ext
    from skillkern.scoring import ScoreSettings, Scorer

    model, tokenizer, examples, classes = _setup(args.model, args.task, args.rows, args.device)
    dev = device_name(args.device)
    base = ScoreSettings(batch_size=args.batch_size, max_length=args.max_length)
    shape = f"{args.model}:{args.task}:rows={args.rows}:bs={args.batch_size}"
    backends = ["torch"] + (["ext"] if _ext.available() else [])
    providers = {}
    for backend in backends:
        settings = ScoreSettings(batch_size=args.batch_size, max_length=args.max_length, backend=backend)
        scorer = Scorer(model, tokenizer, classes, settings, progress=False)
        sums_stats = scorer.new_stats()
        count_stats = scorer.new_stats()
        scorer.run_pass(count_stats, examples)
        count_stats.finalize_thresholds()
        providers[f"baseline-pass[{backend}]"] = lambda sc=scorer, st=sums_stats: sc.run_pass(st, examples)
        providers[f"eval-pass[{backend}]"] = lambda sc=scorer, st=count_stats: sc.run_pass(st, examples)
    fns = {"plain-inference": lambda: plain_pass(model, tokenizer, examples, base)} | providers
    times = bench_rounds(fns, args.repeats, device=args.device)
    ratios = {name: [t / p for t, p in zip(times[name], times["plain-inference"])] for name in providers}
    out = [row(BENCH, "pass", name, shape, "time", samples, "s", dev) for name, samples in times.items()]
    out += [row(BENCH, "pass", name, shape, "ratio_vs_plain", samples, "x", dev) for name, samples in ratios.items()]
    return out


def child(args) -> None:
    """One fresh process: run one provider on ``--rows`` rows and print its peak RSS as JSON."""
    from skillkern.scoring import ScoreSettings, Scorer

    model, tokenizer, examples, classes = _setup(args.model, args.task, args.rows, args.device)
    settings = ScoreSettings(batch_size=args.batch_size, max_length=args.max_length)
    before = peak_rss_mib()
    if args.child == "plain":
        plain_pass(model, tokenizer, examples, settings)
        plain_pass(model, tokenizer, examples, settings)
        state = 0
    else:
        stats = Scorer(model, tokenizer, classes, settings, progress=False).score(examples, examples)
        state = sum(t.numel() * t.element_size() for t in stats.state_tensors().values())
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "after_load_mib": before, "state_bytes": state}))


def bench_memory(args) -> list[dict]:
    dev = device_name(args.device)
    out = []
    for rows in [int(r) for r in args.memory_rows.split(",")]:
        for provider in ("plain", "score"):
            cmd = [sys.executable, __file__, "--child", provider, "--rows", str(rows), "--model", args.model,
                   "--task", args.task, "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                   "--device", args.device]
            res = json.loads(subprocess.check_output(cmd, text=True).strip().splitlines()[-1])
            shape = f"{args.model}:{args.task}:rows={rows}:bs={args.batch_size}"
            name = "plain-inference" if provider == "plain" else "score-both-passes"
            out.append(row(BENCH, "memory", name, shape, "peak_rss", [res["peak_rss_mib"]], "MiB", dev))
            out.append(row(BENCH, "memory", name, shape, "peak_rss_growth",
                           [res["peak_rss_mib"] - res["after_load_mib"]], "MiB", dev))
            if provider == "score":
                out.append(row(BENCH, "memory", name, shape, "stats_state", [res["state_bytes"] / 2**20], "MiB", dev))
            print(f"{name:>18} rows={rows:>6}: peak RSS {res['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="sst2")
    p.add_argument("--rows", type=int, default=512, help="rows per timed pass")
    p.add_argument("--memory-rows", default="1000,10000", help="row counts of the memory runs (10x apart)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="CSV the rows are added to (default "
                   "benchmarks/results/score_<cpu|cuda>.csv)")
    p.add_argument("--time-only", action="store_true", help="re-run the timing only (the CSV keeps its memory rows)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    out = Path(args.out or Path(__file__).parent / "results" / f"score_{torch.device(args.device).type}.csv")
    rows = bench_time(args) + ([] if args.time_only else bench_memory(args))
    write_rows(out, rows)
    for r in rows:
        print(f"{r['provider']:>28} {r['metric']:>28} {r['shape']:>40}: {r['median']} {r['unit']}")
    print(f"wrote {out} and {plot(out)}")


if __name__ == "__main__":
    main()
