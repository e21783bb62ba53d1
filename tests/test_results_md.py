"""RESULTS.md generation (experiments/results_md.py, run as a user runs it): the significance rule over seeds and
the speed table read from the benchmark CSVs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAD = "bench,op,provider,shape,dtype,metric,median,p20,p80,unit,n,device,torch,skillkern,commit,timestamp\n"


KEYS = ("gaussian", "gaussian_neuron", "mean")


def _results_md():
    """experiments/results_md.py as a module (experiments/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("results_md_under_test", ROOT / "experiments" / "results_md.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pert(skill: float, random: float) -> dict:
    return {"fractions": [0.0, 0.2], "skill": [0.8, skill], "random": [0.8, random],
            "random_draws": [[0.8, 0.8, 0.8], [random - 0.01, random, random + 0.01]], "clean_accuracy": 0.8,
            "test_rows": 800}


def _seed(acc: float = 0.8) -> dict:
    return {"seed": 0, "test_accuracy": acc, "best_predictivity": 0.9, "layer_profile": [0.5, 0.5],
            "curve": {"rows_seen": [16, 32], "dev_accuracy": [0.7, 0.8], "plateau_rows": 32, "total_rows": 32},
            "perturbation": {k: _pert(0.7, 0.75) for k in KEYS}}


def _pool(diff: float, ci: tuple[float, float]) -> dict:
    return {"fractions": [0.0, 0.2], "difference": [0.0, diff], "ci": [[0.0, 0.0], list(ci)],
            "skill": [0.8, 0.75 + diff], "random": [0.8, 0.75]}


def _study(tmp_path: Path, pools: dict, acc: dict | None = None) -> Path:
    """A result folder with a results.json: one seed per task (verbalizer head) whose pooled test at 20% is
    ``pools[task]`` = (difference, ci) for every perturbation; ``acc`` overrides test accuracies."""
    out = tmp_path / "study"
    out.mkdir()
    names = list(pools)
    acc = acc or {}
    results = {"model": "minilm", "quick": False, "heads": ["verbalizer"], "fractions": [0.0, 0.2],
               "tasks": {"verbalizer": {t: [_seed(acc.get(t, 0.8))] for t in names}},
               "seeds": {"verbalizer": {t: [0] for t in names}},
               "pooled": {"verbalizer": {t: {k: _pool(*pools[t]) for k in KEYS} for t in names}},
               "perturbations": {k: {} for k in KEYS},
               "settings": {"prompt_len": 4, "epochs": 1, "lr": 0.01, "max_length": 32, "max_train": 32,
                            "max_dev": 16, "max_test": 16, "eval_every": 1, "draws": 3},
               "correlation": {"verbalizer": {"tasks": names, "whole_model": [[1.0] * len(names)] * len(names),
                                              "per_layer": []}},
               "majority": {t: 0.5 for t in names}, "threads": 2, "controls": {}, "bitfit": {}}
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


def _cell_20(text: str, task: str, section: str = "mean ablation") -> str:
    part = text[text.index(f"## Perturbation: {section}"):]
    line = next(x for x in part.splitlines() if x.startswith(f"| {task}"))
    return line.split(" | ")[3]


def test_verdicts_follow_the_paired_interval_and_leave_out_tasks_at_chance(tmp_path):
    pools = {"more": (-0.10, (-0.15, -0.05)), "tie": (-0.10, (-0.2, 0.01)), "less": (0.05, (0.01, 0.09)),
             "flat": (-0.3, (-0.4, -0.2))}
    text = _write(_study(tmp_path, pools, acc={"flat": 0.52}), tmp_path / "no-benchmarks")
    assert _cell_20(text, "more") == "**0.650 / 0.750 (-10.0 [-15.0, -5.0])**"
    assert _cell_20(text, "tie") == "0.650 / 0.750 (-10.0 [-20.0, +1.0])"  # the interval holds 0
    assert _cell_20(text, "less") == "_0.800 / 0.750 (+5.0 [+1.0, +9.0])_"
    assert _cell_20(text, "flat (chance)").startswith("**")  # marked, but not counted in the summary
    assert ("mean ablation: more costs more at 20%; tie no significant difference; less costs less at 20%."
            in text)
    assert "read 9 intervals at 95%; about 0.5 of them" in text  # 3 tasks left chance x 3 perturbations x 1 q
    assert "At chance, not counted: flat." in text
    assert "| more | verbalizer | 1 | 0.800 | 0.500 | 0.900 | 32 | 32 |" in text
    assert "0.740-0.760 |" in text  # the spread of the random draws
    assert "Measured speed-up" not in text  # no benchmark CSV: no speed table
    assert "from the first study's runs" in text  # pruning.json without a head: the old applications


def test_a_task_whose_runs_stayed_at_chance_is_listed_not_perturbed(tmp_path):
    """run_study.py scores a run that stays at chance but does not perturb it: its record has no perturbation and
    its task no pooled test; RESULTS.md lists it as not perturbed and leaves it out of the verdicts."""
    out = _study(tmp_path, {"sst2": (-0.1, (-0.15, -0.05)), "rte": (0.0, (-0.1, 0.1))}, acc={"rte": 0.5})
    results = json.loads((out / "results.json").read_text())
    results["tasks"]["verbalizer"]["rte"][0]["perturbation"] = {}
    del results["pooled"]["verbalizer"]["rte"]
    (out / "results.json").write_text(json.dumps(results))
    text = _write(out, tmp_path / "no-benchmarks")
    assert "| rte (chance) | verbalizer | - | not perturbed | - |" in text
    assert "mean ablation: sst2 costs more at 20%." in text and "At chance, not counted: rte." in text
    assert "read 3 intervals at 95%" in text


def test_the_matched_control_names_the_massive_neurons(tmp_path):
    out = _study(tmp_path, {"sst2": (-0.1, (-0.15, -0.05)), "imdb": (0.0, (-0.1, 0.1))})
    results = json.loads((out / "results.json").read_text())
    results["control"] = "matched"
    for task, massive, holds in (("sst2", [[3], [1, 7]], [[0, 0], [0, 1]]), ("imdb", [[3], [7]], [[0, 0], [0, 0]])):
        for pert in results["tasks"]["verbalizer"][task][0]["perturbation"].values():
            pert.update(massive_neurons=massive, skill_massive=holds, outlier_factor=16.0)
    (out / "results.json").write_text(json.dumps(results))
    text = _write(out, tmp_path / "no-benchmarks")
    assert ("In the 2 perturbed runs a few neurons have an RMS activation over 16x their layer's median: layer 0 #3, "
            "layer 1 #1 (1 of 2 runs), layer 1 #7." in text)
    assert "holds at least one in 1 of 2 runs" in text
    assert "**matched for massive-activation neurons**" in text


def test_speed_table_reads_the_newest_rows_of_the_benchmark_csv(tmp_path):
    out = _study(tmp_path, {"sst2": (-0.1, (-0.15, -0.05))})
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


def test_cached_only_rewrites_the_committed_results_md_byte_for_byte(tmp_path):
    """The documented command, from a tree with the committed JSON and CSV files but no run folders (as a fresh
    clone has), gives exactly the committed RESULTS.md."""
    import shutil

    for part in ("experiments", "benchmarks/results"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "experiments/run_study.py", "--cached-only", "--work",
                        str(tmp_path / "no-runs")], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "RESULTS.md").read_bytes() == (ROOT / "RESULTS.md").read_bytes()


def test_pruning_criteria_section_from_its_json(tmp_path):
    """experiments/run_pruning.py's aggregate, when it sits in OUT/pruning_criteria/, becomes a section: its table
    (every criterion, the skill row's verdicts) and the plot, nothing typed in by hand; the study's tasks that
    learn and have no comparison yet are named."""
    pool = (-0.1, (-0.15, -0.05))
    out = _study(tmp_path, {"sst2": pool, "imdb": pool, "ag_news": pool, "flat": pool}, acc={"flat": 0.52})
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
                                  "vs": {"skill": {f"0.1|{s}": {"flap": diff, "strongest": "flap"}
                                                   for s in ("pruned", "retuned")}}}}}
    results["tasks"]["ag_news/pair:0,1"] = results["tasks"]["sst2"]  # a sub-task's label: compared, not owed
    (out / "pruning_criteria" / "pruning_criteria.json").write_text(json.dumps(results))
    text = _write(out, tmp_path / "no-benchmarks")
    assert "## Skill neurons against the structured-pruning criteria" in text
    assert "skill neurons win 4, tie 0 and lose 0 of 4 comparisons" in text
    assert "| skill | 0.810 ± 0.020 (win vs flap) | 0.810 ± 0.020 (win vs flap) |" in text
    assert "pruning_criteria/pruning_criteria.png" in text
    assert "on their run folders): imdb.\n" in text  # flat stayed at chance: not owed a comparison
    assert "cannot rank the criteria): flat.\n" in text  # but stated as such


def test_a_preview_elsewhere_never_replaces_the_committed_results_md(tmp_path):
    """RESULTS.md goes to the repository root only for the committed result folder; any other --out (a preview,
    a --quick study) gets its own OUT/RESULTS.md."""
    mod = _results_md()
    assert mod.results_md_path(ROOT / "experiments" / "study", False) == mod.ROOT / "RESULTS.md"
    assert mod.results_md_path(ROOT / "experiments" / "study", True) == ROOT / "experiments" / "study" / "RESULTS.md"
    assert mod.results_md_path(tmp_path, False) == tmp_path / "RESULTS.md"
    out = _study(tmp_path, {"sst2": (-0.1, (-0.15, -0.05))})
    before = (ROOT / "RESULTS.md").read_bytes()
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "results_md.py"), "--out", str(out),
                        "--benchmarks", str(tmp_path / "none")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "RESULTS.md").is_file() and (ROOT / "RESULTS.md").read_bytes() == before


def test_the_first_studys_chance_tasks_are_stated_at_the_new_budget():
    mod = _results_md()
    results = {"study_tasks": {"learning": ["sst2"], "chance": ["rte", "qnli", "cola"]},
               "settings": {"max_train": 4000, "epochs": 3}, "majority": {"rte": 0.53, "qnli": 0.5, "sst2": 0.5},
               "tasks": {"verbalizer": {"sst2": [{"test_accuracy": 0.8}], "rte": [{"test_accuracy": 0.55}],
                                        "qnli": [{"test_accuracy": 0.6}, {"test_accuracy": 0.62}]},
                         "linear": {"sst2": [{"test_accuracy": 0.8}]}}}
    lines = mod.chance_task_lines(results)
    assert len(lines) == 1, lines  # the linear head ran none of them
    assert "(verbalizer head, 4000 training rows x 3 epochs" in lines[0]
    assert "leave chance: qnli 0.610 vs 0.500, 2 seeds." in lines[0]
    assert "Still at chance (within 3 points of the majority rate, or below): rte 0.550 vs 0.530, 1 seed." in lines[0]
    assert "cola" not in lines[0] and "sst2" not in lines[0]
    results["tasks"]["verbalizer"]["qnli"] = [{"test_accuracy": 0.5}]
    assert "none leaves chance" in mod.chance_task_lines(results)[0]


def test_the_header_names_the_threads_the_runs_were_tuned_with():
    threads_text = _results_md().threads_text

    assert threads_text(2) == "2 torch threads per run"  # older results.json: one number
    assert threads_text([1]) == "1 torch thread per run"
    assert threads_text([1, 2]) == "1 or 2 torch threads per run"
