"""The `skillkern score` command end to end on the embedded model and real data."""

from __future__ import annotations

import json
import subprocess
import sys

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
    expected = {"baseline": (torch.float64, (L, S, D)), "above": (torch.int64, (L, S, D, C)),
                "eval_class_count": (torch.int64, (C,)), "baseline_class_count": (torch.int64, (C,)),
                "predictivity": (torch.float32, (L, D)), "sums": (torch.float64, (L, S, D, C)),
                "sign": (torch.int8, (L, D)), "accuracy": (torch.float32, (L, S, D, C))}
    for key, (dtype, shape) in expected.items():
        assert t[key].dtype == dtype and tuple(t[key].shape) == shape, key
    assert int(t["baseline_class_count"].sum()) == 64 and int(t["eval_class_count"].sum()) == 48
    assert int(t["above"].sum(-1).max()) <= 48
    assert float(t["predictivity"].min()) >= 0.5
    settings = json.loads(meta["settings"])
    assert meta["format"] == "skillkern-stats"
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
