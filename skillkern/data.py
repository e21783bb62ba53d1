"""Task data: local JSONL folders first, Hugging Face ``datasets`` as a fallback.

A task folder holds ``train.jsonl``, optional ``dev.jsonl``, ``test.jsonl`` (and any further ``*.jsonl``, which
become extra splits named by file stem, e.g. MNLI's ``test_mismatched``) plus ``task.json``::

    {"name": "sst2", "label_names": ["negative", "positive"], "pair": false, ...}

Each JSONL row is ``{"text": str, "label": int}``, plus ``"text_pair": str`` when ``pair`` is true.  Other keys
(e.g. DBpedia's ``title``) are ignored.

Split roles follow METHOD.md section 3: where there is no ``dev.jsonl`` the file's ``train`` rows are split 80/20
into train/dev with a fixed seed (numpy ``default_rng(seed).permutation``, so the split is the same in every process
and Python version); ``test`` is what results are reported on.  Multi-class tasks are decomposed into class-balanced
binary sub-tasks with :func:`binary_subtask` (METHOD.md section 5).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "Example",
    "TaskData",
    "HubTask",
    "HUB_TASKS",
    "DATA_ENV",
    "load_task",
    "list_tasks",
    "dev_split_indices",
    "binary_subtask",
    "subtasks_for",
]

logger = logging.getLogger(__name__)

DATA_ENV = "SKILLKERN_DATA"
"""Environment variable naming the folder that holds one sub-folder per task."""

_CORE_SPLITS = ("train", "dev", "test")


# --------------------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled row: ``text`` (and ``text_pair`` for sentence-pair tasks) with a class id ``label``."""

    text: str
    label: int
    text_pair: str | None = None


@dataclass
class TaskData:
    """A loaded task.

    Attributes:
        name: task name, e.g. ``"sst2"`` or ``"tweet/pn"`` for a binary sub-task.
        label_names: one name per class; class ``i`` is ``label_names[i]``.
        pair: whether rows are sentence pairs (``Example.text_pair`` set).
        splits: split name -> examples in file order (``train``, ``dev``, ``test`` and any extra splits).
        source: where the data came from (a folder path, or ``hub:<dataset id>[/<config>]``).
        info: provenance: the task.json fields, per-file row counts and sha256, how ``dev`` was made, and for
            sub-tasks the class mapping and balancing.  JSON-serialisable.
    """

    name: str
    label_names: list[str]
    pair: bool
    splits: dict[str, list[Example]] = field(repr=False)
    source: str
    info: dict = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(label_names)``."""
        return len(self.label_names)

    def split(self, name: str) -> list[Example]:
        """Examples of split ``name``; KeyError naming the available splits if there is no such split."""
        try:
            return self.splits[name]
        except KeyError:
            raise KeyError(
                f"task {self.name!r} has no split {name!r}; available splits: {', '.join(self.splits)}"
            ) from None

    def class_counts(self, split: str) -> list[int]:
        """Rows per class in ``split``: a list of length ``num_classes``."""
        counts = [0] * self.num_classes
        for ex in self.split(split):
            counts[ex.label] += 1
        return counts

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return (
            f"TaskData(name={self.name!r}, classes={self.label_names}, pair={self.pair}, "
            f"splits({sizes}), source={self.source!r})"
        )


# --------------------------------------------------------------------------------------------------------------
# Hugging Face hub registry (fallback when no local folder is found)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubTask:
    """Where one of the paper's tasks lives on the Hugging Face hub.

    ``splits`` maps our split name to the hub split name.  GLUE test labels are hidden, so for GLUE tasks our
    ``test`` is the hub ``validation`` split and ``dev`` is carved out of ``train`` (as for local folders).
    """

    path: str
    config: str | None
    splits: dict[str, str]
    text: str
    label_names: tuple[str, ...]
    text_pair: str | None = None
    label: str = "label"
    note: str = ""


_GLUE = "nyu-mll/glue"  # the canonical id of "glue" on the hub
HUB_TASKS: dict[str, HubTask] = {
    "sst2": HubTask(_GLUE, "sst2", {"train": "train", "test": "validation"}, "sentence", ("negative", "positive")),
    "imdb": HubTask("stanfordnlp/imdb", None, {"train": "train", "test": "test"}, "text", ("negative", "positive")),
    "tweet": HubTask(
        "cardiffnlp/tweet_eval",
        "sentiment",
        {"train": "train", "dev": "validation", "test": "test"},
        "text",
        ("negative", "neutral", "positive"),
    ),
    "mnli": HubTask(
        _GLUE,
        "mnli",
        {"train": "train", "test": "validation_matched", "test_mismatched": "validation_mismatched"},
        "premise",
        ("entailment", "neutral", "contradiction"),
        text_pair="hypothesis",
    ),
    "qnli": HubTask(
        _GLUE, "qnli", {"train": "train", "test": "validation"}, "question", ("entailment", "not_entailment"),
        text_pair="sentence",
    ),
    "rte": HubTask(
        _GLUE, "rte", {"train": "train", "test": "validation"}, "sentence1", ("entailment", "not_entailment"),
        text_pair="sentence2",
    ),
    "qqp": HubTask(
        _GLUE, "qqp", {"train": "train", "test": "validation"}, "question1", ("not_duplicate", "duplicate"),
        text_pair="question2",
    ),
    "mrpc": HubTask(
        _GLUE, "mrpc", {"train": "train", "test": "validation"}, "sentence1", ("not_paraphrase", "paraphrase"),
        text_pair="sentence2",
        note="hub MRPC test labels are hidden: test = GLUE validation, dev = 20% of train",
    ),
    "cola": HubTask(
        _GLUE, "cola", {"train": "train", "test": "validation"}, "sentence", ("unacceptable", "acceptable"),
    ),
    "ag_news": HubTask(
        "fancyzhx/ag_news", None, {"train": "train", "test": "test"}, "text",
        ("World", "Sports", "Business", "Sci/Tech"),
    ),
    "dbpedia": HubTask(
        "fancyzhx/dbpedia_14", None, {"train": "train", "test": "test"}, "content",
        ("Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder", "MeanOfTransportation",
         "Building", "NaturalPlace", "Village", "Animal", "Plant", "Album", "Film", "WrittenWork"),
    ),
}
_HUB_ALIASES = {"sst-2": "sst2", "tweet_eval": "tweet", "dbpedia_14": "dbpedia", "agnews": "ag_news"}


# --------------------------------------------------------------------------------------------------------------
# Dev split
# --------------------------------------------------------------------------------------------------------------


def dev_split_indices(n: int, *, seed: int = 0, dev_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the train/dev split of ``n`` train rows.

    ``dev`` gets ``floor(n * dev_fraction)`` rows (at least 1), chosen by ``numpy.random.default_rng(seed)
    .permutation(n)``: the same in every process, platform and Python version.

    Returns:
        (train_idx, dev_idx): int64 arrays, each sorted ascending (file order), disjoint, covering ``range(n)``.
    """
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction!r}")
    if n < 2:
        raise ValueError(f"cannot split {n} train row(s) into train and dev: need at least 2")
    n_dev = min(max(1, int(n * dev_fraction + 1e-9)), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_dev:]), np.sort(perm[:n_dev])


def _make_dev(splits: dict[str, list[Example]], info: dict, train_name: str, seed: int, dev_fraction: float) -> None:
    """Split ``splits['train']`` into train/dev in place and record how in ``info['dev_split']``."""
    rows = splits["train"]
    train_idx, dev_idx = dev_split_indices(len(rows), seed=seed, dev_fraction=dev_fraction)
    splits["train"] = [rows[i] for i in train_idx]
    splits["dev"] = [rows[i] for i in dev_idx]
    info["dev_split"] = {
        "method": "random split of train",
        "from": train_name,
        "rows_before": len(rows),
        "seed": seed,
        "dev_fraction": dev_fraction,
        "rng": "numpy.random.default_rng(seed).permutation",
        "train": len(train_idx),
        "dev": len(dev_idx),
        "dev_index_sha256": hashlib.sha256(dev_idx.astype("<i8").tobytes()).hexdigest(),
    }
    logger.info(
        "%s: no dev split given; made dev from %d of %d train rows (seed %d)", train_name, len(dev_idx), len(rows), seed
    )


def _order_splits(splits: dict[str, list[Example]]) -> dict[str, list[Example]]:
    """train, dev, test first, then extra splits in name order."""
    order = [s for s in _CORE_SPLITS if s in splits] + sorted(s for s in splits if s not in _CORE_SPLITS)
    return {s: splits[s] for s in order}


# --------------------------------------------------------------------------------------------------------------
# Local folders
# --------------------------------------------------------------------------------------------------------------


def _read_task_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"task folder {path.parent} has no task.json (looked for {path})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    names = meta.get("label_names")
    if names is None:
        raise ValueError(f"{path}: missing required key 'label_names' (a list of class names)")
    if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
        raise ValueError(f"{path}: 'label_names' must be a list of strings, got {names!r}")
    if len(names) < 2:
        raise ValueError(f"{path}: 'label_names' needs at least 2 classes, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: 'label_names' has duplicates: {names!r}")
    pair = meta.get("pair", False)
    if not isinstance(pair, bool):
        raise ValueError(f"{path}: 'pair' must be true or false, got {pair!r}")
    return meta


def _read_jsonl(path: Path, num_classes: int, pair: bool) -> tuple[list[Example], str]:
    """Parse and validate one JSONL file; returns (examples, sha256 of the file bytes)."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    hi = num_classes
    out: list[Example] = []
    loads = json.loads
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = loads(raw)
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not valid UTF-8 ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        try:
            text = row["text"]
            label = row["label"]
        except KeyError as e:
            raise ValueError(f"{where}: missing required key {e.args[0]!r} (row has keys {sorted(row)})") from None
        if not isinstance(text, str):
            raise ValueError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        if type(label) is not int:  # bool is an int subclass: reject it too
            raise ValueError(
                f"{where}: 'label' must be an integer in [0, {hi}), got {label!r} ({type(label).__name__})"
            )
        if not 0 <= label < hi:
            raise ValueError(f"{where}: label {label} out of range [0, {hi}) for {hi} classes")
        text_pair = row.get("text_pair")
        if pair:
            if text_pair is None:
                raise ValueError(f"{where}: missing 'text_pair' (task.json says pair: true)")
            if not isinstance(text_pair, str):
                raise ValueError(f"{where}: 'text_pair' must be a string, got {type(text_pair).__name__}")
        elif text_pair is not None:
            raise ValueError(f"{where}: row has 'text_pair' but task.json says pair: false (set \"pair\": true)")
        out.append(Example(text, label, text_pair))
    if not out:
        raise ValueError(f"{path}: split is empty (no rows)")
    return out, digest


def _load_folder(folder: Path, seed: int, dev_fraction: float) -> TaskData:
    folder = folder.resolve()
    meta = _read_task_json(folder / "task.json")
    label_names = list(meta["label_names"])
    pair = bool(meta.get("pair", False))
    for required in ("train", "test"):
        p = folder / f"{required}.jsonl"
        if not p.is_file():
            raise FileNotFoundError(f"task folder {folder} has no {required} split: missing {p}")
    splits: dict[str, list[Example]] = {}
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.glob("*.jsonl")):
        rows, digest = _read_jsonl(p, len(label_names), pair)
        splits[p.stem] = rows
        files[p.stem] = {"file": p.name, "rows": len(rows), "sha256": digest}
    # task.json's other fields (notes, split descriptions) travel along; "splits" is renamed so that it is not
    # mistaken for TaskData.splits.
    info: dict[str, Any] = {
        ("split_notes" if k == "splits" else k): v for k, v in meta.items() if k not in ("name", "label_names", "pair")
    }
    info["files"] = files
    if "dev" in splits:
        info["dev_split"] = {"method": "file", "from": "dev.jsonl"}
    else:
        _make_dev(splits, info, str(folder / "train.jsonl"), seed, dev_fraction)
    name = meta.get("name") if isinstance(meta.get("name"), str) and meta.get("name") else folder.name
    return TaskData(name, label_names, pair, _order_splits(splits), str(folder), info)


# --------------------------------------------------------------------------------------------------------------
# Hub fallback
# --------------------------------------------------------------------------------------------------------------


def _hub_key(name: str) -> str:
    key = name.lower()
    return _HUB_ALIASES.get(key, key)


def _load_hub(name: str, seed: int, dev_fraction: float) -> TaskData:
    """Load one of :data:`HUB_TASKS`; raises RuntimeError with the reason when it cannot."""
    key = _hub_key(name)
    spec = HUB_TASKS.get(key)
    if spec is None:
        raise RuntimeError(f"unknown task {name!r} (the hub registry knows: {', '.join(HUB_TASKS)})")
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            raise RuntimeError(f"offline ({var}={os.environ[var]})")
    try:
        import datasets  # lazy: optional dependency, only needed here
    except ImportError:
        raise RuntimeError("the Hugging Face 'datasets' package is not installed (pip install datasets)") from None

    ds_id = spec.path + (f"/{spec.config}" if spec.config else "")
    splits: dict[str, list[Example]] = {}
    counts: dict[str, dict[str, int]] = {}
    hi = len(spec.label_names)
    for ours, theirs in spec.splits.items():
        try:
            args = (spec.path, spec.config) if spec.config else (spec.path,)
            ds = datasets.load_dataset(*args, split=theirs)
        except Exception as e:  # network, auth, missing split: report it, do not guess
            raise RuntimeError(f"loading {ds_id} split {theirs!r} failed (offline?): {type(e).__name__}: {e}") from e
        texts = list(ds[spec.text])
        pairs = list(ds[spec.text_pair]) if spec.text_pair else [None] * len(texts)
        labels = list(ds[spec.label])
        rows = []
        hidden = 0
        for t, tp, y in zip(texts, pairs, labels):
            y = int(y)
            if y < 0:  # hidden test labels are -1
                hidden += 1
                continue
            if y >= hi:
                raise ValueError(f"{ds_id} split {theirs!r}: label {y} out of range [0, {hi})")
            rows.append(Example(str(t), y, None if tp is None else str(tp)))
        if not rows:
            raise ValueError(f"{ds_id} split {theirs!r} has no labelled rows ({hidden} hidden labels)")
        splits[ours] = rows
        counts[ours] = {"hub_split": theirs, "rows": len(rows), "dropped_unlabelled": hidden}
    info: dict[str, Any] = {"hub": {"path": spec.path, "config": spec.config, "splits": counts}}
    if spec.note:
        info["note"] = spec.note
    if "dev" in splits:
        info["dev_split"] = {"method": "hub split", "from": spec.splits["dev"]}
    else:
        _make_dev(splits, info, f"hub:{ds_id}:{spec.splits['train']}", seed, dev_fraction)
    logger.info("loaded %s from the Hugging Face hub (%s)", key, ds_id)
    pair = spec.text_pair is not None
    return TaskData(key, list(spec.label_names), pair, _order_splits(splits), f"hub:{ds_id}", info)


# --------------------------------------------------------------------------------------------------------------
# Public loading API
# --------------------------------------------------------------------------------------------------------------


def _data_root(data_dir: str | os.PathLike | None) -> tuple[Path | None, str]:
    """The data folder to use and a phrase saying where it came from."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), "data_dir argument"
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser(), f"${DATA_ENV}"
    return None, ""


def load_task(
    name_or_path: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    dev_fraction: float = 0.2,
) -> TaskData:
    """Load a task by folder path or by name.

    Resolution order:
      1. ``name_or_path`` is a folder holding ``task.json``: load it (any folder in the layout works).
      2. ``<data_dir>/<name>``, where ``data_dir`` defaults to ``$SKILLKERN_DATA``.
      3. The Hugging Face hub, for the names in :data:`HUB_TASKS`, when ``datasets`` is installed and online.

    Args:
        name_or_path: task name (``"sst2"``) or path to a task folder.
        data_dir: folder holding one sub-folder per task; default ``$SKILLKERN_DATA``.
        seed: seed of the 80/20 train/dev split made when the task has no dev split.
        dev_fraction: fraction of train that becomes dev in that case.

    Raises:
        FileNotFoundError: nothing found; says where it looked, how to point at the data (``--data DIR`` or
            ``SKILLKERN_DATA``) and why the hub fallback failed.  Also for a task folder missing task.json,
            train.jsonl or test.jsonl (naming the missing path).
        ValueError: malformed data, with ``file:line`` and the offending value.
    """
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction!r}")
    raw = os.fspath(name_or_path)
    looked: list[str] = []

    # 1. an explicit folder
    p = Path(raw).expanduser()
    is_path = os.sep in raw or (os.altsep is not None and os.altsep in raw) or raw.startswith((".", "~"))
    if p.is_dir() and (is_path or (p / "task.json").is_file()):
        # A folder was named: load it; a missing task.json/train/test is reported by its path.  (A bare name
        # that happens to match an unrelated folder in the working directory falls through to the data folder.)
        return _load_folder(p, seed, dev_fraction)
    if is_path:
        raise FileNotFoundError(
            f"task folder {p} does not exist. Pass a task name and give the data folder with --data DIR or the "
            f"{DATA_ENV} environment variable, or pass an existing task folder (task.json, train.jsonl, test.jsonl)."
        )

    # 2. <data_dir>/<name>
    name = raw
    root, root_from = _data_root(data_dir)
    if root is not None:
        cand = root / name
        if cand.is_dir():
            return _load_folder(cand, seed, dev_fraction)  # errors here name the missing file
        looked.append(f"{cand} (from {root_from}{'' if root.is_dir() else '; that folder does not exist'})")
    else:
        looked.append(f"nowhere on disk: data_dir not given and ${DATA_ENV} is not set")

    # 3. the hub
    try:
        return _load_hub(name, seed, dev_fraction)
    except RuntimeError as e:
        hub_reason = str(e)

    raise FileNotFoundError(
        f"cannot find task {raw!r}. Looked in: {'; '.join(looked)}. "
        f"Give the data folder (one sub-folder per task, each with task.json, train.jsonl, test.jsonl) "
        f"with --data DIR or the {DATA_ENV} environment variable, or pass a task folder path. "
        f"Hugging Face hub fallback failed: {hub_reason}."
    )


def list_tasks(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the task folders (sub-folders holding task.json) in ``data_dir`` (default ``$SKILLKERN_DATA``).

    Returns [] when neither is given; FileNotFoundError when the named folder does not exist.
    """
    root, root_from = _data_root(data_dir)
    if root is None:
        return []
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} (from {root_from}) does not exist")
    return sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "task.json").is_file())


# --------------------------------------------------------------------------------------------------------------
# Binary sub-tasks
# --------------------------------------------------------------------------------------------------------------


def subtasks_for(task: TaskData) -> list[str]:
    """Binary sub-task kinds the method uses for ``task``: [] for binary tasks, ["pn", "neu"] for 3 classes,
    ["ovr:0", ..., "ovr:<C-1>"] (one-vs-rest) for more."""
    c = task.num_classes
    if c == 2:
        return []
    if c == 3:
        return ["pn", "neu"]
    return [f"ovr:{i}" for i in range(c)]


def _class_id(task: TaskData, token: str, kind: str) -> int:
    token = token.strip()
    if token in task.label_names:
        return task.label_names.index(token)
    try:
        c = int(token)
    except ValueError:
        raise ValueError(
            f"sub-task {kind!r}: unknown class {token!r} for task {task.name!r}; "
            f"use an id in [0, {task.num_classes}) or one of {task.label_names}"
        ) from None
    if not 0 <= c < task.num_classes:
        raise ValueError(
            f"sub-task {kind!r}: class {c} out of range [0, {task.num_classes}) for task {task.name!r} "
            f"({task.label_names})"
        )
    return c


def _parse_kind(task: TaskData, kind: str) -> tuple[str, dict[int, int], list[str]]:
    """(canonical kind, old label -> new label, new label names)."""
    names = task.label_names
    c = task.num_classes
    k = kind.strip()
    if k in ("pn", "neu"):
        if c != 3:
            raise ValueError(
                f"sub-task {k!r} needs a task with exactly 3 classes; {task.name!r} has {c} ({names}). "
                f"Use 'ovr:<class>' or 'pair:<a>,<b>' instead"
            )
        if k == "pn":
            return k, {0: 0, 2: 1}, [names[0], names[2]]
        return k, {0: 0, 1: 1, 2: 0}, [f"not {names[1]}", names[1]]
    if k.startswith("ovr:"):
        pos = _class_id(task, k[4:], kind)
        return f"ovr:{pos}", {i: int(i == pos) for i in range(c)}, [f"not {names[pos]}", names[pos]]
    if k.startswith("pair:"):
        parts = k[5:].split(",")
        if len(parts) != 2:
            raise ValueError(f"sub-task {kind!r}: expected 'pair:<a>,<b>' with two classes")
        a, b = (_class_id(task, x, kind) for x in parts)
        if a == b:
            raise ValueError(f"sub-task {kind!r}: the two classes must differ")
        return f"pair:{a},{b}", {a: 0, b: 1}, [names[a], names[b]]
    raise ValueError(f"unknown sub-task kind {kind!r}; expected 'pn', 'neu', 'ovr:<class>' or 'pair:<a>,<b>'")


def binary_subtask(task: TaskData, kind: str, *, seed: int = 0, balance: bool = True) -> TaskData:
    """A binary task derived from a multi-class one (METHOD.md section 5).

    kind:
        ``"pn"``: class 0 -> 0 vs class 2 -> 1 (3-class tasks only; class 1 rows dropped);
        ``"neu"``: class 1 -> 1 vs classes 0 and 2 -> 0 (3-class tasks only);
        ``"ovr:<c>"``: class c -> 1 vs every other class -> 0 (c an id or a label name);
        ``"pair:<a>,<b>"``: class a -> 0 vs class b -> 1, other classes dropped.

    With ``balance=True`` every split is made class-balanced by downsampling the larger class (rows chosen with
    ``numpy.random.default_rng`` seeded from ``seed`` and the split name; kept rows stay in their original order).
    The sub-task's dev/test are subsets of the parent's dev/test, so a prompt tuned on the parent's train never
    sees them.

    Returns:
        TaskData named ``"<task>/<kind>"`` with 2 classes; ``info["subtask"]`` records the mapping and counts.
    """
    canon, mapping, new_names = _parse_kind(task, kind)
    new_splits: dict[str, list[Example]] = {}
    counts: dict[str, dict[str, list[int]]] = {}
    for split, rows in task.splits.items():
        mapped = [Example(ex.text, mapping[ex.label], ex.text_pair) for ex in rows if ex.label in mapping]
        before = [0, 0]
        for ex in mapped:
            before[ex.label] += 1
        if balance:
            mapped = _balance(mapped, seed, split)
        after = [0, 0]
        for ex in mapped:
            after[ex.label] += 1
        if min(after) == 0:
            raise ValueError(
                f"sub-task {task.name}/{canon}: split {split!r} has no rows of class "
                f"{new_names[after.index(0)]!r} (counts {dict(zip(new_names, before))})"
            )
        new_splits[split] = mapped
        counts[split] = {"before": before, "after": after}
    info = {
        "parent": {"name": task.name, "source": task.source, "label_names": list(task.label_names)},
        "parent_info": task.info,
        "subtask": {
            "kind": canon,
            "mapping": {str(k): v for k, v in sorted(mapping.items())},
            "balance": balance,
            "seed": seed,
            "counts": counts,
        },
    }
    return TaskData(f"{task.name}/{canon}", new_names, task.pair, new_splits, task.source, info)


def _balance(rows: list[Example], seed: int, split: str) -> list[Example]:
    """Downsample the larger class to the size of the smaller; keep file order.  Deterministic in (seed, split)."""
    idx = [[i for i, ex in enumerate(rows) if ex.label == y] for y in (0, 1)]
    m = min(len(idx[0]), len(idx[1]))
    # crc32 (not hash()) so that every split gets its own, reproducible stream.
    rng = np.random.default_rng([seed, zlib.crc32(split.encode("utf-8"))])
    keep: list[int] = []
    for cls in idx:
        if len(cls) > m:
            cls = [cls[j] for j in rng.choice(len(cls), size=m, replace=False)]
        keep.extend(cls)
    keep.sort()
    return [rows[i] for i in keep]


# --------------------------------------------------------------------------------------------------------------
# Degenerate splits
# --------------------------------------------------------------------------------------------------------------


class DegenerateDataError(ValueError):
    """A split cannot give a defined result: e.g. an evaluation split whose rows are all of one class."""


def check_split_classes(rows: Sequence[Example], label_names: Sequence[str], what: str, *, require_two: bool = False,
                        why: str = "the result is undefined", hint: str = "") -> list[int]:
    """Check the classes present in ``rows`` (one split, after its row cap) by the rules of docs/errors.md:
    fewer than two classes present is a :class:`DegenerateDataError` when ``require_two`` (an evaluation
    split, where predictivity would be undefined, or a training split, where there is nothing to learn), and
    otherwise a logged warning, as is any class without rows (fewer rows than classes included).

    Args:
        what: the split as the user named it (e.g. ``"the evaluation split 'dev' of sst2"``).
        why: why one class is not enough, for the error.
        hint: what to do, appended to the error.

    Returns:
        rows per class.
    """
    counts = [0] * len(label_names)
    for ex in rows:
        counts[int(ex.label)] += 1
    present = [name for name, n in zip(label_names, counts) if n]
    missing = [name for name, n in zip(label_names, counts) if not n]
    if require_two and len(present) < 2:
        only = f"all of class {present[0]!r}" if present else "no rows"
        raise DegenerateDataError(f"{what} has {len(rows)} row(s), {only}: with one class {why}"
                                  + (f"; {hint}" if hint else ""))
    if missing:
        few = f" ({len(rows)} rows for {len(label_names)} classes)" if len(rows) < len(label_names) else ""
        logger.warning("%s (%d rows) has no rows of class(es) %s%s; its results say nothing about them", what,
                       len(rows), ", ".join(repr(m) for m in missing), few)
    return counts
