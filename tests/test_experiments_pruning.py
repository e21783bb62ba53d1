"""experiments/run_pruning.py --quick on two tiny tuned runs (two seeds of a toy task): every cell written as its
own JSON and skipped on a second run, the aggregate with confidence intervals and paired verdicts, the table a
RESULTS.md writer prints, and the plot. Well under a minute on two CPU cores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tiny_models import save_minilm_bert

ROOT = Path(__file__).resolve().parents[1]
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def _script():
    spec = importlib.util.spec_from_file_location("run_pruning", ROOT / "experiments" / "run_pruning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from skillkern.data import load_task
    from skillkern.runs import score_run, tune_run
    from skillkern.tune import TuneSettings
    from test_cli_errors import _rows, _task

    w = tmp_path_factory.mktemp("pruning_runs")
    save_minilm_bert(w / "model")
    _task(w / "data", "toy", ["negative", "positive"], {"train": _rows(24, 0), "dev": _rows(8, 1),
                                                         "test": _rows(12, 2)})
    runs = []
    for seed in (0, 1):
        settings = TuneSettings(prompt_len=4, epochs=1, lr=1e-2, batch_size=8, max_length=16, seed=seed)
        tune_run(str(w / "model"), load_task(w / "data" / "toy"), settings, w / f"seed{seed}", progress=False)
        score_run(w / f"seed{seed}", progress=False)
        runs.append(w / f"seed{seed}")
    return runs


def test_quick_comparison_is_resumable_and_reported(two_runs, tmp_path, monkeypatch):
    script = _script()
    out = tmp_path / "out"
    assert script.main(["--quick", "--runs", *map(str, two_runs), "--out", str(out)]) == 0
    cells = sorted((out / "cells").rglob("*.json"))
    assert len(cells) == 2 * 6 * 2  # seeds x criteria (skill+massive included) x quick fractions
    cell = json.loads((out / "cells" / "toy" / "seed1" / "flap_0.1.json").read_text())
    assert cell["criterion"] == "flap" and cell["fill"] == "tokens" and cell["widths"] == [3, 3]
    assert 0 <= cell["test_accuracy_pruned_retuned"] <= 1 and cell["retune_epochs"] == 0.25
    assert not list((out / "work").rglob("prune.json")), "pruned models are deleted once their cell is written"
    assert sorted(p.name for p in (out / "work").rglob("*.safetensors")) == ["moments.safetensors"] * 2

    results = json.loads((out / "pruning_criteria.json").read_text())
    toy = results["tasks"]["toy"]
    assert toy["seeds"] == [0, 1] and results["fractions"] == [0.1, 0.5] and toy["majority"] == 0.5
    skill = toy["cells"]["skill|0.5|retuned"]
    assert skill["n"] == 2 and skill["ci95"] is not None and len(skill["per_seed"]) == 2
    for aware in ("skill", "skill+massive"):  # each task-aware criterion against each task-agnostic one
        vs = toy["vs"][aware]["0.1|pruned"]
        assert set(vs) == {"flap", "wanda", "magnitude", "random", "strongest"}
        assert vs["flap"]["verdict"] in ("win", "tie", "lose")
    assert json.loads((out / "cells" / "toy" / "seed0" / "skill+massive_0.5.json").read_text())["criterion"] == \
        "skill+massive"
    assert (out / "pruning_criteria.png").stat().st_size > 1000

    # the massive neurons each criterion kept, recomputed from the moments files: against the cells' own counts
    from skillkern.perturb import massive_neurons
    from skillkern.stats import NeuronMoments

    for seed in (0, 1):
        m = toy["massive"][str(seed)]
        moments, _ = NeuronMoments.load(out / "work" / "toy" / f"seed{seed}" / "moments.safetensors")
        want = massive_neurons(moments.l2_norm(), m["factor"])
        assert m["neurons"] == {str(layer): want[layer].tolist() for layer in cell["pruned_layers"]}
        assert set(m["kept"]) == {f"{c}|{q:g}" for c in results["criteria"] for q in results["fractions"]}
        total = sum(map(len, m["neurons"].values()))
        assert all(0 <= k <= total for k in m["kept"].values())

    # a planted massive neuron (its norm 100x the largest of layer 1): every moment criterion keeps it first,
    # skill and random exactly when their own selections hold it
    from skillkern.perturb import random_selection
    from skillkern.runs import run_predictivity, skill_selection

    moments, _ = NeuronMoments.load(out / "work" / "toy" / "seed0" / "moments.safetensors")
    j = int(moments.l2_norm()[1].argmax())
    moments.moments[1, :, 1, j] *= 1e4   # sum of squares: norm x 100
    moments.moments[1, :, 2, j] *= 1e2   # sum of |a|
    planted = tmp_path / "planted"
    (planted / "toy" / "seed0").mkdir(parents=True)
    moments.save(planted / "toy" / "seed0" / "moments.safetensors")
    seed0 = [json.loads(p.read_text()) for p in sorted((out / "cells" / "toy" / "seed0").glob("*.json"))]
    m = script.massive_kept(two_runs[0], planted, "toy", 0, seed0)
    assert j in m["neurons"]["1"]
    k = {q: next(c["kept_per_layer"] for c in seed0 if c["keep"] == q) for q in results["fractions"]}
    preds = run_predictivity(two_runs[0])
    for q in results["fractions"]:
        for criterion in ("flap", "wanda", "magnitude", "skill+massive"):
            assert m["kept"][f"{criterion}|{q:g}"] >= 1
        skill = skill_selection(preds, q)
        assert m["kept"][f"skill|{q:g}"] == sum(int(i in skill[layer][: k[q]].tolist()) for layer in (0, 1)
                                                for i in m["neurons"][str(layer)])
        drawn = random_selection([k[q], k[q]], moments.width, 0)
        assert m["kept"][f"random|{q:g}"] == sum(int(i in drawn[layer].tolist()) for layer in (0, 1)
                                                 for i in m["neurons"][str(layer)])

    lines = script.criteria_table(results)
    text = "\n".join(lines)
    assert "skill neurons win" in lines[0] or "no verdict" in lines[0].lower()
    assert "Massive-activation neurons in the pruned layers" in text
    assert "| skill |" in text and "| random |" in text and "**toy**" in text

    # a second run computes nothing: every cell is on disk
    monkeypatch.setattr(script, "prune_run", lambda *a, **k: pytest.fail("a finished cell was computed again"))
    assert script.main(["--quick", "--runs", *map(str, two_runs), "--out", str(out)]) == 0


def test_verdicts_and_intervals():
    script = _script()
    assert script.mean_ci([0.5])["ci95"] is None
    ci = script.mean_ci([0.6, 0.8])
    # t(1) * sd / sqrt(2), sd = 0.1 * sqrt(2)
    assert ci["mean"] == pytest.approx(0.7) and ci["ci95"] == pytest.approx(12.706 * 0.1)
    assert script.verdict({"mean": 0.1, "ci95": 0.05}) == "win"
    assert script.verdict({"mean": -0.1, "ci95": 0.05}) == "lose"
    assert script.verdict({"mean": 0.01, "ci95": 0.05}) == "tie"
    assert script.verdict({"mean": 0.1, "ci95": None}).startswith("n/a")


def test_massive_table_counts_per_seed():
    script = _script()
    massive = {str(s): {"factor": 16.0, "neurons": {"2": [218, 1004], "3": [358], "4": []},
                        "kept": {"skill|0.1": s, "flap|0.1": 3}} for s in (0, 1)}
    text = "\n".join(script.massive_table(massive, ["skill", "flap", "wanda"], [0.1]))
    assert "layer 2 #218, #1004; layer 3 #358." in text and "per seed (0, 1)" in text
    assert "| skill | 0/3, 1/3 |" in text and "| flap | 3/3, 3/3 |" in text and "| wanda | - |" in text
    massive["1"]["neurons"] = {"2": [5], "3": [], "4": []}
    assert "seed 0: layer 2 #218, #1004; layer 3 #358; seed 1: layer 2 #5" in "\n".join(
        script.massive_table(massive, ["skill"], [0.1]))
    assert script.massive_table(None, ["skill"], [0.1]) == []


def test_massive_share_averages_the_tasks_that_learn():
    script = _script()
    m = {"factor": 16.0, "neurons": {"2": [1, 2], "3": [3, 4]}, "kept": {"skill|0.1": 1, "skill|0.5": 2, "flap|0.1": 4,
                                                                       "flap|0.5": 4}}
    none = {"factor": 16.0, "neurons": {"2": []}, "kept": {"skill|0.1": 0, "flap|0.1": 0}}
    results = {"criteria": ["skill", "flap", "random"],
               "tasks": {"a": {"learns": True, "massive": {"0": m, "1": none}},
                         "b": {"learns": False, "massive": {"0": dict(m, kept={"skill|0.1": 4, "flap|0.1": 0})}},
                         "c": {"learns": True}}}
    assert script.massive_share(results) == {"skill": pytest.approx(0.375), "flap": 1.0}
    assert script.massive_share({"criteria": ["skill"], "tasks": {"c": {"learns": True}}}) == {}


def test_summary_says_task_by_task_where_skill_neurons_win_tie_or_lose():
    script = _script()
    offsets = {"a": 0.2, "b": -0.2, "c": 0.0, "z": 0.2}  # skill minus random, per task; z stays at chance
    cells = []
    for task, d in offsets.items():
        for seed in (0, 1, 2):
            noise = 0.01 * seed if task != "c" else 0.05 * (seed - 1)
            original = 0.5 if task == "z" else 0.8
            for criterion, acc in (("skill", 0.6 + d + noise), ("random", 0.6 + (noise if task != "c" else 0.0))):
                cells.append({"task": task, "run_seed": seed, "criterion": criterion, "keep": 0.1,
                              "test_accuracy_original": original, "test_accuracy_pruned": acc,
                              "test_accuracy_pruned_retuned": acc + 0.05})
    results = script.aggregate(cells, {t: 0.5 for t in offsets}, ["skill", "random"], [0.1])
    results.update(fill="tokens", layers="top:0.75", retune_epochs=0.25)
    assert [t for t, e in results["tasks"].items() if not e["learns"]] == ["z"]
    summary = script.criteria_table(results)[0]
    assert "skill neurons win 2, tie 2 and lose 2 of 6 comparisons" in summary
    assert "Task by task (win/tie/lose): skill neurons a 2/0/0, b 0/0/2, c 0/2/0." in summary
    assert "With one seed" not in summary
    cells.append(dict(cells[0], task="d", run_seed=0))  # a task that learns, one seed: named, no verdict
    cells.append(dict(cells[1], task="d", run_seed=0))
    results = script.aggregate(cells, {t: 0.5 for t in (*offsets, "d")}, ["skill", "random"], [0.1])
    results.update(fill="tokens", layers="top:0.75", retune_epochs=0.25)
    summary = script.criteria_table(results)[0]
    assert "With one seed (point estimates only, no verdict): d." in summary and "of 6 comparisons" in summary
    one = script.aggregate([c for c in cells if c["task"] == "a"], {"a": 0.5}, ["skill", "random"], [0.1])
    one.update(fill="tokens", layers="top:0.75", retune_epochs=0.25)
    assert "Task by task" not in script.criteria_table(one)[0]  # one task: the overall tally says it all


def test_a_three_class_run_is_compared_at_the_same_widths(tmp_path):
    """A run scored on its pn/neu sub-tasks keeps twice int(keep * width) (the union rule): the comparison halves
    its --keep, so that 10% means about 10% of each pruned layer on every task."""
    from skillkern.prune import _kept
    from skillkern.runs import scores_path

    script = _script()
    run = tmp_path / "run"
    for name in (None, "pn", "neu"):
        if name == "pn":
            assert script.prune_keep(run, 0.1) == 0.1  # task scores only: as given
        path = scores_path(run, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    for q in script.FRACTIONS:
        keep = script.prune_keep(run, q)
        assert keep == q / 2
        kept = _kept("all", keep, 6, 1536, {"pn", "neu"})[1]
        assert abs(kept - int(q * 1536)) <= 1, (q, kept)
