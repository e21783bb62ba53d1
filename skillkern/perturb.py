"""Perturbing a run's skill neurons beside a random control (the run's scores and skill selection are
:mod:`skillkern.runs`'s).

METHOD.md sections 4-6. The selected neurons are perturbed at every token position of the chosen layers:

- ``gaussian``: ``a += eps``, ``eps ~ N(0, sigma^2)``, one noise vector per sample shared by its positions, redrawn
  every forward pass (from a seeded generator, so a perturbation run is reproducible);
- ``zero``: ``a = 0``;
- ``mean``: ``a = threshold`` averaged over the prompt slots (:func:`skillkern.runs.prompt_thresholds`).

The control perturbs, in each layer, the same number of neurons drawn uniformly at random (seeded).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .batching import take
from .files import atomic_write, atomic_write_json
from .runs import check_run, load_run, load_run_task, prompt_thresholds, read_run, run_predictivity, skill_selection
from .tune import TuneSettings, evaluate

logger = logging.getLogger(__name__)

MODES = ("gaussian", "zero", "mean")


def random_selection(counts: Sequence[int], width: int, seed: int) -> list[torch.Tensor]:
    """The control: per layer, ``counts[l]`` neurons drawn uniformly without replacement (seeded)."""
    gen = torch.Generator().manual_seed(int(seed))
    return [torch.randperm(width, generator=gen)[:k].sort().values for k in counts]


def perturbation(selection: Sequence[torch.Tensor], mode: str = "gaussian", sigma: float = 0.1,
                 prompt_thresholds: Optional[torch.Tensor] = None, seed: int = 0
                 ) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """An ``edit_neurons`` function perturbing ``selection[layer]`` at every position.

    Args:
        selection: per-layer int64 neuron indices (an empty tensor leaves that layer alone).
        mode: ``gaussian``, ``zero`` or ``mean``.
        prompt_thresholds: (L, D) the value ``mean`` mode sets: the thresholds averaged over the prompt slots
            (:func:`skillkern.runs.prompt_thresholds`).
        seed: seeds the gaussian noise generator.

    Returns:
        ``fn(layer, h) -> h`` for :func:`skillkern.models.edit_neurons`; h is (B, T, D).
    """
    if mode not in MODES:
        raise ValueError(f"unknown perturbation mode {mode!r}; choose one of {MODES}")
    if mode == "mean" and prompt_thresholds is None:
        raise ValueError("mode='mean' needs prompt_thresholds, the (L, D) thresholds averaged over the prompt slots")
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
            h[..., idx_d] = prompt_thresholds[layer, idx].to(h.device, h.dtype)
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
    from .data import check_split_classes
    from .models import ffn_layers

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
    values = prompt_thresholds(source) if mode == "mean" else None  # (L, D), for mode mean
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
    rows = _curve(pm, test, preds, fractions, clean=clean, mode=mode, sigma=sigma, prompt_thresholds=values,
                  seed=seed, batch_size=batch_size, max_length=s.max_length, progress=progress)
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


def _curve(pm, test: list, preds: dict, fractions: Sequence[float], *, clean: float, mode: str, sigma: float,
           prompt_thresholds: Optional[torch.Tensor], seed: int, batch_size: int, max_length: int,
           progress: bool) -> list:
    """Test accuracy with the skill neurons, then as many random ones, perturbed, for each fraction q."""
    from tqdm.auto import tqdm

    width = next(iter(preds.values())).shape[1]
    rows = []
    for i, q in enumerate(tqdm(list(fractions), desc=f"perturb ({mode})", disable=not progress, leave=False)):
        skill = skill_selection(preds, q)
        counts = [int(t.numel()) for t in skill]
        if sum(counts) == 0:
            rows.append({"fraction": q, "neurons_per_layer": counts, "skill": clean, "random": clean})
            continue
        control = random_selection(counts, width, seed=seed * 7919 + i)
        acc_skill = evaluate(pm, test, batch_size, max_length,
                             edit=perturbation(skill, mode, sigma, prompt_thresholds, seed=seed * 104729 + i))
        acc_random = evaluate(pm, test, batch_size, max_length,
                              edit=perturbation(control, mode, sigma, prompt_thresholds, seed=seed * 104729 + i))
        rows.append({"fraction": q, "neurons_per_layer": counts, "skill": acc_skill, "random": acc_random})
        logger.info("q=%.2f: %d neurons, accuracy %.4f (skill) vs %.4f (random)", q, sum(counts), acc_skill,
                    acc_random)
    return rows
