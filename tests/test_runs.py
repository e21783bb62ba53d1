"""skillkern.runs: the run folder's layout, run.json and the prompt file, a run's scores, selection and prompt
thresholds.

No model is loaded here: the run folders are written with :func:`skillkern.runs.write_run` and synthetic
statistics. Tuning, scoring and perturbing real runs are tested in test_prompt.py, test_cli*.py, test_resume.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from skillkern import runs
from skillkern.data import Example, TaskData
from skillkern.files import FileFormatError
from skillkern.stats import NeuronStats, select_multiclass, select_per_layer
from skillkern.tune import TuneSettings

L, S, D = 3, 4, 20


def _info(**overrides) -> dict:
    info = {"kind": runs.RUN_KIND, "model": "minilm", "task": "toy", "subtask": None, "head": "linear",
            "prompt": "tuned", "settings": TuneSettings(prompt_len=S, max_train=5, max_dev=3).to_dict()}
    info.update(overrides)
    return info


def _stats(seed: int) -> NeuronStats:
    """Scored statistics of L layers x S slots x D neurons on a two-class task (random rows)."""
    g = torch.Generator().manual_seed(seed)
    stats = NeuronStats(L, S, D, 2)
    slot, label = torch.arange(S).repeat(6), torch.arange(2).repeat_interleave(3 * S)
    for phase in range(2):
        stats.count_rows(label[::S])
        for layer in range(L):
            stats.add_rows(layer, torch.randn(6 * S, D, generator=g), slot, label, backend="torch")
        if phase == 0:
            stats.finalize_thresholds()
    return stats


def test_layout():
    run = Path("r")
    assert runs.run_file(run) == run / "run.json" and runs.prompt_file(run) == run / "prompt.safetensors"
    assert runs.tune_checkpoint(run) == run / "tune_checkpoint.safetensors"
    assert runs.scores_dir(run) == run / "scores" / "task"
    assert runs.scores_dir(run, "pair:0,1") == run / "scores" / "pair_0_1"
    assert runs.scores_path(run, "pn") == run / "scores" / "pn" / "stats.safetensors"
    assert runs.default_perturb_out(run, "zero") == run / "perturb_zero.json"
    assert runs.default_perturb_out(run, "mean", "x/other") == run / "perturb_mean_from_other.json"


def test_write_then_read_a_run(tmp_path):
    state = {"prompt": torch.randn(S - 1, 8), "head.weight": torch.randn(2, 8)}
    runs.write_run(tmp_path, _info(), state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompt.safetensors", "run.json"]
    assert runs.read_run(tmp_path) == json.loads((tmp_path / "run.json").read_text())
    back = runs.read_prompt(tmp_path)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "run.json").unlink(), r"--neurons-from .* is not a run folder \(no run.json\)"),
    (lambda d: (d / "run.json").write_text('{"kind": "skillkern-run", '), "not valid JSON"),
    (lambda d: (d / "run.json").write_text(json.dumps(_info(kind="other"))), "not a skillkern run description"),
    (lambda d: (d / "run.json").write_text(json.dumps({k: v for k, v in _info().items() if k != "head"})),
     "lacks 'head'"),
    (lambda d: (d / "run.json").write_text(json.dumps(_info(settings={"epochs": -1}))), "settings are invalid"),
])
def test_read_run_names_the_problem(tmp_path, change, message):
    runs.write_run(tmp_path, _info(), {"prompt": torch.zeros(1)})
    change(tmp_path)
    with pytest.raises((FileNotFoundError, FileFormatError), match=message):
        runs.read_run(tmp_path, "--neurons-from")
    with pytest.raises(FileNotFoundError, match="--run .*nope is not a run folder"):
        runs.read_run(tmp_path / "nope")


def test_run_splits_are_the_first_rows_of_each_split():
    rows = {name: [Example(f"{name} {i}", i % 2) for i in range(n)] for name, n in (("train", 9), ("dev", 4),
                                                                                   ("test", 6))}
    task = TaskData("toy", ["neg", "pos"], False, rows, "nowhere")
    train, dev, test = runs.run_splits(task, TuneSettings(max_train=5, max_dev=3))
    assert (train, dev, test) == (rows["train"][:5], rows["dev"][:3], rows["test"])


def test_a_runs_scores_selection_and_prompt_thresholds(tmp_path):
    with pytest.raises(FileNotFoundError, match="has not been scored"):
        runs.run_predictivity(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no scores"):
        runs.prompt_thresholds(tmp_path)
    pn, neu = _stats(1), _stats(2)
    for name, stats in (("pn", pn), ("neu", neu)):
        runs.scores_path(tmp_path, name).parent.mkdir(parents=True)
        stats.save(runs.scores_path(tmp_path, name))
    preds = runs.run_predictivity(tmp_path)
    assert set(preds) == {"pn", "neu"} and torch.equal(preds["pn"], pn.predictivity())
    want = select_multiclass(pn.predictivity(), neu.predictivity(), 0.2)
    assert all(torch.equal(a, b) for a, b in zip(runs.skill_selection(preds, 0.2), want))
    torch.testing.assert_close(runs.prompt_thresholds(tmp_path), pn.threshold.mean(dim=1), rtol=0, atol=0)

    task = _stats(3)  # a binary task's own scores come first
    runs.scores_path(tmp_path).parent.mkdir(parents=True)
    task.save(runs.scores_path(tmp_path))
    assert runs.prompt_thresholds(tmp_path).shape == (L, D)
    torch.testing.assert_close(runs.prompt_thresholds(tmp_path), task.threshold.mean(dim=1), rtol=0, atol=0)
    only_task = {"task": runs.run_predictivity(tmp_path)["task"]}
    assert all(torch.equal(a, b) for a, b in zip(runs.skill_selection(only_task, 0.1),
                                                 select_per_layer(task.predictivity(), 0.1)))
