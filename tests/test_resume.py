"""Interrupt and resume: a killed scoring job continues from its checkpoint with bit-identical results."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from skillkern.checkpoint import Checkpoint
from skillkern.cli import main
from skillkern.stats import StatsFileError

from conftest import requires_data
from tiny_models import save_minilm_bert

ARGS = ["score", "--task", "sst2", "--max-baseline", "96", "--max-eval", "64", "--batch-size", "8",
        "--max-length", "48", "--no-progress", "--checkpoint-every", "1"]


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def _assert_same_file(a, b):
    meta_a, ta = _read(a)
    meta_b, tb = _read(b)
    assert meta_a == meta_b
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"{key} differs after resume"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert main(ARGS + ["--out", str(out)]) == 0
    assert not (out / "checkpoint.safetensors").exists(), "the checkpoint is removed once the result is written"
    return out / "stats.safetensors"


class _Crash(Exception):
    pass


@contextlib.contextmanager
def crash_after_saves(monkeypatch, n: int):
    """The block must raise _Crash right after the n-th checkpoint save (the save itself completes)."""
    saves = {"n": 0}
    real_save = Checkpoint.save

    def crashing_save(self, *a, **k):
        real_save(self, *a, **k)
        saves["n"] += 1
        if saves["n"] == n:
            raise _Crash()

    monkeypatch.setattr(Checkpoint, "save", crashing_save)
    with pytest.raises(_Crash):
        yield
    monkeypatch.setattr(Checkpoint, "save", real_save)


@requires_data
@pytest.mark.parametrize("crash_after", [3, 15])  # saves: 12 baseline chunks, 1 after the reduction, 8 eval
def test_exception_mid_run_then_resume(tmp_path, uninterrupted, monkeypatch, crash_after):
    with crash_after_saves(monkeypatch, crash_after):
        main(ARGS + ["--out", str(tmp_path)])
    meta, _ = _read(tmp_path / "checkpoint.safetensors")
    assert meta["phase"] == ("baseline" if crash_after < 13 else "eval")
    assert main(ARGS + ["--resume", "--out", str(tmp_path)]) == 0
    _assert_same_file(tmp_path / "stats.safetensors", uninterrupted)


@requires_data
@pytest.mark.parametrize("phase", ["baseline", "eval"])
def test_sigkill_then_resume(tmp_path, uninterrupted, phase):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "skillkern"] + ARGS + ["--out", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    ckpt = tmp_path / "checkpoint.safetensors"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists():
                try:
                    meta, _ = _read(ckpt)
                except Exception:  # replaced while we opened it: try again
                    continue
                if meta["phase"] == phase and int(meta["position"]) >= 16:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.005)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the job was not killed mid-run: {proc.stderr.read()[-2000:]}"
    assert not (tmp_path / "stats.safetensors").exists()
    assert main(ARGS + ["--resume", "--out", str(tmp_path)]) == 0
    _assert_same_file(tmp_path / "stats.safetensors", uninterrupted)


@requires_data
def test_resume_refuses_another_job(tmp_path, monkeypatch):
    real_save = Checkpoint.save

    def crashing_save(self, *a, **k):
        real_save(self, *a, **k)
        raise _Crash()

    monkeypatch.setattr(Checkpoint, "save", crashing_save)
    with pytest.raises(_Crash):
        main(ARGS + ["--out", str(tmp_path)])
    monkeypatch.setattr(Checkpoint, "save", real_save)
    other = [a if a != "96" else "80" for a in ARGS]  # another --max-baseline: another job
    with pytest.raises(StatsFileError, match="another job"):
        main(["-v"] + other + ["--resume", "--out", str(tmp_path)])  # -v: raise instead of exit code 2


@requires_data
def test_resume_reads_a_checkpoint_of_0_1_0(tmp_path, uninterrupted, monkeypatch):
    """A checkpoint written before checkpoints had a format_version (skillkern 0.1.0) holds the same keys in the
    same layouts: resuming from it gives the uninterrupted result."""
    from safetensors.torch import save_file

    saves = {"n": 0}
    real_save = Checkpoint.save

    def crashing_save(self, *a, **k):
        real_save(self, *a, **k)
        saves["n"] += 1
        if saves["n"] == 15:  # in the evaluation pass: the checkpoint holds the thresholds
            raise _Crash()

    monkeypatch.setattr(Checkpoint, "save", crashing_save)
    with pytest.raises(_Crash):
        main(ARGS + ["--out", str(tmp_path)])
    monkeypatch.setattr(Checkpoint, "save", real_save)
    ckpt = tmp_path / "checkpoint.safetensors"
    meta, tensors = _read(ckpt)
    assert meta.pop("format_version") == "2" and "threshold" in tensors
    save_file(tensors, str(ckpt), metadata=meta)
    assert main(ARGS + ["--resume", "--out", str(tmp_path)]) == 0
    _assert_same_file(tmp_path / "stats.safetensors", uninterrupted)


def test_resume_refuses_a_newer_checkpoint(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "checkpoint.safetensors"
    save_file({"sums": torch.zeros(1)}, str(path), metadata={
        "format": "skillkern-checkpoint", "format_version": "3", "phase": "baseline", "position": "0",
        "fingerprint": "{}", "skipped": "{}"})
    with pytest.raises(StatsFileError, match="format version 3.*delete it or run without --resume"):
        Checkpoint(path, {}, resume=True).check()


# --------------------------------------------------------------------------------- score --run: the same mechanism
@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    """A run on a tiny random BERT (the MiniLM tokenizer), its prompt untrained (0 epochs): quick to score."""
    from skillkern.data import load_task
    from skillkern.runs import tune_run
    from skillkern.tune import TuneSettings

    root = tmp_path_factory.mktemp("tuned")
    save_minilm_bert(root / "model")
    settings = TuneSettings(prompt_len=4, epochs=0, max_length=32, max_train=48, max_dev=40, max_test=8)
    tune_run(str(root / "model"), load_task("sst2"), settings, root / "run", progress=False)
    return root / "run"


RUN_ARGS = ["score", "--batch-size", "8", "--no-progress", "--checkpoint-every", "1"]


@requires_data
@pytest.mark.parametrize("crash_after", [3, 9])  # saves: 6 baseline chunks, 1 after the reduction, 5 eval
def test_score_run_resumes_bit_identical(tuned_run, tmp_path, monkeypatch, crash_after):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(RUN_ARGS + ["--run", str(tuned_run), "--out", str(whole)]) == 0
    with crash_after_saves(monkeypatch, crash_after):
        main(RUN_ARGS + ["--run", str(tuned_run), "--out", str(cut)])
    assert [p.name for p in cut.iterdir()] == ["checkpoint.safetensors"]
    meta, _ = _read(cut / "checkpoint.safetensors")
    assert meta["phase"] == ("baseline" if crash_after < 7 else "eval")
    argv = RUN_ARGS + ["--run", str(tuned_run), "--out", str(cut)]
    with pytest.raises(StatsFileError, match="another job"):  # other rows: another job
        main(["-v"] + argv + ["--resume", "--max-eval", "32"])
    assert main(argv + ["--resume"]) == 0
    _assert_same_file(cut / "stats.safetensors", whole / "stats.safetensors")
    assert sorted(p.name for p in cut.iterdir()) == ["predictivity.png", "stats.safetensors", "summary.json"]
