"""Prompt tuning (and BitFit): the settings, the training loop with best-dev selection and crash-safe resume,
and evaluation.

The loop's state (trained tensors, best state, optimizer, scheduler, RNG) is checkpointed as safetensors + JSON
(never pickle) at every dev evaluation, so ``resume`` continues an interrupted job with the same result. Where
the checkpoint lies, and the run folder a tuning job writes, are :mod:`skillkern.runs`'s (``tune_run``).

Reproducibility: the prompt/head init, the per-epoch shuffles and the train/dev split are drawn from generators
seeded by ``seed`` (and ``split_seed``), never from global or hash-randomised state. The frozen backbone runs in
eval mode (no dropout), so a resumed run reproduces an uninterrupted one step for step.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .batching import iter_batches
from .files import FileFormatError, load_safetensors, safetensors_header, save_safetensors
from .prompt import PromptModel, check_prompt_fits

logger = logging.getLogger(__name__)


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
    return float(correct_rows(model, examples, batch_size, max_length, edit, layers).double().mean())


def correct_rows(model: PromptModel, examples: Sequence, batch_size: int = 32, max_length: int = 128,
                 edit: Optional[Callable] = None, layers=None) -> torch.Tensor:
    """(N,) bool: whether ``model`` predicts each of ``examples`` right, in their order (the per-row outcomes
    a paired test compares); ``edit`` as in :func:`evaluate`."""
    import contextlib

    from .models import edit_neurons

    if not len(examples):
        raise ValueError("cannot evaluate on an empty split")
    out = torch.zeros(len(examples), dtype=torch.bool)
    ctx = edit_neurons(model.backbone, edit, layers) if edit is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        for batch in iter_batches(model.tokenizer, examples, batch_size, max_length, pad_multiple=32,
                                  device=_device(model)):
            logits = model(**batch.inputs)
            out[batch.index] = (logits.argmax(-1) == batch.labels).cpu()
    return out


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


def check_checkpoint(path: str | Path, settings: "TuneSettings", rows: list[int]) -> None:
    """Check, reading its header only (before any model is loaded), that ``path`` is a whole tuning checkpoint
    of this very job: ``settings`` and ``rows`` (the train and dev row counts) must match. Never unpickles."""
    _read_checkpoint(Path(path), settings, rows, tensors=False)


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


def _train_step(model: PromptModel, rows: list, opt, max_length: int, device, step: int) -> float:
    """One optimiser step of cross-entropy on ``rows`` (one batch); returns the loss summed over the rows."""
    total = 0.0
    for batch in iter_batches(model.tokenizer, rows, len(rows), max_length, pad_multiple=0, device=device):
        logits = model(**batch.inputs)
        loss = F.cross_entropy(logits.float(), batch.labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"tuning diverged at step {step}: loss is {float(loss)}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(rows)
    return total


def _dev_point(model: PromptModel, dev: Sequence, s: TuneSettings, state: dict, steps_per_epoch: int) -> float:
    """Evaluate on ``dev`` at ``state["step"]``: append a point to the curve (the mean train loss since the last
    point, reset here), keep the trained state if it is the best so far. Returns the dev accuracy."""
    dev_acc = evaluate(model, dev, s.batch_size, s.max_length)
    state["curve"].append({"step": state["step"], "epoch": round(state["step"] / steps_per_epoch, 4),
                           "train_loss": state["loss_sum"] / max(1, state["loss_n"]), "dev_accuracy": dev_acc})
    state["loss_sum"], state["loss_n"] = 0.0, 0
    if dev_acc > state["best_dev"]:
        state["best_dev"], state["best_step"] = dev_acc, state["step"]
        state["best_state"] = model.trained_state()
    return dev_acc


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
        state["loss_sum"] += _train_step(model, rows, opt, s.max_length, device, step)
        state["loss_n"] += len(rows)
        sched.step()
        state["step"] = step + 1
        bar.update(1)
        if state["step"] % eval_every == 0 or state["step"] == total:
            dev_acc = _dev_point(model, dev, s, state, steps_per_epoch)
            bar.set_postfix(dev=f"{dev_acc:.3f}", best=f"{state['best_dev']:.3f}")
            logger.info("step %d/%d: train loss %.4f, dev accuracy %.4f", state["step"], total,
                        state["curve"][-1]["train_loss"], dev_acc)
            if ckpt is not None:
                _save_checkpoint(ckpt, s, [len(train), len(dev)], model, opt, sched, state)
    bar.close()
    model.load_trained_state(state["best_state"])
    return {"best_dev_accuracy": state["best_dev"], "best_step": state["best_step"], "steps": total,
            "curve": state["curve"]}
