"""The run folder: its layout, run.json, the prompt file, checkpoints, a run's scores and its skill neurons.

A run is what ``skillkern tune`` writes (METHOD.md section 2) and what ``score --run``, ``perturb`` and ``prune``
read. This module is the only place that knows where things lie in it::

    RUN/run.json                          settings, head, data source, dev/test accuracy, curve (read_run)
    RUN/prompt.safetensors                the best-dev trained tensors: prompt, slot 0, linear head, BitFit biases
    RUN/curve.png                         training loss and dev accuracy against steps
    RUN/tune_checkpoint.safetensors       while tuning only; ``tune --resume`` continues from it
    RUN/scores/<task | subtask>/          ``score --run``: stats.safetensors, summary.json, predictivity.png
                                          (and checkpoint.safetensors while scoring; ``--resume`` continues it)
    RUN/perturb_<mode>[_from_<run>].json  ``perturb`` results, each with its .png

A pruned output (``skillkern prune``) is a run folder too: its run.json and prompt file describe the run on the
pruned model.

Everything is written atomically (:mod:`skillkern.files`); a run folder is published as a whole when tuning
ends, so an interrupted run leaves only its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .batching import check_rows_differ, take
from .files import (FileFormatError, atomic_write_json, check_out_dir, load_safetensors, read_json,
                    safetensors_header, save_safetensors, staged_dir)
from .prompt import PromptModel, describe_head
from .stats import NeuronStats, select_multiclass, select_per_layer
from .tune import TuneSettings, check_checkpoint, evaluate, tune

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
STATE_FILE = "prompt.safetensors"
CURVE_FILE = "curve.png"
TUNE_CHECKPOINT = "tune_checkpoint.safetensors"
#: the pickle checkpoint that skillkern 0.1.0 and earlier wrote: refused on --resume, never read
LEGACY_CHECKPOINT = "checkpoint.pt"
#: what an unfinished tuning job leaves in its run folder (not a result: the folder can be resumed or reused)
TUNE_PARTIAL = (TUNE_CHECKPOINT, LEGACY_CHECKPOINT)
SCORES_DIR = "scores"
RUN_KIND = "skillkern-run"


# --------------------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------------------

def run_file(run: str | Path) -> Path:
    """``RUN/run.json``."""
    return Path(run) / RUN_FILE


def prompt_file(run: str | Path) -> Path:
    """``RUN/prompt.safetensors``: the run's trained tensors."""
    return Path(run) / STATE_FILE


def tune_checkpoint(run: str | Path) -> Path:
    """``RUN/tune_checkpoint.safetensors``: the state of an unfinished tuning job."""
    return Path(run) / TUNE_CHECKPOINT


def scores_dir(run: str | Path, subtask: Optional[str] = None) -> Path:
    """The folder ``skillkern score --run RUN [--subtask K]`` writes: ``RUN/scores/<K or task>``."""
    return Path(run) / SCORES_DIR / (subtask.replace(":", "_").replace(",", "_") if subtask else "task")


def scores_path(run: str | Path, subtask: Optional[str] = None) -> Path:
    """Where ``skillkern score --run RUN [--subtask K]`` writes its stats file."""
    return scores_dir(run, subtask) / "stats.safetensors"


def default_perturb_out(run: str | Path, mode: str, neurons_from: Optional[str | Path] = None,
                        noise: str = "fixed") -> Path:
    """``RUN/perturb_<mode>[_neuron][_from_<other run>].json`` (``_neuron``: gaussian noise in units of each
    neuron's std)."""
    suffix = ("_neuron" if mode == "gaussian" and noise == "neuron" else "") + \
        (f"_from_{Path(neurons_from).name}" if neurons_from else "")
    return Path(run) / f"perturb_{mode}{suffix}.json"


# --------------------------------------------------------------------------------------------------------------
# run.json and the prompt file
# --------------------------------------------------------------------------------------------------------------

def read_run(run: str | Path, flag: str = "--run") -> dict:
    """run.json of a run folder, with a clear error naming ``flag`` and the file if it is not one."""
    path = run_file(run)
    if not Path(run).is_dir():
        raise FileNotFoundError(f"{flag} {run} is not a run folder (no such folder); create one with `skillkern "
                                "tune`")
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {run} is not a run folder (no {RUN_FILE}); create one with `skillkern tune`")
    info = read_json(path, what="run description", hint="tune the run again (with --overwrite)")
    if not isinstance(info, dict) or info.get("kind") != RUN_KIND:
        raise FileFormatError(f"{path} is not a skillkern run description")
    for key in ("model", "task", "settings", "head"):
        if key not in info:
            raise FileFormatError(f"{path} lacks {key!r}; tune the run again (with --overwrite)")
    try:
        TuneSettings(**info["settings"])
    except (TypeError, ValueError) as err:
        raise FileFormatError(f"{path}: its settings are invalid ({err}); tune the run again") from None
    return info


def check_run(run: str | Path, flag: str = "--run") -> dict:
    """Check a run folder before anything is loaded: run.json readable, prompt.safetensors whole (header read),
    the run's model loadable (:func:`skillkern.models.check_model_source`). Returns run.json's content."""
    from .models import check_model_source

    info = read_run(run, flag)
    safetensors_header(prompt_file(run), what=f"prompt file of {flag} {run}:",
                       hint="tune the run again (with --overwrite)")
    check_model_source(info["model"], flag=f"{flag} {run}: model")
    return info


def read_prompt(run: str | Path, flag: str = "--run") -> dict[str, torch.Tensor]:
    """The run's trained tensors (prompt, slot 0, head, BitFit biases), from its prompt file (never pickle)."""
    state, _ = load_safetensors(prompt_file(run), what=f"prompt file of {flag} {run}:",
                                hint="tune the run again (with --overwrite)")
    return state


def write_run(folder: str | Path, info: dict, state: dict[str, torch.Tensor]) -> None:
    """Write a run's ``run.json`` (``info``) and prompt file (``state``, the trained tensors) into ``folder``,
    each atomically; the prompt file goes first, so run.json marks a whole run. Callers write into a
    :func:`skillkern.files.staged_dir`."""
    folder = Path(folder)
    header = {"run": json.dumps({k: info.get(k) for k in ("model", "task", "subtask", "head", "prompt")})}
    save_safetensors(prompt_file(folder), state, metadata=header)
    atomic_write_json(run_file(folder), info)


# --------------------------------------------------------------------------------------------------------------
# A run's task and rows
# --------------------------------------------------------------------------------------------------------------

def load_run_task(info: dict, data: Optional[str] = None):
    """The task (and sub-task) a run was tuned on, with the same train/dev split.

    ``data``: a data folder to read instead of the one the run read (e.g. on another machine).
    """
    from .data import binary_subtask, load_task

    seed = info["settings"]["split_seed"]
    source = info.get("task_source", "")
    if data is None and source and not source.startswith("hub:") and Path(source).is_dir():
        task = load_task(source, seed=seed)  # the very folder the run read
    else:
        task = load_task(info["task"], data, seed=seed)
    if info.get("subtask"):
        task = binary_subtask(task, info["subtask"], seed=seed)
    return task


def run_splits(task, settings: TuneSettings) -> tuple[list, list, list]:
    """(train, dev, test) rows a run uses: the first ``max_train`` / ``max_dev`` / ``max_test`` of each split."""
    return (take(task.split("train"), settings.max_train), take(task.split("dev"), settings.max_dev),
            take(task.split("test"), settings.max_test))


# --------------------------------------------------------------------------------------------------------------
# Tuning a run, loading a run
# --------------------------------------------------------------------------------------------------------------

def check_tune_out(out: str | Path, *, model_name: Optional[str] = None, task=None, overwrite: bool = False,
                   resume: bool = False, flag: str = "--out", inputs: Sequence = ()) -> str:
    """Check, before any work, that the run folder ``out`` may be written (see
    :func:`skillkern.files.check_out_dir`): a new or empty folder, an unfinished run of this kind (its tuning
    checkpoint only), or with ``overwrite`` a finished run, whose whole folder (scores and perturbation results
    included) the new run replaces. ``inputs``: further ``(name, path)`` the folder must not be or contain.
    Returns ``"new"``, ``"partial"`` or ``"replace"``."""
    inputs = list(inputs)
    if model_name is not None and Path(model_name).expanduser().exists():
        inputs.append(("model folder", Path(model_name).expanduser()))
    if task is not None and task.source and not task.source.startswith("hub:"):
        inputs.append(("task folder", Path(task.source)))
    state = check_out_dir(out, kind="run", flag=flag, overwrite=overwrite, partial=TUNE_PARTIAL, inputs=inputs)
    legacy = Path(out) / LEGACY_CHECKPOINT
    if resume and legacy.exists():
        raise FileFormatError(f"{legacy} is a checkpoint of an older skillkern, written with pickle, which is no "
                              "longer read (unpickling a file can run code); delete it and tune afresh")
    return state


def _check_tune_rows(task, train: list, dev: list, test: list) -> None:
    from .data import check_split_classes

    names = task.label_names
    check_split_classes(train, names, f"the training split of {task.name}", require_two=True,
                        why="there is nothing to learn", hint="use more rows (--max-train) or another task")
    check_split_classes(dev, names, f"the dev split of {task.name}")
    if test:
        check_split_classes(test, names, f"the test split of {task.name}")


def tune_run(model_name: str, task, settings: TuneSettings, out: str | Path, *, device=None, resume: bool = False,
             progress: bool = True, prompt_init: Optional[torch.Tensor] = None, label: str = "tuned",
             init_state: Optional[dict] = None, overwrite: bool = False, record_model: Optional[str] = None) -> dict:
    """Tune a prompt (or BitFit) for ``task`` and write the run folder ``out``. Returns run.json's content.

    Validate, then work, then publish: the output folder, the classes of the splits (docs/errors.md) and, with
    ``resume``, the checkpoint are checked before the model is loaded; the checkpoint
    (:func:`tune_checkpoint`) is written atomically at every dev evaluation; the finished run is written to a
    temporary sibling folder and moved into place (the checkpoint goes with the old folder).

    Args:
        model_name: ``minilm``, a hub id or a path (see :func:`skillkern.load_model`).
        task: a :class:`~skillkern.data.TaskData` (already a binary sub-task where wanted).
        resume: continue from ``out``'s checkpoint if there is one.
        prompt_init: start from this (P-1, H) prompt (e.g. a hand-written prompt's embeddings).
        label: what kind of prompt this is (``tuned``, ``random``, ``handwritten``), recorded in run.json.
        init_state: start from these trained tensors (e.g. another run's prompt and head, to re-tune it).
        overwrite: replace a finished run in ``out`` (otherwise refused).
        record_model: the model name run.json records (default: the name the model was loaded by), e.g. where a
            model is loaded from a staging folder that is about to move.
    """
    from .models import load_model

    out = Path(out)
    check_tune_out(out, model_name=model_name, task=task, overwrite=overwrite, resume=resume)
    train, dev, test = run_splits(task, settings)
    _check_tune_rows(task, train, dev, test)
    ckpt = tune_checkpoint(out)
    if resume and ckpt.exists():
        check_checkpoint(ckpt, settings, [len(train), len(dev)])  # refuse before loading the model
    elif ckpt.exists():
        logger.warning("%s holds the checkpoint of an unfinished run; starting afresh (pass --resume to continue "
                       "it)", out)
    backbone, tokenizer = load_model(model_name, masked_lm=settings.head in ("auto", "mlm"), device=device)
    pm = PromptModel(backbone, tokenizer, task.num_classes, settings.prompt_len, head=settings.head,
                     seed=settings.seed, prompt_init=prompt_init)
    if settings.method == "bitfit":
        pm.use_bitfit()
    if init_state is not None:
        pm.load_trained_state(init_state)
    check_rows_differ(tokenizer, train, settings.max_length, f"the training split of {task.name}", required=False)
    started = time.perf_counter()
    result = tune(pm, train, dev, settings, checkpoint=ckpt, resume=resume, progress=progress)
    test_acc = evaluate(pm, test, settings.batch_size, settings.max_length) if test else None
    info = _run_info(pm, task, settings, result, test_acc, label=label, record_model=record_model,
                     rows=(len(train), len(dev), len(test)), seconds=time.perf_counter() - started)
    with staged_dir(out) as tmp:
        write_run(tmp, info, pm.trained_state())
        if result["curve"]:
            _plot_curve(info, settings, tmp / CURVE_FILE)
    return info


def _run_info(pm: PromptModel, task, settings: TuneSettings, result: dict, test_acc: Optional[float], *,
              label: str, record_model: Optional[str], rows: tuple[int, int, int], seconds: float) -> dict:
    """The content of run.json."""
    from . import __version__
    from .models import model_id

    parent = task.info.get("parent", {})
    return {
        "kind": RUN_KIND,
        "skillkern_version": __version__,
        "model": record_model or model_id(pm.backbone),
        "model_type": pm.backbone.config.model_type,
        "task": parent.get("name", task.name),
        "subtask": task.info.get("subtask", {}).get("kind"),
        "task_source": task.source,
        "label_names": task.label_names,
        "prompt": label,
        "head": pm.head_kind,
        "head_description": describe_head(pm),
        "settings": settings.to_dict(),
        "rows": dict(zip(("train", "dev", "test"), rows)),
        "dev_accuracy": result["best_dev_accuracy"],
        "test_accuracy": test_acc,
        "best_step": result["best_step"],
        "steps": result["steps"],
        "curve": result["curve"],
        "seconds": round(seconds, 2),
        "device": str(next(pm.backbone.parameters()).device),
        "threads": torch.get_num_threads(),
    }


def _plot_curve(info: dict, settings: TuneSettings, path: Path) -> None:
    from .plotting import plot_curve

    test_acc = info["test_accuracy"]
    plot_curve(info["curve"], path,
               title=f"{info['task']}{'/' + info['subtask'] if info['subtask'] else ''} "
                     f"({settings.method}, seed {settings.seed}): test acc "
                     f"{test_acc if test_acc is None else round(test_acc, 4)}")


def load_run(run: str | Path, *, device=None, data: Optional[str] = None, flag: str = "--run", task=None):
    """Rebuild a run's :class:`~skillkern.prompt.PromptModel` with its trained tensors, and its task.

    The run folder (run.json, prompt file, model source) and the task data are checked and read before the
    model is loaded, so a broken run fails fast with one clear error.

    Args:
        task: the run's task when the caller has loaded it already (:func:`load_run_task`).

    Returns:
        ``(prompt_model, task, info)``.
    """
    from .models import load_model

    info = check_run(run, flag)
    s = TuneSettings(**info["settings"])
    if task is None:
        task = load_run_task(info, data)
    state = read_prompt(run, flag)
    backbone, tokenizer = load_model(info["model"], masked_lm=info["head"] == "mlm", device=device)
    pm = PromptModel(backbone, tokenizer, task.num_classes, s.prompt_len, head=info["head"], seed=s.seed)
    if s.method == "bitfit":
        pm.use_bitfit()
    pm.load_trained_state(state)
    pm.eval()
    return pm, task, info


# --------------------------------------------------------------------------------------------------------------
# Scoring a run; its scores and skill neurons
# --------------------------------------------------------------------------------------------------------------

def score_run(run: str | Path, *, subtask: Optional[str] = None, max_baseline: Optional[int] = None,
              max_eval: Optional[int] = None, batch_size: int = 32, pad_multiple: int = 32, which: str = "neuron",
              backend: str = "auto", device=None, data: Optional[str] = None, progress: bool = True,
              out: Optional[str | Path] = None, baseline_split: str = "train", eval_split: str = "dev",
              nonfinite: str = "raise", resume: bool = False, checkpoint_every: int = 50, overwrite: bool = False,
              top: int = 10) -> tuple[NeuronStats, Optional[dict]]:
    """Score the P prompt slots of a tuned run (pool ``slots``) on the split it was tuned on.

    Validate, then work, then publish, as :func:`skillkern.scoring.score_task`: the run folder, the output
    folder, the classes of both splits and, with ``resume``, the checkpoint are checked before the model is
    loaded; both passes save an atomic checkpoint in the output folder every ``checkpoint_every`` batches; the
    result folder (:func:`skillkern.scoring.score_and_publish`) replaces the output folder at the end. The run
    fixes the model, the task, the tracked positions (its prompt slots; a BitFit run's first token) and
    ``max_length``.

    Args:
        run: run folder from :func:`tune_run`.
        subtask: score on a binary sub-task of the run's task (``pn``, ``neu``, ...) with the same prompt.
        max_baseline, max_eval: first N rows of the baseline (train) / evaluation (dev) split; default: the
            run's own ``max_train`` / ``max_dev`` caps, so the dev rows are exactly those the prompt was
            selected on and never its training rows.
        batch_size, pad_multiple, which, backend, nonfinite: as in :class:`skillkern.scoring.ScoreSettings` and
            :class:`skillkern.scoring.Scorer`.
        out: output folder (default :func:`scores_dir`: ``RUN/scores/<subtask or task>``).
        resume: continue from the checkpoint in the output folder (the same job only).
        overwrite: replace an earlier result in ``out`` (otherwise refused).
        top: how many top neurons ``summary.json`` lists.

    Returns:
        ``(stats, summary)``: statistics of shape (L, P, C, D) and the content of ``summary.json`` (None in processes
        of rank > 0).
    """
    from .checkpoint import PARTIAL, Checkpoint
    from .data import binary_subtask
    from .scoring import Scorer, ScoreSettings, join_process_group, process_device, score_and_publish, split_rows

    read_run(run)  # a folder that is no run is named as such, before its scores folder is looked at
    folder = Path(out) if out is not None else scores_dir(run, subtask)
    check_out_dir(folder, kind="scores", flag="--out" if out is not None else "the scores folder",
                  overwrite=overwrite, partial=PARTIAL, inputs=[("run folder", run)])
    info = check_run(run)
    s = TuneSettings(**info["settings"])
    task = run_task = load_run_task(info, data)
    if subtask:
        if info.get("subtask"):
            raise ValueError(f"--subtask {subtask}: run {run} is already on sub-task {info['subtask']!r}")
        task = binary_subtask(task, subtask, seed=s.split_seed)
    baseline, evaluation = split_rows(
        task, baseline_split, eval_split, s.max_train if max_baseline is None else max_baseline,
        s.max_dev if max_eval is None else max_eval, where=str(run),
        hint="use more rows (--max-eval) or a run tuned with more dev rows")
    slots = dict(pool="slots", slots=tuple(range(s.prompt_len))) if s.prompt_len else dict(pool="cls")
    settings = ScoreSettings(**slots, max_length=s.max_length, batch_size=batch_size, pad_multiple=pad_multiple,
                             backend=backend, which=which)
    procs = join_process_group(device)
    fingerprint = {"run_prompt_sha256": prompt_digest(run), "model": info["model"], "task": task.name,
                   "subtask": subtask or info.get("subtask"), "baseline_split": baseline_split,
                   "eval_split": eval_split, "baseline_rows": len(baseline), "eval_rows": len(evaluation),
                   "split_seed": s.split_seed, "settings": settings.to_dict(), "world_size": procs.world,
                   "rank": procs.rank}
    checkpoint = Checkpoint.for_job(folder, fingerprint, rank=procs.rank, world=procs.world, every=checkpoint_every,
                                    resume=resume)
    pm, _, info = load_run(run, device=process_device(device, procs), data=data, task=run_task)  # the run's head
    check_rows_differ(pm.tokenizer, evaluation, s.max_length, f"the evaluation split {eval_split!r} of {run}",
                      required=True, hint="the run's --max-length is too short for this data")
    check_rows_differ(pm.tokenizer, baseline, s.max_length, f"the baseline split {baseline_split!r} of {run}",
                      required=False)
    scorer = Scorer(pm.backbone, pm.tokenizer, task.num_classes, settings, progress=progress and procs.rank == 0,
                    forward=lambda _m, batch: pm(**batch.inputs), nonfinite=nonfinite)
    meta = {"subtask": subtask or info.get("subtask"), "split_seed": s.split_seed, "run": str(run),
            "pool": settings.pool, "prompt": info.get("prompt", "tuned"),
            "head": info["head_description"]}
    return score_and_publish(scorer, task, baseline, evaluation, folder, splits=(baseline_split, eval_split),
                             meta=meta, checkpoint=checkpoint, top=top, title=f"{task.name}: prompt slots of {run}",
                             procs=procs)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prompt_digest(run: str | Path) -> str:
    """SHA-256 of the run's prompt file: what a result computed from the run's prompt records, and checks."""
    return _sha256(prompt_file(run))


def scored_names(run: str | Path) -> set[str]:
    """The scores a run has: a subset of ``{"task", "pn", "neu"}`` (its stats files, unread)."""
    return {name for name in ("task", "pn", "neu") if scores_path(run, None if name == "task" else name).is_file()}


def run_predictivity(run: str | Path) -> dict[str, torch.Tensor]:
    """The (L, D) predictivities a run has been scored with: ``{"task": ...}`` and/or ``{"pn": ..., "neu": ...}``."""
    found = {}
    for name in ("task", "pn", "neu"):
        path = scores_path(run, None if name == "task" else name)
        if path.is_file():
            found[name] = NeuronStats.load(path)[0].predictivity()
    if not found:
        raise FileNotFoundError(f"run {run} has not been scored: run `skillkern score --run {run}` first "
                                f"(looked for {scores_path(run)})")
    return found


def skill_selection(preds: dict[str, torch.Tensor], q: float) -> list[torch.Tensor]:
    """Per-layer skill neurons at fraction ``q``: the union rule of "pn"/"neu" when both exist (multi-class
    tasks, 2q per layer), else the top ``q`` of the task's predictivity.

    Args:
        preds: (L, D) predictivities by score name, as :func:`run_predictivity` returns them.

    Returns:
        L int64 tensors of neuron indices.
    """
    if "pn" in preds and "neu" in preds:
        return select_multiclass(preds["pn"], preds["neu"], q)
    if "task" in preds:
        return select_per_layer(preds["task"], q)
    raise ValueError(f"cannot select neurons from scores {sorted(preds)}: need 'task', or both 'pn' and 'neu'")


def prompt_thresholds(run: str | Path) -> torch.Tensor:
    """(L, D) float64: the run's thresholds (mean activations on its baseline split) averaged over the prompt
    slots, from its task scores (or, for a multi-class task, its ``pn`` scores). The fill value the paper freezes
    pruned neurons at (``prune --fill prompt``), and the value of the ``mean`` perturbation."""
    path = next((p for p in (scores_path(run), scores_path(run, "pn")) if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"run {run} has no scores: run `skillkern score --run {run}` first")
    return NeuronStats.load(path)[0].threshold.mean(dim=1).cpu()
