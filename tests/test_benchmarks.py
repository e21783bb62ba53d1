"""Benchmark results are appended, not overwritten: a script run as a user runs it upserts its rows into the CSV
(keyed by bench, op, provider, shape, dtype, metric, device and commit) and draws the PNG with the shared plotter."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_stats_memory(out: Path) -> list[dict]:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_stats_memory.py"), "--shapes", "minilm",
                    "--rows", "64", "--batch", "64", "--out", str(out)], check=True, capture_output=True, text=True)
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def test_a_rerun_replaces_its_own_rows_and_keeps_other_commits(tmp_path):
    out = tmp_path / "stats_memory_cpu.csv"
    first = _run_stats_memory(out)
    assert [r["metric"] for r in first] == ["peak_rss_growth", "predicted_state", "throughput"]
    assert all(r["commit"] and r["device"] and r["timestamp"] for r in first)
    assert (tmp_path / "stats_memory_cpu.png").stat().st_size > 0
    # an earlier run of another commit, and a row of this commit that the rerun must replace
    older = dict(first[0], commit="0000000", median="123", timestamp="2020-01-01T00:00:00+00:00")
    stale = dict(first[2], median="-1")
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(first[0]))
        w.writeheader()
        w.writerows([older, first[0], first[1], stale])
    second = _run_stats_memory(out)
    assert len(second) == 4 and second[0] == older  # the other commit's row stays, first
    assert sorted(r["metric"] for r in second[1:]) == ["peak_rss_growth", "predicted_state", "throughput"]
    assert all(r["commit"] == first[0]["commit"] and r["median"] != "-1" for r in second[1:])


def test_ffn_stats_bench_moments_mode_checks_every_provider(tmp_path):
    """bench_ffn_stats.py --modes moments: every provider's moments over every token row are checked against the
    PyTorch hook before timing (the script raises on a mismatch), and each gets a time and a ratio row."""
    out = tmp_path / "ffn_stats_cpu.csv"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ffn_stats.py"), "--device", "cpu", "--shapes",
                    "bert-base", "--rows", "128", "--repeats", "1", "--modes", "moments", "--out", str(out)],
                   check=True, capture_output=True, text=True, cwd=ROOT / "benchmarks")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    providers = {r["provider"] for r in rows}
    assert {"plain-ffn", "hook-torch", "host-copy"} <= providers
    assert all(r["shape"].endswith(":mode=moments") for r in rows)
    assert {r["metric"] for r in rows if r["provider"] == "hook-torch"} == {"time", "ratio_vs_plain"}
