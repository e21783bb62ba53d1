"""RESULTS.md generation (experiments/results_md.py, run as a user runs it): the significance rule over seeds and
the speed table read from the benchmark CSVs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAD = "bench,op,provider,shape,dtype,metric,median,p20,p80,unit,n,device,torch,skillkern,commit,timestamp\n"


def _seed(skill: float, random: float, rows: int = 400) -> dict:
    pert = {"fractions": [0.0, 0.2], "skill": [0.8, skill], "random": [0.8, random], "clean_accuracy": 0.8,
            "test_rows": rows}
    return {"seed": 0, "test_accuracy": 0.8, "best_predictivity": 0.9, "perturbation": pert}


def _study(tmp_path: Path, tasks: dict) -> Path:
    """A result folder with a results.json of ``tasks`` (task -> per-seed records) and a pruning.json."""
    out = tmp_path / "study"
    out.mkdir()
    names = list(tasks)
    results = {"model": "minilm", "quick": False, "fractions": [0.0, 0.2], "tasks": tasks,
               "seeds": {t: list(range(len(v))) for t, v in tasks.items()},
               "settings": {"prompt_len": 4, "epochs": 1, "lr": 0.01, "max_length": 32, "max_train": 32,
                            "max_dev": 16, "max_test": 16, "eval_every": 1},
               "correlation": {"tasks": names, "whole_model": [[1.0] * len(names)] * len(names),
                               "per_layer": []},
               "controls": {}, "bitfit": {}}
    (out / "results.json").write_text(json.dumps(results))
    entry = {"keep": 0.02, "layers": "top:0.75", "pruned_layers": [1, 2], "test_accuracy_original": 0.8,
             "test_accuracy_pruned": 0.7, "params_before": 100, "params_after": 60}
    (out / "pruning.json").write_text(json.dumps({"sst2": {"prompt": entry, "tokens": entry}}))
    return out


def _write(out: Path, bench: Path) -> str:
    md = out / "RESULTS.md"
    subprocess.run([sys.executable, str(ROOT / "experiments" / "results_md.py"), "--out", str(out), "--results-md",
                    str(md), "--benchmarks", str(bench)], check=True, capture_output=True, text=True)
    return md.read_text()


def _main_table_cell(text: str, task: str) -> str:
    line = next(x for x in text.splitlines() if x.startswith(f"| {task} |"))
    return line.rstrip(" |").split(" | ")[-1]


def test_significance_needs_the_gap_and_the_same_sign_in_every_seed(tmp_path):
    # two SE of the difference at p = 0.8, n = 400: 2 * sqrt(2 * 0.16 / 400) = 0.0566
    tasks = {"big": [_seed(0.60, 0.75)], "noise": [_seed(0.72, 0.75)],
             "split": [_seed(0.50, 0.75), _seed(0.78, 0.76)],  # the mean gap is large, one seed points the other way
             "both": [_seed(0.60, 0.75), _seed(0.62, 0.74)], "few": [_seed(0.60, 0.75, rows=10)]}
    text = _write(_study(tmp_path, tasks), tmp_path / "no-benchmarks")
    assert _main_table_cell(text, "big") == "**0.600 / 0.750**"
    assert _main_table_cell(text, "noise") == "0.720 / 0.750"  # gap inside the noise
    assert _main_table_cell(text, "split") == "0.640 / 0.755"
    assert _main_table_cell(text, "both") == "**0.610 / 0.745**"
    assert _main_table_cell(text, "few") == "0.600 / 0.750"  # few rows: wide noise band
    assert "on 2 of 5 tasks (big, both)" in text
    assert "Measured speed-up" not in text  # no benchmark CSV: no speed table


def test_speed_table_reads_the_newest_rows_of_the_benchmark_csv(tmp_path):
    out = _study(tmp_path, {"sst2": [_seed(0.6, 0.75)]})
    bench = tmp_path / "bench"
    bench.mkdir()

    def rows(commit, stamp, cells):
        return "".join(f"pruned_model,forward,{p},{s},float32,speedup_vs_dense,{m},{lo},{hi},x,10,CPU X,2.13,0.1.0,"
                       f"{commit},{stamp}\n" for p, s, m, lo, hi in cells)

    b1, b8 = "m:batch=1:seq=32:keep=0.02:layers=top:0.75", "m:batch=8:seq=32:keep=0.02:layers=top:0.75"
    first = [("pruned-sliced", b1, "1.5", "1.4", "1.6"), ("flop-limit", b1, "1.8", "1.8", "1.8"),
             ("pruned-sliced", b8, "1.75", "1.7", "1.8"), ("flop-limit", b8, "1.8", "1.8", "1.8"),
             ("pruned-masked_ffn", b8, "1.2", "1.1", "1.3"),  # slower than sliced: not shown
             ("pruned-masked_ffn", b1, "1.3", "1.2", "1.4")]
    csv = bench / "pruned_model_cpu.csv"
    csv.write_text(HEAD + rows("aaa", "2026-01-01T00:00:00+00:00", first))
    text = _write(out, bench)
    assert "| CPU X | float32 | m | batch=1 seq=32 | sliced | 1.50x | 1.40-1.60 | 1.80x | 83% |" in text
    assert "| CPU X | float32 | m | batch=8 seq=32 | sliced | 1.75x | 1.70-1.80 | 1.80x | 97% |" in text
    assert "Below the 90% goal: m batch=1 seq=32." in text
    assert "Only CPU numbers exist" in text
    # a later run (another commit) of one provider and shape is appended: it supersedes the earlier row
    csv.write_text(csv.read_text() + rows("bbb", "2026-02-01T00:00:00+00:00",
                                          [("pruned-masked_ffn", b1, "1.7", "1.6", "1.75")]))
    text = _write(out, bench)
    assert "| CPU X | float32 | m | batch=1 seq=32 | masked_ffn | 1.70x | 1.60-1.75 | 1.80x | 94% |" in text
    assert "Every shape reaches the 90% goal." in text
    assert text.count("| CPU X | float32 | m |") == 2


def test_pruning_criteria_section_from_its_json(tmp_path):
    """experiments/run_pruning.py's aggregate, when it sits in OUT/pruning_criteria/, becomes a section: its table
    (every criterion, the skill row's verdicts) and the plot, nothing typed in by hand."""
    out = _study(tmp_path, {"sst2": [_seed(0.6, 0.75)]})
    (out / "pruning_criteria").mkdir()
    cells = {}
    for criterion, acc in (("skill", (0.80, 0.82, 0.81)), ("flap", (0.70, 0.71, 0.69))):
        for setting in ("pruned", "retuned"):
            cells[f"{criterion}|0.1|{setting}"] = {"mean": sum(acc) / 3, "ci95": 0.02, "n": 3, "per_seed": list(acc)}
    diff = {"mean": 0.11, "ci95": 0.02, "n": 3, "verdict": "win"}
    results = {"criteria": ["skill", "flap"], "fractions": [0.1], "fill": "tokens", "layers": "top:0.75",
               "retune_epochs": 1.0, "quick": False,
               "tasks": {"sst2": {"seeds": [0, 1, 2], "majority": 0.5, "learns": True,
                                  "original": {"mean": 0.85, "ci95": 0.01, "n": 3}, "cells": cells,
                                  "skill_vs": {f"0.1|{s}": {"flap": diff, "strongest": "flap"}
                                               for s in ("pruned", "retuned")}}}}
    (out / "pruning_criteria" / "pruning_criteria.json").write_text(json.dumps(results))
    text = _write(out, tmp_path / "no-benchmarks")
    assert "## Skill neurons against the structured-pruning criteria" in text
    assert "skill neurons win 2, tie 0 and lose 0 of 2 comparisons" in text
    assert "| skill | 0.810 ± 0.020 (win vs flap) | 0.810 ± 0.020 (win vs flap) |" in text
    assert "pruning_criteria/pruning_criteria.png" in text
