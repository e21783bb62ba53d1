"""Scoring a run's prompt slots, selecting its skill neurons, and perturbing them beside a random control.

METHOD.md sections 4-6. The selected neurons are perturbed at every token position of the chosen layers:

- ``gaussian``: ``a += eps``, ``eps ~ N(0, sigma^2)``, one noise vector per sample shared by its positions, redrawn
  every forward pass (from a seeded generator, so a perturbation run is reproducible);
- ``zero``: ``a = 0``;
- ``mean``: ``a = baseline`` (the run's thresholds averaged over the prompt slots).

The control perturbs, in each layer, the same number of neurons drawn uniformly at random (seeded).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .files import atomic_write, atomic_write_json, check_out_dir, staged_dir
from .stats import NeuronStats, select_multiclass, select_per_layer

logger = logging.getLogger(__name__)

MODES = ("gaussian", "zero", "mean")
SCORES_DIR = "scores"


def scores_dir(run: str | Path, subtask: Optional[str] = None) -> Path:
    """The folder ``skillkern score --run RUN [--subtask K]`` writes: ``RUN/scores/<K or task>``."""
    return Path(run) / SCORES_DIR / (subtask.replace(":", "_").replace(",", "_") if subtask else "task")


def scores_path(run: str | Path, subtask: Optional[str] = None) -> Path:
    """Where ``skillkern score --run RUN [--subtask K]`` writes its stats file."""
    return scores_dir(run, subtask) / "stats.safetensors"


def score_run(run: str | Path, *, subtask: Optional[str] = None, max_baseline: Optional[int] = None,
              max_eval: Optional[int] = None, batch_size: int = 32, backend: str = "auto", device=None,
              data: Optional[str] = None, progress: bool = True, out: Optional[str | Path] = None,
              baseline_split: str = "train", eval_split: str = "dev", overwrite: bool = False,
              top: int = 10) -> tuple[NeuronStats, dict]:
    """Score the P prompt slots of a tuned run (pool ``prompt``) on the split it was tuned on.

    Validate, then work, then publish: the run folder, the output folder and the classes of both splits are
    checked before the model is loaded (README "Errors and safety"); the result folder (``stats.safetensors``,
    ``summary.json``, ``predictivity.png``) is written to a temporary sibling and moved into place at the end.

    Args:
        run: run folder from :func:`skillkern.tune.tune_run`.
        subtask: score on a binary sub-task of the run's task (``pn``, ``neu``, ...) with the same prompt.
        max_baseline, max_eval: first N rows of the baseline (train) / evaluation (dev) split; default: the
            run's own ``max_train`` / ``max_dev`` caps, so the dev rows are exactly those the prompt was
            selected on and never its training rows.
        out: output folder (default ``RUN/scores/<subtask or task>``).
        overwrite: replace an earlier result in ``out`` (otherwise refused).
        top: how many top neurons ``summary.json`` lists.

    Returns:
        ``(stats, metadata)``; the folder is written too.
    """
    import time

    from . import __version__
    from .data import binary_subtask, check_split_classes
    from .models import model_id
    from .batching import check_rows_differ, take
    from .scoring import ScoreSettings, Scorer
    from .stats import write_score_files
    from .tune import TuneSettings, check_run, load_run, load_run_task

    folder = Path(out) if out is not None else scores_dir(run, subtask)
    check_out_dir(folder, kind="scores", flag="--out" if out is not None else "the scores folder",
                  overwrite=overwrite, inputs=[("run folder", run)])
    info = check_run(run)
    s = TuneSettings(**info["settings"])
    task = run_task = load_run_task(info, data)
    if subtask:
        if info.get("subtask"):
            raise ValueError(f"--subtask {subtask}: run {run} is already on sub-task {info['subtask']!r}")
        task = binary_subtask(task, subtask, seed=s.split_seed)
    max_baseline = s.max_train if max_baseline is None else max_baseline
    max_eval = s.max_dev if max_eval is None else max_eval
    baseline = take(task.split(baseline_split), max_baseline)
    evaluation = take(task.split(eval_split), max_eval)
    check_split_classes(evaluation, task.label_names, f"the evaluation split {eval_split!r} of {run}",
                        require_two=True, why="predictivity (how well a neuron separates classes) is undefined",
                        hint="use more rows (--max-eval) or a run tuned with more dev rows")
    check_split_classes(baseline, task.label_names, f"the baseline split {baseline_split!r} of {run}")
    pm, _, info = load_run(run, device=device, data=data, task=run_task)  # the run's head: the run's classes
    check_rows_differ(pm.tokenizer, evaluation, s.max_length, f"the evaluation split {eval_split!r} of {run}",
                      required=True, hint="the run's --max-length is too short for this data")
    check_rows_differ(pm.tokenizer, baseline, s.max_length, f"the baseline split {baseline_split!r} of {run}",
                      required=False)
    if pm.prompt_len:
        settings = ScoreSettings(pool="slots", slots=pm.slots, max_length=s.max_length, batch_size=batch_size,
                                 backend=backend)
    else:  # BitFit run: no prompt slots; read the first token like its head does
        settings = ScoreSettings(pool="cls", max_length=s.max_length, batch_size=batch_size, backend=backend)
    scorer = Scorer(pm.backbone, pm.tokenizer, task.num_classes, settings, progress=progress,
                    forward=lambda _m, batch: pm(**batch.inputs))
    started = time.perf_counter()
    stats = scorer.score(baseline, evaluation)
    meta = {
        "skillkern_version": __version__, "model": model_id(pm.backbone), "model_type": info["model_type"],
        "task": task.name, "task_source": task.source, "label_names": task.label_names,
        "subtask": subtask or info.get("subtask"), "run": str(run), "pool": "prompt" if pm.prompt_len else "cls",
        "prompt": info.get("prompt", "tuned"), "head": info["head_description"],
        "baseline_split": baseline_split, "eval_split": eval_split, "baseline_rows": len(baseline),
        "eval_rows": len(evaluation), "split_seed": s.split_seed, "settings": settings.to_dict(),
        "layers": len(scorer.layers), "width": scorer.width, "backends": scorer.backends,
        "neuron_path": scorer.path,
    }
    with staged_dir(folder) as tmp:
        write_score_files(tmp, stats, meta, top=top, title=f"{task.name}: prompt slots of {run}",
                          extra={"seconds": round(time.perf_counter() - started, 3)})
    return stats, meta


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
    tasks, 2q per layer), else the top ``q`` of the task's predictivity."""
    if "pn" in preds and "neu" in preds:
        return select_multiclass(preds["pn"], preds["neu"], q)
    if "task" in preds:
        return select_per_layer(preds["task"], q)
    raise ValueError(f"cannot select neurons from scores {sorted(preds)}: need 'task', or both 'pn' and 'neu'")


def random_selection(counts: Sequence[int], width: int, seed: int) -> list[torch.Tensor]:
    """The control: per layer, ``counts[l]`` neurons drawn uniformly without replacement (seeded)."""
    gen = torch.Generator().manual_seed(int(seed))
    return [torch.randperm(width, generator=gen)[:k].sort().values for k in counts]


def perturbation(selection: Sequence[torch.Tensor], mode: str = "gaussian", sigma: float = 0.1,
                 baseline: Optional[torch.Tensor] = None, seed: int = 0) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """An ``edit_neurons`` function perturbing ``selection[layer]`` at every position.

    Args:
        selection: per-layer int64 neuron indices (an empty tensor leaves that layer alone).
        mode: ``gaussian``, ``zero`` or ``mean``.
        baseline: (L, D) values for ``mean`` mode.
        seed: seeds the gaussian noise generator.

    Returns:
        ``fn(layer, h) -> h`` for :func:`skillkern.models.edit_neurons`; h is (B, T, D).
    """
    if mode not in MODES:
        raise ValueError(f"unknown perturbation mode {mode!r}; choose one of {MODES}")
    if mode == "mean" and baseline is None:
        raise ValueError("mode='mean' needs the baseline (L, D) activations")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    gen = torch.Generator().manual_seed(int(seed))
    cache: dict = {}

    def fn(layer: int, h: torch.Tensor) -> torch.Tensor:
        idx = selection[layer]
        if idx.numel() == 0:
            return h
        key = (layer, h.device)
        if key not in cache:
            cache[key] = idx.to(h.device)
        idx_d = cache[key]
        h = h.clone()
        if mode == "gaussian":
            # one noise vector per sample, shared by its positions; drawn on the CPU for reproducibility
            noise = torch.randn(h.shape[0], 1, idx.numel(), generator=gen) * sigma
            h[..., idx_d] += noise.to(h.device, h.dtype)
        elif mode == "zero":
            h[..., idx_d] = 0
        else:
            h[..., idx_d] = baseline[layer, idx].to(h.device, h.dtype)
        return h

    return fn


PERTURB_KIND = "skillkern-perturbation"


def is_perturbation_file(path: str | Path) -> bool:
    """True when ``path`` holds a perturbation result (what ``skillkern perturb --overwrite`` may replace)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and (value.get("kind") == PERTURB_KIND
                                        or {"fractions", "skill", "random", "mode"} <= set(value))


def default_perturb_out(run: str | Path, mode: str, neurons_from: Optional[str | Path] = None) -> Path:
    """``RUN/perturb_<mode>[_from_<other run>].json``."""
    suffix = f"_from_{Path(neurons_from).name}" if neurons_from else ""
    return Path(run) / f"perturb_{mode}{suffix}.json"


def save_perturbation(result: dict, out: str | Path) -> tuple[Path, Path]:
    """Write ``out`` (JSON) and its picture ``out`` with suffix .png, each atomically; the JSON, the result,
    goes last. Returns both paths."""
    from .plotting import plot_perturbation

    out = Path(out)
    png = out.with_suffix(".png")
    atomic_write(png, lambda tmp: plot_perturbation(result, tmp))
    atomic_write_json(out, result)
    return out, png


def perturb_run(run: str | Path, *, mode: str = "gaussian", fractions: Sequence[float] = (0.0, 0.01, 0.05, 0.1, 0.2),
                neurons_from: Optional[str | Path] = None, sigma: float = 0.1, seed: int = 0,
                max_test: Optional[int] = None, split: str = "test", batch_size: int = 32, device=None,
                data: Optional[str] = None, progress: bool = True) -> dict:
    """Accuracy of a run's model with its (or another run's) skill neurons perturbed, beside the random control.

    The run, the scores the neurons come from and the split are checked before the model is loaded.

    Args:
        run: the run whose model and task are evaluated.
        neurons_from: take the skill neurons from this run's scores instead (cross-task perturbation).
        fractions: values of q (per-layer fraction; multi-class tasks perturb 2q per layer by the union rule).
        max_test: first N rows of the test split (default: the run's ``max_test``).

    Returns:
        JSON-ready dict with ``accuracy`` lists for ``skill`` and ``random`` per fraction, neuron counts, settings.
    """
    from tqdm.auto import tqdm

    from .batching import take
    from .data import check_split_classes
    from .models import ffn_layers
    from .tune import TuneSettings, check_run, evaluate, load_run, load_run_task, read_run

    if mode not in MODES:
        raise ValueError(f"unknown perturbation mode {mode!r}; choose one of {MODES}")
    if any(not 0 <= q <= 1 for q in fractions):
        raise ValueError(f"fractions must be in [0, 1], got {list(fractions)}")
    info = check_run(run)
    s = TuneSettings(**info["settings"])
    source = Path(neurons_from) if neurons_from is not None else Path(run)
    source_info = info if neurons_from is None else read_run(source, "--neurons-from")
    preds = run_predictivity(source)
    skill_selection(preds, 0.0)  # scores that cannot give a selection fail now, not after loading the model
    width = next(iter(preds.values())).shape[1]
    baseline = None
    if mode == "mean":
        stats_file = next(p for p in (scores_path(source), scores_path(source, "pn")) if p.is_file())
        baseline = NeuronStats.load(stats_file)[0].threshold.mean(dim=1)  # average over prompt slots
    task = load_run_task(info, data)
    test = take(task.split(split), s.max_test if max_test is None else max_test)
    check_split_classes(test, task.label_names, f"the {split!r} split of {run}")
    pm, task, info = load_run(run, device=device, data=data, task=task)
    widths = [layer.width for layer in ffn_layers(pm.backbone)]
    shape = tuple(next(iter(preds.values())).shape)
    if (len(widths), max(widths)) != shape or min(widths) != max(widths):
        flag = "--neurons-from" if neurons_from is not None else "--run"
        raise ValueError(f"{flag} {source}: its scores cover {shape[0]} layers x {shape[1]} neurons, but the model "
                         f"of {run} has {len(widths)} layers of widths {sorted(set(widths))}; take the neurons "
                         "of a run on the same model")
    clean = evaluate(pm, test, batch_size, s.max_length)
    rows = []
    for i, q in enumerate(tqdm(list(fractions), desc=f"perturb ({mode})", disable=not progress, leave=False)):
        skill = skill_selection(preds, q)
        counts = [int(t.numel()) for t in skill]
        if sum(counts) == 0:
            rows.append({"fraction": q, "neurons_per_layer": counts, "skill": clean, "random": clean})
            continue
        control = random_selection(counts, width, seed=seed * 7919 + i)
        acc_skill = evaluate(pm, test, batch_size, s.max_length,
                             edit=perturbation(skill, mode, sigma, baseline, seed=seed * 104729 + i))
        acc_random = evaluate(pm, test, batch_size, s.max_length,
                              edit=perturbation(control, mode, sigma, baseline, seed=seed * 104729 + i))
        rows.append({"fraction": q, "neurons_per_layer": counts, "skill": acc_skill, "random": acc_random})
        logger.info("q=%.2f: %d neurons, accuracy %.4f (skill) vs %.4f (random)", q, sum(counts), acc_skill,
                    acc_random)
    return {
        "kind": PERTURB_KIND,
        "run": str(run), "task": info["task"], "subtask": info.get("subtask"),
        "neurons_from": str(source), "neurons_task": source_info["task"],
        "selection": "union of pn/neu (METHOD.md 5)" if "pn" in preds and "neu" in preds else "per-layer top q",
        "mode": mode, "sigma": sigma if mode == "gaussian" else None, "seed": seed, "split": split,
        "test_rows": len(test), "clean_accuracy": clean, "head": info["head_description"],
        "fractions": [r["fraction"] for r in rows], "skill": [r["skill"] for r in rows],
        "random": [r["random"] for r in rows], "neurons_per_layer": [r["neurons_per_layer"] for r in rows],
    }
