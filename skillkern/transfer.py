"""Prompt transferability (METHOD.md 7): does task A's prompt help task B, and which indicator predicts it?

Real transfer of an ordered pair A -> B: A's trained prompt (and its head: a linear head when A and B have the same
number of labels, the verbalizer head's temperature always) initialises B's tuning; B's accuracy is measured
zero-shot and after a short tuning budget, beside the same budget from B's usual initialisation ("from scratch").
Two indicators, each a Jaccard overlap of two (L, D) boolean neuron masks:

* Su et al.'s *activated-neuron overlap*: the neurons each prompt activates (> 0 at a prompt slot on a majority of
  fixed probe texts), :func:`activated_neurons`;
* the *skill-neuron overlap*: the top q of each layer by predictivity, :func:`skill_neurons`.

Over many pairs, each indicator is compared with each real-transfer metric by a Spearman rank correlation
(:func:`spearman`) with a two-sided permutation p-value (:func:`permutation_p`); :func:`correlate` does it for
every (indicator, metric). ``experiments/run_applications.py`` runs this over the study's tasks and seeds.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: the two indicators, as keys of a pair's record
INDICATORS = ("overlap_indicator", "skill_indicator")
#: the real-transfer metrics of a pair: zero-shot accuracy on B (None across label counts), accuracy after the
#: tuning budget, both over B's own prompt accuracy (Su et al.'s relative performance), and the gain after the
#: budget over the same budget from scratch
TRANSFER_METRICS = ("zero_shot", "after_steps", "relative_zero_shot", "relative_after_steps", "gain_over_scratch")


# ------------------------------------------------------------------------------------------------- statistics
def _ranks(x: np.ndarray) -> np.ndarray:
    """0-based ranks of ``x`` (n,), ties given the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inv, weights=r) / counts)[inv]


def spearman(a, b) -> float:
    """Spearman rank correlation of two samples: the Pearson correlation of their ranks (ties: mean rank).

    Args:
        a, b: (n,) numbers (numpy arrays, tensors or sequences; a tensor of any shape is flattened).

    Returns:
        rho in [-1, 1], or nan when either sample is constant (its ranks have no spread).
    """
    ra, rb = _ranks(np.asarray(a, dtype=np.float64).ravel()), _ranks(np.asarray(b, dtype=np.float64).ravel())
    if len(ra) != len(rb):
        raise ValueError(f"spearman needs samples of one length, got {len(ra)} and {len(rb)}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom else float("nan")


def permutation_p(x, y, rho: Optional[float] = None, n: int = 2000, seed: int = 0) -> float:
    """Two-sided permutation p-value of the Spearman correlation of ``x`` and ``y`` (n,).

    The share of ``n`` random permutations of ``y`` whose correlation with ``x`` is at least as large in absolute
    value as the observed ``rho`` (computed when not given), counting the observed order as one permutation:
    ``(hits + 1) / (n + 1)``, so the smallest possible value is ``1 / (n + 1)``. Seeded: reproducible.
    Returns nan when ``rho`` is nan (a constant sample).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rho = spearman(x, y) if rho is None else rho
    if math.isnan(rho):
        return float("nan")
    g = np.random.default_rng(seed)
    hits = sum(abs(spearman(x, g.permutation(y))) >= abs(rho) - 1e-12 for _ in range(n))  # -eps: exact ties count
    return (hits + 1) / (n + 1)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Jaccard overlap ``|a & b| / |a | b|`` of two boolean masks of one shape, e.g. (L, D) neurons; 0 when both
    are empty."""
    if a.shape != b.shape:
        raise ValueError(f"jaccard needs masks of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a & b).sum()) / max(1.0, float((a | b).sum()))


# ------------------------------------------------------------------------------------------------- indicators
@torch.no_grad()
def activated_neurons(pm, probe: Sequence, batch_size: int = 32, max_length: int = 64) -> torch.Tensor:
    """Su et al.'s indicator input: the neurons a prompt activates.

    Args:
        pm: a :class:`~skillkern.prompt.PromptModel` (its prompt occupies the first ``pm.prompt_len`` positions).
        probe: the probe rows (examples with text), the same for every prompt compared.

    Returns:
        (L, D) bool: the neuron's activation is > 0 at one prompt slot or more on a strict majority of the rows.
    """
    from .models import capture_neurons
    from .batching import iter_batches

    if not len(probe):
        raise ValueError("activated_neurons needs at least one probe row")
    counts: dict[int, torch.Tensor] = {}

    def count(layer: int, h: torch.Tensor) -> None:  # h: (B, T, D); rows with a slot > 0, per neuron
        hit = (h[:, : pm.prompt_len] > 0).any(1).sum(0)
        counts[layer] = counts[layer] + hit if layer in counts else hit

    device = next(pm.backbone.parameters()).device
    with capture_neurons(pm.backbone, count):
        for batch in iter_batches(pm.tokenizer, probe, batch_size, max_length, pad_multiple=0, device=device):
            pm(**batch.inputs)
    return torch.stack([counts[i].cpu() for i in sorted(counts)]) * 2 > len(probe)


def task_predictivity(preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One (L, D) predictivity of a scored run: the task's, or for a 3-class task scored on its pn and neu
    sub-tasks the larger of the two per neuron (so the skill masks of all tasks have one size).

    Args:
        preds: ``{"task": (L, D)}`` and/or ``{"pn": (L, D), "neu": (L, D)}``
            (:func:`skillkern.runs.run_predictivity`).
    """
    if "task" in preds:
        return preds["task"]
    if "pn" in preds and "neu" in preds:
        return torch.maximum(preds["pn"], preds["neu"])
    raise ValueError(f"cannot combine predictivities {sorted(preds)}: need 'task', or both 'pn' and 'neu'")


def skill_neurons(pred: torch.Tensor, q: float) -> torch.Tensor:
    """The skill-neuron mask: the top ``int(q * D)`` neurons of each layer of ``pred`` (L, D) by predictivity
    (:func:`skillkern.stats.select_per_layer`). Returns (L, D) bool."""
    from .stats import select_per_layer

    mask = torch.zeros(pred.shape, dtype=torch.bool)
    for layer, idx in enumerate(select_per_layer(pred, q)):
        mask[layer, idx] = True
    return mask


# ------------------------------------------------------------------------------------------------ real transfer
def transfer_settings(info_b: dict, steps: int, test_rows: int):
    """B's own tuning settings (from its run.json ``info_b``) with a budget of ``steps`` optimizer steps, no dev
    evaluation in between, and ``test_rows`` dev and test rows."""
    from .tune import TuneSettings

    s = info_b["settings"]
    return TuneSettings(**{**s, "epochs": steps * s["batch_size"] / info_b["rows"]["train"], "eval_every": 10 ** 9,
                           "max_test": test_rows, "max_dev": test_rows})


def head_matches(state: Mapping[str, torch.Tensor], pm) -> bool:
    """Whether a run's trained ``state`` holds exactly the trained tensors of ``pm``'s head, of the same shapes:
    then the head carries over with the prompt. A linear head needs the same label count; the verbalizer head
    (one temperature; the class words are B's) and the masked-LM head (nothing trained) always carry."""
    head = dict(pm.head.named_parameters()) if pm.head is not None else {}
    keys = {k[5:] for k in state if k.startswith("head.")}
    return keys == set(head) and all(state["head." + k].shape == head[k].shape for k in keys)


def transfer_pair(run_a: str | Path, run_b: str | Path, out: str | Path, *, steps: int = 20, test_rows: int = 200,
                  state: Optional[dict] = None, progress: bool = False) -> dict:
    """Real transfer A -> B: A's prompt (and head, when the label counts match) initialises B's tuning.

    Args:
        run_a, run_b: run folders (``skillkern tune``) of one model.
        out: the run folder of the transferred tuning (replaced if it exists: a run killed before its pair was
            recorded leaves one).
        steps: tuning budget on B, in optimizer steps (B's batch size and learning rate).
        test_rows: the first ``test_rows`` test rows of B (and dev rows).
        state: A's trained tensors, when the caller has loaded them already.

    Returns:
        ``{"zero_shot": accuracy of A's prompt and head on B before tuning, None across label counts,
        "after_steps", "steps", "head_carried", "own_accuracy": B's own prompt's test accuracy, "seconds"}``.
    """
    from .runs import load_run, read_prompt, read_run, run_splits, tune_run
    from .tune import evaluate

    if state is None:
        state = read_prompt(run_a)
    info_b = read_run(run_b)
    s = transfer_settings(info_b, steps, test_rows)
    pm, task, _ = load_run(run_b)
    with_head = head_matches(state, pm)
    init = state if with_head else {k: v for k, v in state.items() if not k.startswith("head.")}
    zero = None
    if with_head:
        pm.load_trained_state(init)
        zero = evaluate(pm, run_splits(task, s)[2], 32, s.max_length)
    t0 = time.perf_counter()
    label = f"initialised from {read_run(run_a)['task']}" + ("" if with_head else " (prompt only, fresh head)")
    r = tune_run(info_b["model"], task, s, out, progress=progress, init_state=init, label=label, overwrite=True)
    return {"zero_shot": zero, "after_steps": r["test_accuracy"], "steps": r["steps"], "head_carried": with_head,
            "own_accuracy": info_b["test_accuracy"], "seconds": round(time.perf_counter() - t0, 1)}


def scratch_accuracy(run_b: str | Path, out: str | Path, *, steps: int = 20, test_rows: int = 200,
                     progress: bool = False) -> float:
    """The reference of transfer: B's test accuracy after the same ``steps`` from its usual initialisation (B's
    settings and seed, as :func:`transfer_pair` uses them); the run is written to ``out`` (replaced)."""
    from .runs import load_run_task, read_run, tune_run

    info_b = read_run(run_b)
    return tune_run(info_b["model"], load_run_task(info_b), transfer_settings(info_b, steps, test_rows), out,
                    progress=progress, label="from scratch (the reference of transfer)",
                    overwrite=True)["test_accuracy"]


def add_relative_metrics(pairs: Mapping[str, dict], scratch: Mapping[str, float]) -> dict:
    """Each pair ``"A->B"`` with Su et al.'s relative performance (accuracy over B's own prompt accuracy, zero-shot
    and after the budget) and the gain over B's accuracy from scratch (``scratch[B]``). Returns new records."""
    out = {}
    for key, p in pairs.items():
        p = dict(p)
        p.setdefault("head_carried", True)  # records from before the field existed were all same-label-count
        p["relative_zero_shot"] = None if p["zero_shot"] is None else p["zero_shot"] / p["own_accuracy"]
        p["relative_after_steps"] = p["after_steps"] / p["own_accuracy"]
        p["gain_over_scratch"] = p["after_steps"] - scratch[key.split("->")[1]]
        out[key] = p
    return out


def mean_over_seeds(per_seed: Sequence[Mapping[str, dict]]) -> dict:
    """Pairwise means over seeds of every numeric field of the pair records (the keys of the first seed; a
    field None in any seed stays None; booleans are taken from the first seed)."""
    out = {}
    for k in per_seed[0]:
        entry = {}
        for f, v in per_seed[0][k].items():
            vals = [ps[k][f] for ps in per_seed]
            entry[f] = (None if any(x is None for x in vals) else vals[0] if isinstance(v, bool)
                        else float(np.mean(vals)))
        out[k] = entry
    return out


def correlate(pairs: Mapping[str, dict], keys: Optional[Iterable[str]] = None, n_permutations: int = 2000,
              ) -> tuple[dict, dict, dict]:
    """Spearman correlation of each indicator with each real-transfer metric over the pairs ``keys`` (default:
    all), each with its two-sided permutation p-value. A pair lacking a metric (None, e.g. zero-shot across label
    counts) is left out of that metric; fewer than 3 pairs give nan.

    Returns:
        ``(rho, p, counts)``: ``rho["<indicator>~<metric>"]``, ``p[...]`` alike, ``counts[metric]`` = pairs used.
    """
    keys = list(pairs) if keys is None else list(keys)
    corr, p_values, counts = {}, {}, {}
    for m in TRANSFER_METRICS:
        ks = [k for k in keys if pairs[k].get(m) is not None]
        y = np.array([pairs[k][m] for k in ks])
        for i in INDICATORS:
            x = np.array([pairs[k][i] for k in ks])
            rho = spearman(x, y) if len(ks) > 2 else float("nan")
            corr[f"{i}~{m}"], p_values[f"{i}~{m}"] = rho, permutation_p(x, y, rho, n=n_permutations)
        counts[m] = len(ks)
    return corr, p_values, counts
