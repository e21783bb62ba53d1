"""Prompt tuning (and BitFit) with best-dev checkpointing, reproducible seeds and crash-safe resume.

A run folder holds everything later steps need:

- ``run.json``: model, task, sub-task, data source, settings, which head was used, dev/test accuracy, curve;
- ``prompt.safetensors``: the best-dev trained tensors (prompt, slot 0, linear head, BitFit biases);
- ``curve.png``: training loss and dev accuracy against steps;
- ``tune_checkpoint.safetensors`` while training (safetensors + JSON, never pickle; gone once the run is
  published): ``--resume`` continues from it.

Reproducibility: the prompt/head init, the per-epoch shuffles and the train/dev split are drawn from generators
seeded by ``seed`` (and ``split_seed``), never from global or hash-randomised state. The frozen backbone runs in
eval mode (no dropout), so a resumed run reproduces an uninterrupted one step for step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .files import (FileFormatError, atomic_write_json, check_out_dir, load_safetensors, read_json,
                    safetensors_header, save_safetensors, staged_dir)
from .prompt import PromptModel, check_prompt_fits, describe_head
from .batching import iter_batches, take

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
STATE_FILE = "prompt.safetensors"
TUNE_CHECKPOINT = "tune_checkpoint.safetensors"
#: the pickle checkpoint that skillkern 0.1.0 and earlier wrote: refused on --resume, never read
LEGACY_CHECKPOINT = "checkpoint.pt"
#: what an unfinished tuning job leaves in its run folder (not a result: the folder can be resumed or reused)
TUNE_PARTIAL = (TUNE_CHECKPOINT, LEGACY_CHECKPOINT)


@dataclass
class TuneSettings:
    """Hyper-parameters of one tuning run (defaults: the released code's, METHOD.md section 2).

    Attributes:
        method: ``prompt`` (soft prompt, frozen backbone) or ``bitfit`` (backbone biases, no prompt).
        prompt_len: P, prompt slots including the frozen slot 0.
        head: ``auto`` | ``mlm`` | ``linear`` (see :class:`~skillkern.prompt.PromptModel`).
        epochs: passes over the training rows (may be fractional).
        lr, betas, eps: Adam; linear schedule with ``warmup`` fraction of steps of warm-up.
        batch_size, max_length: training/evaluation batches and truncation.
        max_train, max_dev, max_test: use the first N rows of each split (None: all).
        eval_every: evaluate on dev every this many steps (0: once per epoch); the best dev state is kept.
        seed: prompt/head init and shuffling.
        split_seed: seed of the 80/20 train/dev split for tasks without a dev file (and of sub-task balancing).
    """

    method: str = "prompt"
    prompt_len: int = 16
    head: str = "auto"
    epochs: float = 4.0
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup: float = 0.006
    batch_size: int = 16
    max_length: int = 128
    max_train: Optional[int] = None
    max_dev: Optional[int] = None
    max_test: Optional[int] = None
    eval_every: int = 0
    seed: int = 0
    split_seed: int = 0

    def __post_init__(self):
        if self.method not in ("prompt", "bitfit"):
            raise ValueError(f"method must be 'prompt' or 'bitfit', got {self.method!r}")
        if self.method == "bitfit":
            self.prompt_len = 0
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        for name in ("batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.betas = tuple(self.betas)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(model: PromptModel, examples: Sequence, batch_size: int = 32, max_length: int = 128,
             edit: Optional[Callable] = None, layers=None) -> float:
    """Accuracy of ``model`` on ``examples``.

    Args:
        edit: optional ``fn(layer, h) -> h`` applied to the neurons during the pass
            (:func:`skillkern.models.edit_neurons`), e.g. a perturbation.
    """
    import contextlib

    from .models import edit_neurons

    if not len(examples):
        raise ValueError("cannot evaluate on an empty split")
    correct = 0
    ctx = edit_neurons(model.backbone, edit, layers) if edit is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        for batch in iter_batches(model.tokenizer, examples, batch_size, max_length, pad_multiple=32,
                                  device=_device(model)):
            logits = model(**batch.inputs)
            correct += int((logits.argmax(-1) == batch.labels).sum())
    return correct / len(examples)


def _device(model: PromptModel) -> torch.device:
    return next(model.backbone.parameters()).device


def _lr_lambda(total: int, warmup: float) -> Callable[[int], float]:
    warm = max(1, math.ceil(warmup * total)) if warmup > 0 else 0

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return f


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch))


CHECKPOINT_FORMAT = "skillkern-tune-checkpoint"


def _save_checkpoint(path: Path, settings: "TuneSettings", rows: list[int], model: PromptModel, opt, sched,
                     state: dict) -> None:
    """The tuning state as safetensors + JSON (no pickle), written atomically: every tensor (trained state, best
    state, optimizer moments and steps, torch's CPU RNG state) in the file, everything else as JSON in its header."""
    tensors = {f"current.{k}": v for k, v in model.trained_state().items()}
    tensors.update({f"best.{k}": v for k, v in state["best_state"].items()})
    optim = opt.state_dict()
    scalars: dict = {}
    for index, entry in optim["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    loop = {k: v for k, v in state.items() if k != "best_state"}
    meta = {"format": CHECKPOINT_FORMAT, "format_version": "1", "settings": json.dumps(settings.to_dict()),
            "rows": json.dumps(rows), "loop": json.dumps(loop),
            "optimizer": json.dumps({"param_groups": optim["param_groups"], "scalars": scalars}),
            "scheduler": json.dumps(sched.state_dict())}
    save_safetensors(path, tensors, meta)


def _read_checkpoint(path: Path, settings: "TuneSettings", rows: list[int], tensors: bool = True) -> dict:
    """Read and check a tuning checkpoint: a whole safetensors file of this very job. ``tensors=False`` reads the
    header only (the check made before a model is loaded). Never unpickles anything."""
    hint = "delete it to start afresh, or run without --resume"
    if tensors:
        data, meta = load_safetensors(path, what="tuning checkpoint", hint=hint)
    else:
        data, (meta, _) = {}, safetensors_header(path, what="tuning checkpoint", hint=hint)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise FileFormatError(f"{path} is not a skillkern tuning checkpoint; {hint}")
    try:
        saved = {k: json.loads(meta[k]) for k in ("settings", "rows", "loop", "optimizer", "scheduler")}
    except (KeyError, ValueError):
        raise FileFormatError(f"tuning checkpoint {path} has a corrupt header; {hint}") from None
    if saved["settings"] != json.loads(json.dumps(settings.to_dict())) or saved["rows"] != list(rows):
        raise ValueError(f"{path} belongs to another tuning job (settings or data differ); delete it or "
                         "run without --resume")
    saved["tensors"] = data
    return saved


def _restore_checkpoint(saved: dict, model: PromptModel, opt, sched) -> dict:
    t = saved["tensors"]
    model.load_trained_state({k[len("current."):]: v for k, v in t.items() if k.startswith("current.")})
    optim = saved["optimizer"]
    state: dict = {}
    for key, value in t.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entry in optim["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    opt.load_state_dict({"state": state, "param_groups": optim["param_groups"]})
    sched.load_state_dict(saved["scheduler"])
    if "rng.cpu" in t:
        torch.set_rng_state(t["rng.cpu"])
    loop = dict(saved["loop"])
    loop["best_state"] = {k[len("best."):]: v for k, v in t.items() if k.startswith("best.")}
    return loop


def tune(model: PromptModel, train: Sequence, dev: Sequence, settings: TuneSettings, *,
         checkpoint: Optional[str | Path] = None, resume: bool = False, progress: bool = True) -> dict:
    """Train ``model``'s trainable tensors with cross-entropy; keep and load the best dev state.

    Args:
        train, dev: examples (``skillkern.data.Example``).
        checkpoint: file for crash-safe resume (written atomically at every evaluation).
        resume: continue from ``checkpoint`` if it exists.

    Returns:
        ``{"best_dev_accuracy", "best_step", "steps", "curve": [{step, epoch, train_loss, dev_accuracy}]}``.
    """
    from tqdm.auto import tqdm

    s = settings
    if not len(train):
        raise ValueError("the training split is empty")
    check_prompt_fits(model.backbone, model.prompt_len, s.max_length)
    params = model.trainable_parameters()
    if not params:
        raise ValueError("nothing to train: the model has no trainable tensors")
    steps_per_epoch = math.ceil(len(train) / s.batch_size)
    total = math.ceil(s.epochs * steps_per_epoch)
    eval_every = s.eval_every or steps_per_epoch
    opt = torch.optim.Adam(params, lr=s.lr, betas=s.betas, eps=s.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, s.warmup))
    device = _device(model)
    state = {"step": 0, "curve": [], "best_dev": -1.0, "best_step": 0, "best_state": model.trained_state(),
             "loss_sum": 0.0, "loss_n": 0}
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and resume and ckpt.exists():
        state = _restore_checkpoint(_read_checkpoint(ckpt, s, [len(train), len(dev)]), model, opt, sched)
        logger.info("resuming tuning at step %d of %d", state["step"], total)

    if total == 0:  # an untrained prompt (e.g. the random-prompt control): evaluate it as it is
        state["best_dev"] = evaluate(model, dev, s.batch_size, s.max_length) if len(dev) else float("nan")
    bar = tqdm(total=total, initial=state["step"], desc="tuning", unit="step", disable=not progress, leave=False)
    model.eval()  # frozen backbone at inference behaviour: no dropout (reproducible, as scored later)
    while state["step"] < total:
        step = state["step"]
        epoch, k = divmod(step, steps_per_epoch)
        order = _epoch_order(len(train), s.seed, epoch)
        rows = [train[int(i)] for i in order[k * s.batch_size: (k + 1) * s.batch_size]]
        for batch in iter_batches(model.tokenizer, rows, len(rows), s.max_length, pad_multiple=0, device=device):
            logits = model(**batch.inputs)
            loss = F.cross_entropy(logits.float(), batch.labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"tuning diverged at step {step}: loss is {float(loss)}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state["loss_sum"] += float(loss.detach()) * len(rows)
            state["loss_n"] += len(rows)
        sched.step()
        state["step"] = step + 1
        bar.update(1)
        if state["step"] % eval_every == 0 or state["step"] == total:
            dev_acc = evaluate(model, dev, s.batch_size, s.max_length)
            point = {"step": state["step"], "epoch": round(state["step"] / steps_per_epoch, 4),
                     "train_loss": state["loss_sum"] / max(1, state["loss_n"]), "dev_accuracy": dev_acc}
            state["curve"].append(point)
            state["loss_sum"], state["loss_n"] = 0.0, 0
            if dev_acc > state["best_dev"]:
                state["best_dev"], state["best_step"] = dev_acc, state["step"]
                state["best_state"] = model.trained_state()
            bar.set_postfix(dev=f"{dev_acc:.3f}", best=f"{state['best_dev']:.3f}")
            logger.info("step %d/%d: train loss %.4f, dev accuracy %.4f", state["step"], total,
                        point["train_loss"], dev_acc)
            if ckpt is not None:
                _save_checkpoint(ckpt, s, [len(train), len(dev)], model, opt, sched, state)
    bar.close()
    model.load_trained_state(state["best_state"])
    return {"best_dev_accuracy": state["best_dev"], "best_step": state["best_step"], "steps": total,
            "curve": state["curve"]}


# --------------------------------------------------------------------------------------------------------------
# Run folders
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


def tune_run(model_name: str, task, settings: TuneSettings, out: str | Path, *, device=None, resume: bool = False,
             progress: bool = True, prompt_init: Optional[torch.Tensor] = None, label: str = "tuned",
             init_state: Optional[dict] = None, overwrite: bool = False, record_model: Optional[str] = None) -> dict:
    """Tune a prompt (or BitFit) for ``task`` and write the run folder ``out``. Returns run.json's content.

    Validate, then work, then publish: the output folder, the classes of the splits (README "Errors and
    safety") and, with ``resume``, the checkpoint are checked before the model is loaded; the checkpoint
    (``out/tune_checkpoint.safetensors``) is written atomically at every dev evaluation; the finished run is
    written to a temporary sibling folder and moved into place (the checkpoint goes with the old folder).

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
    from . import __version__
    from .data import check_split_classes
    from .models import load_model, model_id
    from .plotting import plot_curve
    from .batching import check_rows_differ

    out = Path(out)
    check_tune_out(out, model_name=model_name, task=task, overwrite=overwrite, resume=resume)
    train, dev, test = run_splits(task, settings)
    names = task.label_names
    check_split_classes(train, names, f"the training split of {task.name}", require_two=True,
                        why="there is nothing to learn", hint="use more rows (--max-train) or another task")
    check_split_classes(dev, names, f"the dev split of {task.name}")
    if test:
        check_split_classes(test, names, f"the test split of {task.name}")
    ckpt = out / TUNE_CHECKPOINT
    if resume and ckpt.exists():
        _read_checkpoint(ckpt, settings, [len(train), len(dev)], tensors=False)  # refuse before loading the model
    elif ckpt.exists():
        logger.warning("%s holds the checkpoint of an unfinished run; starting afresh (pass --resume to continue "
                       "it)", out)
    backbone, tokenizer = load_model(model_name, masked_lm=settings.head != "linear", device=device)
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
    parent = task.info.get("parent", {})
    info = {
        "kind": "skillkern-run",
        "skillkern_version": __version__,
        "model": record_model or model_id(backbone),
        "model_type": backbone.config.model_type,
        "task": parent.get("name", task.name),
        "subtask": task.info.get("subtask", {}).get("kind"),
        "task_source": task.source,
        "label_names": task.label_names,
        "prompt": label,
        "head": pm.head_kind,
        "head_description": describe_head(pm),
        "settings": settings.to_dict(),
        "rows": {"train": len(train), "dev": len(dev), "test": len(test)},
        "dev_accuracy": result["best_dev_accuracy"],
        "test_accuracy": test_acc,
        "best_step": result["best_step"],
        "steps": result["steps"],
        "curve": result["curve"],
        "seconds": round(time.perf_counter() - started, 2),
        "device": str(_device(pm)),
        "threads": torch.get_num_threads(),
    }
    with staged_dir(out) as tmp:
        save_safetensors(tmp / STATE_FILE, pm.trained_state(), metadata={"run": json.dumps({k: info[k] for k in (
            "model", "task", "subtask", "head", "prompt")})})
        atomic_write_json(tmp / RUN_FILE, info)
        if result["curve"]:
            plot_curve(result["curve"], tmp / "curve.png",
                       title=f"{info['task']}{'/' + info['subtask'] if info['subtask'] else ''} "
                             f"({settings.method}, seed {settings.seed}): test acc "
                             f"{test_acc if test_acc is None else round(test_acc, 4)}")
    return info


def read_run(run: str | Path, flag: str = "--run") -> dict:
    """run.json of a run folder, with a clear error naming ``flag`` and the file if it is not one."""
    path = Path(run) / RUN_FILE
    if not Path(run).is_dir():
        raise FileNotFoundError(f"{flag} {run} is not a run folder (no such folder); create one with `skillkern "
                                "tune`")
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {run} is not a run folder (no {RUN_FILE}); create one with `skillkern tune`")
    info = read_json(path, what="run description", hint="tune the run again (with --overwrite)")
    if not isinstance(info, dict) or info.get("kind") != "skillkern-run":
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
    safetensors_header(Path(run) / STATE_FILE, what=f"prompt file of {flag} {run}:",
                       hint="tune the run again (with --overwrite)")
    check_model_source(info["model"], flag=f"{flag} {run}: model")
    return info


def load_run(run: str | Path, *, device=None, data: Optional[str] = None, flag: str = "--run", task=None):
    """Rebuild a run's :class:`PromptModel` with its trained tensors, and its task.

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
    state, _ = load_safetensors(Path(run) / STATE_FILE, what=f"prompt file of {flag} {run}:",
                                hint="tune the run again (with --overwrite)")
    backbone, tokenizer = load_model(info["model"], masked_lm=info["head"] == "mlm", device=device)
    pm = PromptModel(backbone, tokenizer, task.num_classes, s.prompt_len, head=info["head"], seed=s.seed)
    if s.method == "bitfit":
        pm.use_bitfit()
    pm.load_trained_state(state)
    pm.eval()
    return pm, task, info
