"""Tests of skillkern.data: the real task folders (skipped without them) and synthetic bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from skillkern import data as D
from skillkern.data import Example, binary_subtask, list_tasks, load_task, subtasks_for

DATA_DIR = Path(os.environ.get("SKILLKERN_DATA") or "/work/shared/data")
HAVE_DATA = (DATA_DIR / "sst2" / "task.json").is_file()
requires_data = pytest.mark.skipif(
    not HAVE_DATA, reason=f"task data not found at {DATA_DIR}: set SKILLKERN_DATA to the shared data folder"
)


@pytest.fixture(autouse=True)
def _no_hub_env(monkeypatch):
    # Keep the hub fallback deterministic: never reach the network from a test.
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # "import datasets" raises ImportError


@pytest.fixture(scope="module")
def sst2():
    return load_task("sst2", DATA_DIR)


def _raw_rows(path: Path) -> list[Example]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows.append(Example(r["text"], r["label"], r.get("text_pair")))
    return rows


def _is_subsequence(sub: list, full: list) -> bool:
    j = 0
    for x in full:
        if j < len(sub) and sub[j] == x:
            j += 1
    return j == len(sub)


# ------------------------------------------------------------------------------------------------ real data


@requires_data
def test_sst2_dev_is_20_percent_of_train(sst2):
    n = sst2.info["files"]["train"]["rows"]
    assert n == 67349
    assert len(sst2.split("dev")) == int(0.2 * n) == 13469
    assert len(sst2.split("train")) + len(sst2.split("dev")) == n
    assert len(sst2.split("test")) == 872
    assert list(sst2.splits) == ["train", "dev", "test"]
    assert sst2.num_classes == 2 and not sst2.pair
    dev = sst2.info["dev_split"]
    assert dev["method"] == "random split of train" and dev["seed"] == 0 and dev["dev"] == 13469
    json.dumps(sst2.info)  # provenance is JSON-serialisable


@requires_data
def test_sst2_split_is_a_disjoint_partition_by_index(sst2):
    raw = _raw_rows(DATA_DIR / "sst2" / "train.jsonl")
    tr, dv = D.dev_split_indices(len(raw), seed=0, dev_fraction=0.2)
    assert set(tr.tolist()).isdisjoint(dv.tolist())
    assert sorted(tr.tolist() + dv.tolist()) == list(range(len(raw)))
    # The loaded splits are exactly those rows, in file order.
    assert sst2.split("train") == [raw[i] for i in tr]
    assert sst2.split("dev") == [raw[i] for i in dv]


@requires_data
def test_split_is_deterministic_across_loads_seeds_and_processes(sst2):
    again = load_task(DATA_DIR / "sst2")  # by path this time
    assert again.split("dev") == sst2.split("dev")
    other = load_task("sst2", DATA_DIR, seed=1)
    assert other.split("dev") != sst2.split("dev")
    assert other.info["dev_split"]["dev_index_sha256"] != sst2.info["dev_split"]["dev_index_sha256"]
    # A fresh interpreter with a different string-hash seed makes the same split.
    code = (
        "import sys; from skillkern.data import load_task; "
        "print(load_task('rte', sys.argv[1]).info['dev_split']['dev_index_sha256'])"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(Path(D.__file__).parents[1]))
    out = subprocess.run([sys.executable, "-c", code, str(DATA_DIR)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == load_task("rte", DATA_DIR).info["dev_split"]["dev_index_sha256"]


@requires_data
def test_env_var_resolution(monkeypatch):
    monkeypatch.setenv("SKILLKERN_DATA", str(DATA_DIR))
    rte = load_task("rte")
    assert rte.source == str((DATA_DIR / "rte").resolve())
    assert "rte" in list_tasks() and "sst2" in list_tasks(DATA_DIR)


@requires_data
def test_mrpc_uses_its_own_dev():
    mrpc = load_task("mrpc", DATA_DIR)
    assert mrpc.info["dev_split"]["method"] == "file"
    assert [len(mrpc.split(s)) for s in ("train", "dev", "test")] == [3668, 408, 1725]
    assert mrpc.split("dev") == _raw_rows(DATA_DIR / "mrpc" / "dev.jsonl")


@requires_data
def test_mnli_is_a_pair_task_with_test_mismatched():
    mnli = load_task("mnli", DATA_DIR)
    assert mnli.pair and mnli.num_classes == 3
    assert list(mnli.splits) == ["train", "dev", "test", "test_mismatched"]
    assert len(mnli.split("test_mismatched")) == 1000
    assert all(isinstance(ex.text_pair, str) for ex in mnli.split("train"))
    with pytest.raises(KeyError, match="test_mismatched"):
        mnli.split("validation")


@requires_data
def test_tweet_three_classes_and_its_subtasks():
    tweet = load_task("tweet", DATA_DIR)
    assert tweet.label_names == ["negative", "neutral", "positive"]
    assert subtasks_for(tweet) == ["pn", "neu"]
    assert tweet.info["dev_split"]["method"] == "file"

    pn = binary_subtask(tweet, "pn")
    assert pn.name == "tweet/pn" and pn.label_names == ["negative", "positive"]
    neu = binary_subtask(tweet, "neu")
    assert neu.name == "tweet/neu" and neu.label_names == ["not neutral", "neutral"]
    for split in tweet.splits:
        c = tweet.class_counts(split)
        assert pn.class_counts(split) == [min(c[0], c[2])] * 2
        assert neu.class_counts(split) == [min(c[1], c[0] + c[2])] * 2
        # Kept rows keep their original order (subsequence of the parent split, relabelled).
        parent_pn = [ex.text for ex in tweet.split(split) if ex.label != 1]
        assert _is_subsequence([ex.text for ex in pn.split(split)], parent_pn)
    # Same seed, same rows; other seed, other rows.
    assert binary_subtask(tweet, "pn").split("train") == pn.split("train")
    assert binary_subtask(tweet, "pn", seed=1).split("train") != pn.split("train")
    unbalanced = binary_subtask(tweet, "neu", balance=False)
    c = tweet.class_counts("test")
    assert unbalanced.class_counts("test") == [c[0] + c[2], c[1]]


@requires_data
def test_ovr_and_pair_subtasks_on_many_classes():
    ag = load_task("ag_news", DATA_DIR)
    assert subtasks_for(ag) == ["ovr:0", "ovr:1", "ovr:2", "ovr:3"]
    sports = binary_subtask(ag, "ovr:Sports")
    assert sports.name == "ag_news/ovr:1" and sports.label_names == ["not Sports", "Sports"]
    assert sports.split("train") == binary_subtask(ag, "ovr:1").split("train")
    for split in ag.splits:
        assert sports.class_counts(split) == [ag.class_counts(split)[1]] * 2
    pair = binary_subtask(ag, "pair:World,3")
    assert pair.name == "ag_news/pair:0,3" and pair.label_names == ["World", "Sci/Tech"]
    c = ag.class_counts("test")
    assert pair.class_counts("test") == [min(c[0], c[3])] * 2
    db = load_task("dbpedia", DATA_DIR)
    assert len(subtasks_for(db)) == 14
    b = binary_subtask(db, "ovr:13")
    assert b.class_counts("dev") == [db.class_counts("dev")[13]] * 2


@requires_data
def test_subtask_errors(sst2):
    with pytest.raises(ValueError, match="exactly 3 classes.*sst2.*2"):
        binary_subtask(sst2, "pn")
    with pytest.raises(ValueError, match="exactly 3 classes"):
        binary_subtask(sst2, "neu")
    assert subtasks_for(sst2) == []
    with pytest.raises(ValueError, match=r"class 7 out of range \[0, 2\)"):
        binary_subtask(sst2, "ovr:7")
    with pytest.raises(ValueError, match="unknown class 'neutral'"):
        binary_subtask(sst2, "ovr:neutral")
    with pytest.raises(ValueError, match="unknown sub-task kind 'foo'"):
        binary_subtask(sst2, "foo")
    with pytest.raises(ValueError, match="must differ"):
        binary_subtask(sst2, "pair:1,positive")


# ------------------------------------------------------------------------------------------------ synthetic folders


def _make_task(
    root: Path,
    *,
    name: str = "toy",
    label_names=("neg", "pos"),
    pair: bool = False,
    train: str | None = None,
    test: str | None = None,
    dev: str | None = None,
    n: int = 10,
) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "task.json").write_text(json.dumps({"name": name, "label_names": list(label_names), "pair": pair}))

    def rows(k: int) -> str:
        out = []
        for i in range(k):
            r = {"text": f"row {i}", "label": i % len(label_names)}
            if pair:
                r["text_pair"] = f"pair {i}"
            out.append(json.dumps(r))
        return "\n".join(out) + "\n"

    (d / "train.jsonl").write_text(rows(n) if train is None else train)
    (d / "test.jsonl").write_text(rows(4) if test is None else test)
    if dev is not None:
        (d / "dev.jsonl").write_text(dev)
    return d


def test_synthetic_folder_loads_with_blank_lines_and_extra_splits(tmp_path):
    train = '{"text": "a", "label": 0}\n\n   \n{"text": "b", "label": 1, "title": "ignored"}\n' * 5
    d = _make_task(tmp_path, train=train)
    (d / "test_other.jsonl").write_text('{"text": "z", "label": 1}\n')
    t = load_task(str(d))
    assert list(t.splits) == ["train", "dev", "test", "test_other"]
    assert len(t.split("train")) == 8 and len(t.split("dev")) == 2
    assert t.split("test_other") == [Example("z", 1)]
    assert t.info["files"]["train"]["rows"] == 10
    assert list_tasks(tmp_path) == ["toy"]
    # By name through data_dir; the folder name need not be a known task.
    assert load_task("toy", tmp_path).split("dev") == t.split("dev")


def test_malformed_json_names_file_and_line(tmp_path):
    d = _make_task(tmp_path, train='{"text": "a", "label": 0}\n\n{"text": "b", "label": 1\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:3: malformed JSON"):
        load_task(str(d))


def test_missing_text_or_label(tmp_path):
    d = _make_task(tmp_path / "a", train='{"text": "a", "label": 0}\n{"label": 1}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2: missing required key 'text'"):
        load_task(str(d))
    d = _make_task(tmp_path / "b", test='{"text": "a"}\n')
    with pytest.raises(ValueError, match=r"test\.jsonl:1: missing required key 'label'"):
        load_task(str(d))


@pytest.mark.parametrize(
    "label, pattern",
    [
        ("3", r"train\.jsonl:2: label 3 out of range \[0, 3\)"),
        ("-1", r"train\.jsonl:2: label -1 out of range \[0, 3\)"),
        ('"1"', r"train\.jsonl:2: 'label' must be an integer in \[0, 3\), got '1' \(str\)"),
        ("1.0", r"train\.jsonl:2: 'label' must be an integer in \[0, 3\), got 1\.0 \(float\)"),
        ("true", r"train\.jsonl:2: 'label' must be an integer in \[0, 3\), got True \(bool\)"),
    ],
)
def test_bad_label_names_value_and_range(tmp_path, label, pattern):
    train = '{"text": "x", "label": 0}\n{"text": "y", "label": %s}\n' % label
    d = _make_task(tmp_path, label_names=("a", "b", "c"), train=train)
    with pytest.raises(ValueError, match=pattern):
        load_task(str(d))


def test_missing_files_name_the_path(tmp_path):
    d = _make_task(tmp_path / "a")
    (d / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=str(d / "test.jsonl")):
        load_task(str(d))
    d = _make_task(tmp_path / "b")
    (d / "train.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=str(d / "train.jsonl")):
        load_task(str(d))
    d = _make_task(tmp_path / "c")
    (d / "task.json").unlink()
    with pytest.raises(FileNotFoundError, match=str(d / "task.json")):
        load_task(str(d))
    with pytest.raises(FileNotFoundError, match=str(d / "task.json")):
        load_task("toy", tmp_path / "c")  # found by name, still names the missing file
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task(str(tmp_path / "nowhere"))


def test_bad_task_json(tmp_path):
    d = _make_task(tmp_path / "a")
    (d / "task.json").write_text('{"label_names": ["a", "b"],')
    with pytest.raises(ValueError, match=r"task\.json:1: invalid JSON"):
        load_task(str(d))
    (d / "task.json").write_text('{"pair": false}')
    with pytest.raises(ValueError, match="missing required key 'label_names'"):
        load_task(str(d))
    (d / "task.json").write_text('{"label_names": ["a"]}')
    with pytest.raises(ValueError, match="at least 2 classes"):
        load_task(str(d))


def test_empty_split_names_the_file(tmp_path):
    d = _make_task(tmp_path, test="\n\n")
    with pytest.raises(ValueError, match=r"test\.jsonl: split is empty"):
        load_task(str(d))
    d = _make_task(tmp_path / "b", dev="")
    with pytest.raises(ValueError, match=r"dev\.jsonl: split is empty"):
        load_task(str(d))


def test_pair_rows_need_text_pair(tmp_path):
    train = '{"text": "a", "text_pair": "b", "label": 0}\n{"text": "a", "label": 1}\n'
    d = _make_task(tmp_path / "a", pair=True, train=train)
    with pytest.raises(ValueError, match=r"train\.jsonl:2: missing 'text_pair'"):
        load_task(str(d))
    d = _make_task(tmp_path / "b", pair=False, test='{"text": "a", "text_pair": "b", "label": 0}\n')
    with pytest.raises(ValueError, match=r"test\.jsonl:1: row has 'text_pair' but task\.json says pair: false"):
        load_task(str(d))
    ok = load_task(str(_make_task(tmp_path / "c", pair=True)))
    assert ok.pair and ok.split("test")[0] == Example("row 0", 0, "pair 0")


def test_own_dev_file_is_used(tmp_path):
    d = _make_task(tmp_path, dev='{"text": "d", "label": 1}\n')
    t = load_task(str(d))
    assert t.split("dev") == [Example("d", 1)] and len(t.split("train")) == 10
    assert t.info["dev_split"] == {"method": "file", "from": "dev.jsonl"}


def test_dev_fraction_and_seed(tmp_path):
    d = _make_task(tmp_path, n=100)
    a = load_task(str(d), dev_fraction=0.3, seed=7)
    assert len(a.split("dev")) == 30 and len(a.split("train")) == 70
    assert a.split("dev") == load_task(str(d), dev_fraction=0.3, seed=7).split("dev")
    with pytest.raises(ValueError, match="dev_fraction"):
        load_task(str(d), dev_fraction=1.0)


def test_unknown_task_without_data_dir_says_where_it_looked(monkeypatch):
    monkeypatch.delenv("SKILLKERN_DATA", raising=False)
    with pytest.raises(FileNotFoundError) as e:
        load_task("no_such_task")
    msg = str(e.value)
    assert "SKILLKERN_DATA" in msg and "--data DIR" in msg and "unknown task 'no_such_task'" in msg
    # A paper task: the hub fallback is named, and why it failed.
    with pytest.raises(FileNotFoundError, match="'datasets' package is not installed"):
        load_task("sst2")
    assert list_tasks() == []


def test_unknown_task_in_data_dir_lists_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("SKILLKERN_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        load_task("nope")
    assert str(tmp_path / "nope") in str(e.value) and "$SKILLKERN_DATA" in str(e.value)


def test_hub_offline_reason(monkeypatch):
    monkeypatch.delenv("SKILLKERN_DATA", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"offline \(HF_DATASETS_OFFLINE=1\)"):
        load_task("rte")


class _FakeSplit(dict):
    """Column access like a datasets.Dataset: ds["column"] -> list."""


def _fake_datasets(calls: list, fail: bool = False) -> types.ModuleType:
    mod = types.ModuleType("datasets")

    def load_dataset(path, config=None, *, split):
        calls.append((path, config, split))
        if fail:
            raise ConnectionError("no network")
        n = 10 if split == "train" else 4
        labels = [i % 2 for i in range(n)]
        if split == "validation":
            labels[0] = -1  # a hidden label is dropped
        return _FakeSplit(
            sentence1=[f"s{i}" for i in range(n)], sentence2=[f"t{i}" for i in range(n)], label=labels
        )

    mod.load_dataset = load_dataset
    return mod


def test_hub_fallback_with_a_fake_datasets_module(monkeypatch):
    monkeypatch.delenv("SKILLKERN_DATA", raising=False)
    calls: list = []
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(calls))
    t = load_task("rte")
    assert calls == [("nyu-mll/glue", "rte", "train"), ("nyu-mll/glue", "rte", "validation")]
    assert t.source == "hub:nyu-mll/glue/rte" and t.pair
    assert [len(t.split(s)) for s in ("train", "dev", "test")] == [8, 2, 3]
    assert t.split("test")[0] == Example("s1", 1, "t1")
    assert t.info["hub"]["splits"]["test"]["dropped_unlabelled"] == 1
    assert t.info["dev_split"]["method"] == "random split of train"

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets([], fail=True))
    with pytest.raises(FileNotFoundError, match="ConnectionError: no network"):
        load_task("rte")


def test_hub_registry_is_complete():
    for name in ("sst2", "imdb", "tweet", "mnli", "qnli", "rte", "qqp", "mrpc", "cola", "ag_news", "dbpedia"):
        spec = D.HUB_TASKS[name]
        assert "train" in spec.splits and "test" in spec.splits
    assert D.HUB_TASKS["mnli"].splits["test"] == "validation_matched"
    assert D.HUB_TASKS["dbpedia"].text == "content" and len(D.HUB_TASKS["dbpedia"].label_names) == 14
    if HAVE_DATA:  # label names agree with the local folders
        for name in list_tasks(DATA_DIR):
            meta = json.loads((DATA_DIR / name / "task.json").read_text())
            assert list(D.HUB_TASKS[name].label_names) == meta["label_names"], name
            assert (D.HUB_TASKS[name].text_pair is not None) == meta["pair"], name
