"""Perturbing a run's skill neurons beside a random control (the run's scores and skill selection are
:mod:`skillkern.runs`'s).

METHOD.md sections 4-6. The selected neurons are perturbed at every token position of the chosen layers:

- ``gaussian``: ``a += eps``, ``eps ~ N(0, sigma^2)``, one noise vector per sample shared by its positions, redrawn
  every forward pass (from a seeded generator, so a perturbation run is reproducible). With ``noise="neuron"``
  neuron i's noise is ``N(0, (sigma * std_i)^2)``, ``std_i`` its own activation standard deviation over the real
  token positions of the run's first training rows (:func:`neuron_std`): a fixed sigma ignores each model's
  activation scale;
- ``zero``: ``a = 0``;
- ``mean``: ``a = threshold`` averaged over the prompt slots (:func:`skillkern.runs.prompt_thresholds`).

The control perturbs, in each layer, the same number of neurons drawn at random, ``draws`` times (independent
seeded draws): ``uniform`` draws them uniformly (the paper's control); ``matched`` first finds the layer's
*massive-activation* neurons (:func:`massive_neurons`: an RMS activation over ``outlier_factor`` times the layer's
median, over the same training rows as ``noise="neuron"``) and draws as many of them as the skill selection of
that layer holds (usually none), the rest uniformly from the other neurons. In all-MiniLM-L6-v2 five such neurons
(RMS 24-37x the median; the next is 9x) break the model to chance when perturbed alone, so a uniform control's
accuracy mostly says whether a draw hit one of them. Skill and control are judged on the same test rows by a
paired test (:func:`paired_difference`): a bootstrap over rows (and draws, and runs) gives a confidence interval on
the accuracy difference, and McNemar's exact test compares the skill perturbation with each random draw.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
import math
from typing import Callable, Optional, Sequence

import torch

from .batching import take
from .files import atomic_write, atomic_write_json
from .runs import (check_run, load_run, load_run_task, prompt_thresholds, read_run, run_predictivity, run_splits,
                   skill_selection)
from .tune import TuneSettings, correct_rows

logger = logging.getLogger(__name__)

MODES = ("gaussian", "zero", "mean")
NOISE_SCALES = ("fixed", "neuron")
CONTROLS = ("uniform", "matched")
#: default RMS factor over the layer median that makes a neuron massive (all-MiniLM-L6-v2: 24-37x vs at most 9x)
OUTLIER_FACTOR = 16.0


def massive_neurons(rms: torch.Tensor, factor: float = OUTLIER_FACTOR) -> list[torch.Tensor]:
    """Per layer, the int64 indices of the neurons whose RMS activation exceeds ``factor`` times the layer's
    median RMS.

    Args:
        rms: (L, D) root mean square activation of every neuron (over real token positions).
    """
    if not factor > 0:
        raise ValueError(f"the outlier factor must be positive, got {factor!r}")
    med = rms.median(dim=1, keepdim=True).values
    return [torch.nonzero(row > factor * m).flatten() for row, m in zip(rms, med)]


def random_selection(counts: Sequence[int], width: int, seed: int, *, skill: Optional[Sequence[torch.Tensor]] = None,
                     massive: Optional[Sequence[torch.Tensor]] = None) -> list[torch.Tensor]:
    """The control: per layer, ``counts[l]`` neurons drawn without replacement (seeded).

    Uniform without ``massive``. With ``massive`` (per-layer indices, :func:`massive_neurons`) and ``skill`` (the
    skill selection, per layer), the matched control: as many massive neurons as ``skill[l]`` holds, drawn from
    ``massive[l]``, and the rest uniformly from the other neurons of the layer.
    """
    gen = torch.Generator().manual_seed(int(seed))
    if massive is None:
        return [torch.randperm(width, generator=gen)[:k].sort().values for k in counts]
    if skill is None:
        raise ValueError("the matched control needs the skill selection")
    out = []
    for k, sel, big in zip(counts, skill, massive):
        is_big = torch.zeros(width, dtype=torch.bool)
        is_big[big] = True
        m = int(is_big[sel].sum())
        rest = torch.nonzero(~is_big).flatten()
        pick = torch.cat([big[torch.randperm(big.numel(), generator=gen)[:m]],
                          rest[torch.randperm(rest.numel(), generator=gen)[:k - m]]])
        out.append(pick.sort().values)
    return out


def perturbation(selection: Sequence[torch.Tensor], mode: str = "gaussian", sigma: float = 0.1,
                 prompt_thresholds: Optional[torch.Tensor] = None, seed: int = 0,
                 scale: Optional[torch.Tensor] = None) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """An ``edit_neurons`` function perturbing ``selection[layer]`` at every position.

    Args:
        selection: per-layer int64 neuron indices (an empty tensor leaves that layer alone).
        mode: ``gaussian``, ``zero`` or ``mean``.
        prompt_thresholds: (L, D) the value ``mean`` mode sets: the thresholds averaged over the prompt slots
            (:func:`skillkern.runs.prompt_thresholds`).
        seed: seeds the gaussian noise generator.
        scale: optional (L, D) per-neuron factor of the gaussian noise (``noise="neuron"``: each neuron's
            activation standard deviation); the noise of neuron i is then ``N(0, (sigma * scale_i)^2)``.

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
            if scale is not None:
                noise = noise * scale[layer, idx].to(noise.dtype)
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
                neurons_from: Optional[str | Path] = None, sigma: float = 0.1, noise: str = "fixed",
                draws: int = 3, seed: int = 0, max_test: Optional[int] = None, split: str = "test",
                batch_size: int = 32, device=None, data: Optional[str] = None, std_rows: int = 256,
                control: str = "uniform", outlier_factor: float = OUTLIER_FACTOR, progress: bool = True) -> dict:
    """Accuracy of a run's model with its (or another run's) skill neurons perturbed, beside the random control.

    The run, the scores the neurons come from and the split are checked before the model is loaded.

    Args:
        run: the run whose model and task are evaluated.
        neurons_from: take the skill neurons from this run's scores instead (cross-task perturbation).
        fractions: values of q (per-layer fraction; multi-class tasks perturb 2q per layer by the union rule).
        noise: ``fixed`` (gaussian sigma) or ``neuron`` (sigma times each neuron's activation std,
            :func:`neuron_std` over the first ``std_rows`` training rows).
        draws: independent random controls per fraction.
        seed: seeds the noise and the random draws (give independent runs different seeds: the same seed draws the
            same random neurons in every run of a model).
        control: ``uniform`` or ``matched`` (massive-activation neurons matched to the skill selection; the
            moments come from the first ``std_rows`` training rows, :func:`token_moments`).
        outlier_factor: RMS over the layer median that makes a neuron massive (``matched``).
        max_test: first N rows of the test split (default: the run's ``max_test``).

    Returns:
        JSON-ready dict: per fraction the ``skill`` accuracy, the mean ``random`` accuracy and each draw's
        (``random_draws``), the paired difference skill - random with its 95% bootstrap interval
        (``difference``, ``difference_ci``), McNemar's exact p-value against each draw (``mcnemar_p``), neuron
        counts, settings, and the per-row outcomes (``outcomes``: :func:`encode_outcomes` strings) that let
        later analyses pool runs.
    """
    from .data import check_split_classes
    from .models import ffn_layers

    if mode not in MODES:
        raise ValueError(f"unknown perturbation mode {mode!r}; choose one of {MODES}")
    if noise not in NOISE_SCALES:
        raise ValueError(f"unknown noise scale {noise!r}; choose one of {NOISE_SCALES}")
    if any(not 0 <= q <= 1 for q in fractions):
        raise ValueError(f"fractions must be in [0, 1], got {list(fractions)}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws!r}")
    if control not in CONTROLS:
        raise ValueError(f"unknown control {control!r}; choose one of {CONTROLS}")
    if not outlier_factor > 0:
        raise ValueError(f"the outlier factor must be positive, got {outlier_factor!r}")
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
    scale = massive = None
    if (mode == "gaussian" and noise == "neuron") or control == "matched":
        moments = token_moments(pm, take(run_splits(task, s)[0], std_rows), batch_size, s.max_length)
        if mode == "gaussian" and noise == "neuron":
            scale = moments.variance().sqrt()
        if control == "matched":
            massive = massive_neurons(moments.l2_norm() / math.sqrt(moments.positions()), outlier_factor)  # RMS
    clean_rows = correct_rows(pm, test, batch_size, s.max_length)
    rows = _curve(pm, test, preds, fractions, clean_rows=clean_rows, mode=mode, sigma=sigma, scale=scale,
                  prompt_thresholds=values, draws=draws, seed=seed, batch_size=batch_size,
                  max_length=s.max_length, massive=massive, progress=progress)
    return {
        "kind": PERTURB_KIND,
        "run": str(run), "task": info["task"], "subtask": info.get("subtask"),
        "neurons_from": str(source), "neurons_task": source_info["task"],
        "selection": "union of pn/neu (METHOD.md 5)" if "pn" in preds and "neu" in preds else "per-layer top q",
        "mode": mode, "sigma": sigma if mode == "gaussian" else None,
        "noise": noise if mode == "gaussian" else None,
        "noise_std_rows": min(std_rows, info["rows"]["train"]) if scale is not None else None,
        "control": control, "outlier_factor": outlier_factor if massive is not None else None,
        "massive_neurons": [t.tolist() for t in massive] if massive is not None else None,
        "skill_massive": [r["skill_massive"] for r in rows] if massive is not None else None,
        "draws": draws, "seed": seed, "split": split,
        "test_rows": len(test), "clean_accuracy": float(clean_rows.double().mean()), "head": info["head_description"],
        "fractions": [r["fraction"] for r in rows], "skill": [r["skill"] for r in rows],
        "random": [r["random"] for r in rows], "random_draws": [r["random_draws"] for r in rows],
        "difference": [r["difference"] for r in rows], "difference_ci": [r["difference_ci"] for r in rows],
        "mcnemar_p": [r["mcnemar_p"] for r in rows],
        "neurons_per_layer": [r["neurons_per_layer"] for r in rows],
        "outcomes": {"clean": encode_outcomes(clean_rows), "skill": [r["outcomes"][0] for r in rows],
                     "random": [r["outcomes"][1] for r in rows]},
    }


def _curve(pm, test: list, preds: dict, fractions: Sequence[float], *, clean_rows: torch.Tensor, mode: str,
           sigma: float, scale: Optional[torch.Tensor], prompt_thresholds: Optional[torch.Tensor], draws: int,
           seed: int, batch_size: int, max_length: int, massive: Optional[list], progress: bool) -> list:
    """Per-row outcomes with the skill neurons, then ``draws`` times as many random ones, perturbed, for each q
    (``massive``: per-layer massive-activation neurons for the matched control, or None for uniform)."""
    from tqdm.auto import tqdm

    width = next(iter(preds.values())).shape[1]
    rows = []
    for i, q in enumerate(tqdm(list(fractions), desc=f"perturb ({mode})", disable=not progress, leave=False)):
        skill = skill_selection(preds, q)
        counts = [int(t.numel()) for t in skill]

        def run(selection, k):  # k = 0: the skill pass; k = d + 1: random draw d (each its own noise seed)
            if sum(counts) == 0:
                return clean_rows
            edit = perturbation(selection, mode, sigma, prompt_thresholds, seed=seed * 104729 + i * 1009 + k,
                                scale=scale)
            return correct_rows(pm, test, batch_size, max_length, edit=edit)

        skill_rows = run(skill, 0)
        # draw 0 keeps the single control of earlier versions (seed * 7919 + i); later draws get their own seeds
        random_rows = torch.stack([run(random_selection(counts, width, seed=seed * 7919 + i + 1_000_003 * d,
                                                        skill=skill, massive=massive), d + 1)
                                   for d in range(draws)])
        test_ = paired_difference(skill_rows[None], random_rows[None], seed=seed * 31 + i)
        acc_random = [float(r.double().mean()) for r in random_rows]
        rows.append({"fraction": q, "neurons_per_layer": counts, "skill": float(skill_rows.double().mean()),
                     "random": float(sum(acc_random) / draws), "random_draws": acc_random,
                     "difference": test_["difference"], "difference_ci": test_["ci"],
                     "mcnemar_p": [mcnemar_p(skill_rows, r) for r in random_rows],
                     "skill_massive": None if massive is None else [int(torch.isin(a, b).sum())
                                                                    for a, b in zip(skill, massive)],
                     "outcomes": (encode_outcomes(skill_rows), [encode_outcomes(r) for r in random_rows])})
        logger.info("q=%.2f: %d neurons, accuracy %.4f (skill) vs %.4f (random, %d draws); difference %+.4f "
                    "[%+.4f, %+.4f]", q, sum(counts), rows[-1]["skill"], rows[-1]["random"], draws,
                    test_["difference"], *test_["ci"])
    return rows


def token_moments(pm, examples: Sequence, batch_size: int = 32, max_length: int = 128):
    """The :class:`~skillkern.stats.NeuronMoments` of every FFN neuron over every real token position (prompt
    slots included) of ``examples`` through the clean prompted model ``pm``: the streaming moments pass
    (:func:`skillkern.scoring.collect_moments`)."""
    from .scoring import collect_moments

    return collect_moments(pm.backbone, pm.tokenizer, examples, positions="tokens",
                           forward=lambda _model, batch: pm(**batch.inputs), batch_size=batch_size,
                           max_length=max_length)


def neuron_std(pm, examples: Sequence, batch_size: int = 32, max_length: int = 128) -> torch.Tensor:
    """(L, D) float64: each neuron's activation standard deviation (sample, n - 1) over every real token position
    of ``examples`` (:func:`token_moments`; the one-pass variance's rounding error is bounded in
    :mod:`skillkern.stats`)."""
    return token_moments(pm, examples, batch_size, max_length).variance().sqrt()


def encode_outcomes(correct: torch.Tensor) -> str:
    """(N,) bool -> a compact string (hex digits of the bits, 4 rows each, first row in the highest bit), so a
    result file keeps every row's outcome in N/4 characters; :func:`decode_outcomes` inverts it."""
    bits = correct.to(torch.uint8).tolist()
    bits += [0] * (-len(bits) % 4)
    return f"{len(correct)}:" + "".join(f"{b[0] * 8 + b[1] * 4 + b[2] * 2 + b[3]:x}"
                                        for b in zip(*(iter(bits),) * 4))


def decode_outcomes(text: str) -> torch.Tensor:
    """Inverse of :func:`encode_outcomes`: (N,) bool."""
    n, digits = text.split(":")
    bits = [(int(c, 16) >> k) & 1 for c in digits for k in (3, 2, 1, 0)]
    return torch.tensor(bits[: int(n)], dtype=torch.bool)


def paired_difference(skill: torch.Tensor, random: torch.Tensor, n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> dict:
    """Accuracy difference skill - random on the same test rows, with a paired bootstrap interval.

    Args:
        skill: (K, N) bool: K runs (seeds) x N test rows, the outcome with the skill neurons perturbed.
        random: (K, R, N) bool: the same runs and rows under R random draws.
        n_boot: bootstrap resamples; each draws K runs, N rows (the same rows for every run: they share the test
            split) and R draws with replacement, so the interval covers the spread of runs, rows and draws.

    Returns:
        ``{"difference": mean(skill) - mean(random), "ci": [low, high], "level": level, "n_boot": n_boot}``.
    """
    skill = skill.to(torch.float64)
    random = random.to(torch.float64)
    if skill.dim() != 2 or random.dim() != 3 or random.shape[0] != skill.shape[0] or random.shape[2] != skill.shape[1]:
        raise ValueError(f"skill must be (K, N) and random (K, R, N), got {tuple(skill.shape)} and "
                         f"{tuple(random.shape)}")
    K, R, N = random.shape
    gen = torch.Generator().manual_seed(int(seed))
    diff = float(skill.mean() - random.mean())
    per_row = skill[:, None, :] - random                                                # (K, R, N)
    out = torch.empty(n_boot, dtype=torch.float64)
    for b in range(n_boot):
        k = torch.randint(K, (K,), generator=gen)
        r = torch.randint(R, (R,), generator=gen)
        n = torch.randint(N, (N,), generator=gen)
        out[b] = per_row[k][:, r][:, :, n].mean()
    alpha = (1 - level) / 2
    low, high = torch.quantile(out, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return {"difference": diff, "ci": [low, high], "level": level, "n_boot": n_boot}


def mcnemar_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sided exact McNemar p-value for paired (N,) bool outcomes: the discordant rows (right under one, wrong
    under the other) are Binomial(n_discordant, 1/2) when both conditions are equally accurate."""
    a, b = a.bool(), b.bool()
    n01 = int((a & ~b).sum())
    n10 = int((~a & b).sum())
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2 * tail)
