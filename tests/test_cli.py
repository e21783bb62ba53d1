"""The `skillkern score` command end to end on the embedded model and real data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from skillkern.cli import main

from conftest import requires_data


@requires_data
def test_score_writes_documented_files(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["score", "--model", "minilm", "--task", "sst2", "--max-baseline", "64", "--max-eval", "48",
               "--batch-size", "16", "--max-length", "64", "--no-progress", "--top", "5", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "rank" in printed and "wrote" in printed
    with safe_open(str(out / "stats.safetensors"), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    L, S, D, C = 6, 1, 1536, 2
    expected = {"threshold": (torch.float64, (L, S, D)), "above": (torch.int64, (L, S, C, D)),
                "eval_class_count": (torch.int64, (C,)), "baseline_class_count": (torch.int64, (C,)),
                "predictivity": (torch.float32, (L, D)), "sums": (torch.float64, (L, S, C, D)),
                "sign": (torch.int8, (L, D)), "accuracy": (torch.float32, (L, S, C, D))}
    assert set(t) == set(expected)
    for key, (dtype, shape) in expected.items():
        assert t[key].dtype == dtype and tuple(t[key].shape) == shape, key
    assert int(t["baseline_class_count"].sum()) == 64 and int(t["eval_class_count"].sum()) == 48
    assert int(t["above"].sum(2).max()) <= 48
    assert float(t["predictivity"].min()) >= 0.5
    settings = json.loads(meta["settings"])
    assert meta["format"] == "skillkern-stats" and meta["format_version"] == "2"
    assert settings["task"] == "sst2" and settings["baseline_rows"] == 64 and settings["settings"]["pool"] == "cls"
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["top_neurons"]) == 5 and summary["layers"] == 6
    assert (out / "predictivity.png").stat().st_size > 1000


@requires_data
def test_score_multiclass_subtask(tmp_path):
    out = tmp_path / "tweet"
    rc = main(["score", "--task", "tweet", "--subtask", "pn", "--pool", "mean", "--max-baseline", "40",
               "--max-eval", "30", "--max-length", "48", "--no-progress", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label_names"] == ["negative", "positive"] and summary["subtask"] == "pn"


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    rc = main(["score", "--task", "sst2", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "SKILLKERN_DATA" in err


def test_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "skillkern", "score", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--max-baseline" in res.stdout


@requires_data
def test_score_device_map_is_passed_to_load_model(tmp_path, monkeypatch, capsys):
    import skillkern.models as models

    real_load, seen = models.load_model, {}

    def recording_load(name, **kwargs):
        seen.update(kwargs)
        return real_load(name)  # one CPU here; the GPU split is tested in test_scoring.py

    monkeypatch.setattr(models, "load_model", recording_load)
    out = tmp_path / "mapped"
    common = ["score", "--task", "sst2", "--max-baseline", "16", "--max-eval", "16", "--max-length", "32",
              "--no-progress", "--out", str(out)]
    assert main(common + ["--device-map", "auto"]) == 0
    assert seen == {"device_map": "auto"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layer_devices"] == ["cpu"] and summary["neuron_path"] == "hooks"
    assert main(common + ["--device-map", "auto", "--device", "cpu", "--overwrite"]) == 2
    assert "give --device or --device-map, not both" in capsys.readouterr().err


# --------------------------------------------------------------------- score: every option reaches the workflow
#: a value other than the default for every option of `score` that applies to both forms, and (keyword, value)
#: the package function must receive ({tmp}: a folder of the test)
SHARED_OPTIONS = {
    "data": (["--data", "{tmp}"], "data", "{tmp}"),
    "subtask": (["--subtask", "pn"], "subtask", "pn"),
    "baseline_split": (["--baseline-split", "dev"], "baseline_split", "dev"),
    "eval_split": (["--eval-split", "test"], "eval_split", "test"),
    "max_baseline": (["--max-baseline", "7"], "max_baseline", 7),
    "max_eval": (["--max-eval", "9"], "max_eval", 9),
    "batch_size": (["--batch-size", "3"], "batch_size", 3),
    "pad_multiple": (["--pad-multiple", "8"], "pad_multiple", 8),
    "which": (["--which", "gate"], "which", "gate"),
    "backend": (["--backend", "torch"], "backend", "torch"),
    "device": (["--device", "cpu"], "device", torch.device("cpu")),
    "top": (["--top", "4"], "top", 4),
    "no_progress": (["--no-progress"], "progress", False),
    "resume": (["--resume"], "resume", True),
    "checkpoint_every": (["--checkpoint-every", "2"], "checkpoint_every", 2),
    "skip_nonfinite": (["--skip-nonfinite"], "nonfinite", "skip"),
    "out": (["--out", "{tmp}/o"], "out", "{tmp}/o"),
    "overwrite": (["--overwrite"], "overwrite", True),
}
#: the options of `score` that only a task (not a run) takes
TASK_ONLY_OPTIONS = {
    "model": (["--model", "some/model"], "model", "some/model"),
    "task": (["--task", "toy"], "task", "toy"),
    "pool": (["--pool", "mean"], "pool", "mean"),
    "max_length": (["--max-length", "64"], "max_length", 64),
    "seed": (["--seed", "3"], "seed", 3),
    "device_map": (["--device-map", "auto"], "device_map", "auto"),  # checked apart: not with --device
}


def _score_dests() -> set:
    from skillkern.cli import build_parser

    parser = build_parser().parse_args(["score"]).parser
    return {a.dest for a in parser._actions} - {"help", "verbose", "run"}


def _argv(options: dict, tmp) -> tuple[list, dict]:
    argv, want = [], {}
    for flags, key, value in options.values():
        argv += [f.format(tmp=tmp) for f in flags]
        want[key] = value.format(tmp=tmp) if isinstance(value, str) else value
    return argv, want


def _recorder(seen: dict):
    from skillkern.stats import NeuronStats

    summary = {"task": "toy", "baseline_rows": 1, "eval_rows": 1, "seconds": 0.0, "top_neurons": [],
               "layers": 1, "width": 2, "model": "m"}

    def record(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        return NeuronStats(1, 2, 2, 2), summary

    return record


def test_every_score_option_applies_to_a_task_or_is_refused_with_run():
    assert _score_dests() == set(SHARED_OPTIONS) | set(TASK_ONLY_OPTIONS), \
        "a new option of `score`: add it to SHARED_OPTIONS (and forward it with --run) or TASK_ONLY_OPTIONS"


def test_score_run_forwards_every_option_that_applies(tmp_path, monkeypatch, capsys):
    import skillkern.runs as runs

    seen: dict = {}
    monkeypatch.setattr(runs, "score_run", _recorder(seen))
    argv, want = _argv(SHARED_OPTIONS, tmp_path)
    assert main(["score", "--run", str(tmp_path / "run")] + argv) == 0, capsys.readouterr().err
    assert seen["args"] == (str(tmp_path / "run"),)
    assert {k: seen["kwargs"].get(k, "(not passed)") for k in want} == want
    assert set(seen["kwargs"]) == set(want), "score_run receives only the options that apply"
    assert "prompt slots of" in capsys.readouterr().out


def test_score_task_forwards_every_option(tmp_path, monkeypatch, capsys):
    import skillkern.scoring as scoring

    seen: dict = {}
    monkeypatch.setattr(scoring, "score_task", _recorder(seen))
    options = dict(SHARED_OPTIONS, **{k: v for k, v in TASK_ONLY_OPTIONS.items() if k != "device_map"})
    argv, want = _argv(options, tmp_path)
    assert main(["score"] + argv) == 0, capsys.readouterr().err
    model, task, out, settings = seen["args"]
    got = dict(seen["kwargs"], model=model, task=task, out=out, **settings.to_dict())
    assert {k: got.get(k, "(not passed)") for k in want} == want
    assert main(["score", "--task", "toy", "--out", str(tmp_path / "o"), "--device-map", "auto"]) == 0
    assert seen["kwargs"]["device_map"] == "auto" and seen["kwargs"]["device"] is None


@pytest.mark.parametrize("dest", sorted(TASK_ONLY_OPTIONS))
def test_score_run_refuses_what_the_run_fixes_even_at_its_default(dest, tmp_path, capsys):
    from skillkern.cli import build_parser

    flag = TASK_ONLY_OPTIONS[dest][0][0]
    default = build_parser().parse_args(["score"]).parser.get_default(dest)
    value = TASK_ONLY_OPTIONS[dest][0][1] if default is None else str(default)
    assert main(["score", "--run", str(tmp_path), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"skillkern score: error: {flag} does not apply with --run ("), err
