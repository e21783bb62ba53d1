"""Skill neurons against the structured-pruning criteria at the same widths (the comparison of issue 16).

    python experiments/run_pruning.py --runs runs/study/*/seed* --out experiments/study/pruning_criteria
    python experiments/run_pruning.py --quick --runs RUN [RUN ...] --out /tmp/pc      # a tiny smoke version (CI)

For every tuned and scored run folder given (a task's seeds are the runs of that task), every criterion of
``skillkern prune --criterion`` (skill, flap, wanda, magnitude, random; and ``skill+massive``: skill neurons with
``--keep-massive``, the layer's few massive-activation neurons kept first) and every kept fraction (2%, 10%, 25%,
50% of each pruned layer), one ``prune_run`` with ``--retune``: the test accuracy of the pruned model and of the pruned
model after a short re-tuning of the prompt. Every criterion keeps the same count per layer and folds the pruned
neurons at the same fill value (``--fill``, default ``tokens``: their mean over every real token of the training
rows, so that only the choice of neurons differs); the moments are computed once per run and reused.

Resumable: each cell (run, criterion, fraction) is one small JSON file,
``OUT/cells/<task>/seed<k>/<criterion>_<q>.json``, skipped when present; the pruned models go to ``--work`` and
are deleted once their cell is written. At the end
``OUT/pruning_criteria.json`` (means and 95% confidence intervals over seeds, the paired comparison of each
task-aware criterion with each task-agnostic one, and how many massive-activation neurons each criterion kept)
and ``OUT/pruning_criteria.png``. ``experiments/results_md.py`` turns
``experiments/study/pruning_criteria/pruning_criteria.json`` into a section of RESULTS.md with
:func:`criteria_table` (the PNG is :func:`plot_criteria`'s); nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from skillkern.files import atomic_write_text
from skillkern.prune import CRITERIA, prune_run, uses_moments
from skillkern.runs import load_run_task, read_run, run_splits
from skillkern.tune import TuneSettings

log = logging.getLogger("pruning")

FRACTIONS = (0.02, 0.1, 0.25, 0.5)
#: every criterion of ``skillkern prune``, and skill neurons with the massive-activation neurons kept first
DEFAULT_CRITERIA = CRITERIA + ("skill+massive",)
QUICK_FRACTIONS = (0.1, 0.5)
SETTINGS = ("pruned", "retuned")
#: two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: 1.96)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
#: a task "learns" when its unpruned test accuracy is above the majority-class rate by more than this (as
#: experiments/results_md.py decides which tasks stay at chance)
CHANCE_MARGIN = 0.03


# --------------------------------------------------------------------------------------------------- cells
def run_key(run: Path) -> tuple[str, int]:
    """(task label, seed) of a run folder, from its run.json: ``task`` or ``task/subtask``."""
    info = read_run(run)
    task = info["task"] + (f"/{info['subtask']}" if info.get("subtask") else "")
    return task, int(info["settings"]["seed"])


def seed_folder(root: Path, task: str, seed: int) -> Path:
    """``root/<task>/seed<k>`` (a sub-task's ``/`` and ``:`` made file-name safe): cells and work folders."""
    return root / task.replace("/", "__").replace(":", "_") / f"seed{seed}"


def cell_file(out: Path, task: str, seed: int, criterion: str, fraction: float) -> Path:
    return seed_folder(out / "cells", task, seed) / f"{criterion}_{fraction:g}.json"


def parse_criterion(name: str) -> tuple[str, bool]:
    """``criterion`` or ``criterion+massive`` (that criterion with ``keep_massive``) -> (criterion, keep_massive)."""
    base, plus, rest = name.partition("+")
    if base not in CRITERIA or (plus and rest != "massive"):
        raise ValueError(f"unknown criterion {name!r}: one of {', '.join(CRITERIA)}, optionally with +massive")
    return base, bool(plus)


def task_aware(name: str) -> bool:
    """Skill neurons, with or without the massive neurons kept: the criteria compared with the task-agnostic ones."""
    return parse_criterion(name)[0] == "skill"


def run_cell(run: Path, task: str, seed: int, criterion: str, fraction: float, keep: float, args) -> dict:
    """One prune_run (+ re-tuning) of ``run`` at ``--keep keep`` (:func:`prune_keep` of ``fraction``); its pruned
    folder is removed, the moments file kept for reuse."""
    folder = seed_folder(args.work, task, seed)
    moments = folder / "moments.safetensors"
    base, keep_massive = parse_criterion(criterion)
    reads = uses_moments(base, args.fill, keep_massive)
    target = folder / f"{criterion}_{fraction:g}"
    r = prune_run(run, target, keep=keep, layers=args.layers, criterion=base, fill=args.fill,
                  seed=seed, keep_massive=keep_massive, moments=moments if reads and moments.is_file() else None,
                  retune=True, retune_epochs=args.retune_epochs, progress=False, overwrite=True)
    r["criterion"] = criterion
    r["keep"], r["prune_keep"] = fraction, keep  # the comparison's fraction; prune_run's --keep
    if reads and not moments.is_file():
        shutil.copyfile(target / "moments.safetensors", moments)
    shutil.rmtree(target)
    keys = ("criterion", "keep", "prune_keep", "fill", "layers", "pruned_layers", "kept_per_layer", "widths",
            "test_rows", "test_accuracy_original", "test_accuracy_pruned", "test_accuracy_pruned_retuned",
            "retune_epochs", "params_before", "params_after", "seed", "seconds")
    return {"run": str(run), "task": task, "run_seed": seed, **{k: r.get(k) for k in keys}}


def prune_keep(run: Path, fraction: float) -> float:
    """``prune --keep`` that keeps ``fraction`` of each pruned layer: half of it for a run scored on its pn/neu
    sub-tasks (a 3-class task), whose skill selection and kept count are twice ``int(keep * width)`` (the union
    rule), so that every task is compared at the same widths (10%: 152 of 1536 there, 153 otherwise)."""
    from skillkern.runs import scored_names

    return fraction / 2 if {"pn", "neu"} <= scored_names(run) else fraction


def majority_rate(run: Path) -> float:
    """The share of the most frequent class among the run's test rows (the accuracy of a constant guess)."""
    info = read_run(run)
    test = run_splits(load_run_task(info), TuneSettings(**info["settings"]))[2]
    counts = np.bincount([ex.label for ex in test])
    return float(counts.max() / counts.sum())


def run_all(runs: list[Path], out: Path, args) -> dict:
    """Every cell of every run (skipping those on disk), then the aggregated results (also written as JSON)."""
    seen: dict[tuple[str, int], Path] = {}
    for run in runs:
        key = run_key(run)
        if key in seen:
            raise SystemExit(f"{run} and {seen[key]} are both {key[0]} seed {key[1]}: give each run once")
        seen[key] = run
    cells = []
    for (task, seed), run in sorted(seen.items()):
        keeps = {fraction: prune_keep(run, fraction) for fraction in args.fractions}  # lists the run's scores once
        for criterion in args.criteria:
            for fraction in args.fractions:
                path = cell_file(out, task, seed, criterion, fraction)
                keep = keeps[fraction]
                if path.is_file():
                    cell = json.loads(path.read_text())
                    if cell.get("prune_keep", cell["keep"]) == keep:
                        cells.append(cell)
                        continue
                    # written before a 3-class run's --keep was halved: it kept twice the fraction
                    log.info("%s: pruned at --keep %g, not %g; computed again", path, cell["keep"], keep)
                cell = run_cell(run, task, seed, criterion, fraction, keep, args)
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(cell, indent=1) + "\n")
                cells.append(cell)
                log.info("%s seed %d %s %g: original %.3f, pruned %.3f, re-tuned %.3f", task, seed, criterion,
                         fraction, cell["test_accuracy_original"], cell["test_accuracy_pruned"],
                         cell["test_accuracy_pruned_retuned"])
    majority = {task: majority_rate(run) for (task, _), run in sorted(seen.items())}
    results = aggregate(cells, majority, args.criteria, args.fractions)
    for (task, seed), run in sorted(seen.items()):
        mine = [c for c in cells if (c["task"], c["run_seed"]) == (task, seed)]
        found = massive_kept(run, args.work, task, seed, mine)
        if found is not None:
            results["tasks"][task].setdefault("massive", {})[str(seed)] = found
    results.update(fill=args.fill, layers=args.layers, retune_epochs=args.retune_epochs, quick=args.quick)
    atomic_write_text(out / "pruning_criteria.json", json.dumps(results, indent=1) + "\n")
    plot_criteria(results, out / "pruning_criteria.png")
    return results


def massive_kept(run: Path, work: Path, task: str, seed: int, cells: list[dict]) -> dict | None:
    """Which of the run's massive-activation neurons each cell's criterion kept.

    A massive neuron is one whose activation norm over the moments' positions is more than
    ``skillkern.perturb.OUTLIER_FACTOR`` times its layer's median (:func:`skillkern.perturb.massive_neurons`, the
    matched random control's rule); MiniLM has a handful, and folding one at its mean breaks the model. The kept
    sets are recomputed with :func:`skillkern.prune.select_neurons` from the same moments file, scores and seed as
    the cells (every selection is deterministic), so cells written before this existed are covered too.

    Returns:
        ``{"factor": the outlier factor, "neurons": {layer: [index, ...]} of the pruned layers, "kept":
        {"criterion|q": count}}``, or None
        when the run's moments file is not in ``work`` (nothing is recomputed then).
    """
    from skillkern.perturb import OUTLIER_FACTOR, massive_neurons
    from skillkern.prune import select_neurons
    from skillkern.runs import load_run, run_predictivity, skill_selection
    from skillkern.stats import NeuronMoments

    path = seed_folder(work, task, seed) / "moments.safetensors"
    if not path.is_file() or not cells:
        log.info("%s seed %d: no moments file in %s; the massive neurons kept are not counted", task, seed, work)
        return None
    moments, _ = NeuronMoments.load(path)
    massive = massive_neurons(moments.l2_norm(), OUTLIER_FACTOR)  # same positions per neuron: norm ranks as RMS
    pm, _task, _info = load_run(run)
    preds = run_predictivity(run) if any(task_aware(c["criterion"]) for c in cells) else None
    layers = cells[0]["pruned_layers"]
    out = {"factor": OUTLIER_FACTOR, "neurons": {str(layer): massive[layer].tolist() for layer in layers}, "kept": {}}
    for c in cells:
        counts = {layer: c["kept_per_layer"] for layer in c["pruned_layers"]}
        base, keep_massive = parse_criterion(c["criterion"])
        skill = skill_selection(preds, c.get("prune_keep", c["keep"])) if base == "skill" else None
        kept = select_neurons(pm.backbone, base, counts, moments=moments, seed=seed, keep_massive=keep_massive,
                              skill=skill)
        out["kept"][f"{c['criterion']}|{c['keep']:g}"] = sum(
            int(torch.isin(kept[layer], massive[layer]).sum()) for layer in counts)
    return out


# ------------------------------------------------------------------------------------------- aggregation
def mean_ci(values: list[float]) -> dict:
    """Mean and the half-width of its two-sided 95% t-interval over seeds (None with one value)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return {"mean": float(v.mean()), "ci95": None, "n": len(v)}
    t = T95[len(v) - 2] if len(v) - 1 <= len(T95) else 1.96
    return {"mean": float(v.mean()), "ci95": float(t * v.std(ddof=1) / math.sqrt(len(v))), "n": len(v)}


def verdict(diff: dict) -> str:
    """win / lose when the paired difference's 95% interval excludes 0, tie otherwise; n/a with one seed."""
    if diff["ci95"] is None:
        return "n/a (one seed)"
    if diff["mean"] - diff["ci95"] > 0:
        return "win"
    if diff["mean"] + diff["ci95"] < 0:
        return "lose"
    return "tie"


def aggregate(cells: list[dict], majority: dict, criteria, fractions) -> dict:
    """Per task, criterion, fraction and setting: accuracies per seed, mean and 95% CI over seeds; for each
    task-aware criterion (``skill``, ``skill+massive``: ``vs``), the paired difference with each task-agnostic
    criterion (same seed, same test rows), its verdict, and the strongest of them (highest mean) at each point."""
    tasks: dict[str, dict] = {}
    for c in cells:
        t = tasks.setdefault(c["task"], {"seeds": set(), "original": {}, "acc": {}})
        t["seeds"].add(c["run_seed"])
        t["original"][c["run_seed"]] = c["test_accuracy_original"]
        for setting, key in (("pruned", "test_accuracy_pruned"), ("retuned", "test_accuracy_pruned_retuned")):
            t["acc"].setdefault((c["criterion"], c["keep"], setting), {})[c["run_seed"]] = c[key]
    out = {"criteria": list(criteria), "fractions": list(fractions), "tasks": {}}
    for task, t in sorted(tasks.items()):
        seeds = sorted(t["seeds"])
        original = [t["original"][s] for s in seeds]
        entry = {"seeds": seeds, "majority": majority.get(task), "original": mean_ci(original),
                 "learns": majority.get(task) is None or float(np.mean(original)) > majority[task] + CHANCE_MARGIN,
                 "cells": {}, "vs": {}}
        for criterion in criteria:
            for q in fractions:
                for setting in SETTINGS:
                    per_seed = t["acc"].get((criterion, q, setting), {})
                    if set(per_seed) != set(seeds):
                        continue
                    values = [per_seed[s] for s in seeds]
                    entry["cells"][f"{criterion}|{q:g}|{setting}"] = dict(mean_ci(values), per_seed=values)
        for aware in (c for c in criteria if task_aware(c)):
            for q in fractions:
                for setting in SETTINGS:
                    mine = t["acc"].get((aware, q, setting), {})
                    point = {}
                    for other in (c for c in criteria if not task_aware(c)):
                        theirs = t["acc"].get((other, q, setting), {})
                        if set(mine) != set(seeds) or set(theirs) != set(seeds):
                            continue
                        d = mean_ci([mine[s] - theirs[s] for s in seeds])
                        point[other] = dict(d, verdict=verdict(d))
                    if point:
                        best = max(point, key=lambda o: float(np.mean([t["acc"][(o, q, setting)][s] for s in seeds])))
                        point["strongest"] = best
                        entry["vs"].setdefault(aware, {})[f"{q:g}|{setting}"] = point
        out["tasks"][task] = entry
    return out


# -------------------------------------------------------------------------------------------- reporting
def _cell_text(cell: dict | None) -> str:
    if cell is None:
        return "-"
    return f"{cell['mean']:.3f}" + (f" ± {cell['ci95']:.3f}" if cell["ci95"] is not None else "")


def criteria_table(results: dict) -> list[str]:
    """Markdown lines for RESULTS.md: per task, test accuracy by criterion and kept fraction (pruned, and pruned +
    re-tuned), mean ± 95% CI over seeds, the skill row marked win / tie / lose against the strongest other
    criterion; tasks that learn first, the others after them, stated as such; and one plain summary line."""
    fr = results["fractions"]
    lines = ["| criterion | " + " | ".join(f"{q * 100:g}% {s}" for q in fr for s in SETTINGS) + " |",
             "|---|" + "---|" * (2 * len(fr))]
    head, out = lines[:], []
    aware = [c for c in results["criteria"] if task_aware(c)]
    tally = {a: {"win": 0, "tie": 0, "lose": 0} for a in aware}
    per_task: dict[str, dict[str, dict[str, int]]] = {a: {} for a in aware}  # the same tally, task by task
    below = {a: [0, 0] for a in aware}  # point estimates: cells under the best task-agnostic mean, cells
    for learns in (True, False):
        group = [(t, e) for t, e in results["tasks"].items() if e["learns"] == learns]
        if not group:
            continue
        out += ["", "Tasks whose prompts learn:" if learns else
                "Tasks whose prompts stay at chance (within 3 points of the majority-class rate, or below): there is "
                "little skill to keep, and these rows say little either way:", ""]
        for task, e in group:
            seeds = ", ".join(map(str, e["seeds"]))
            out += [f"**{task}** (seeds {seeds}; unpruned {_cell_text(e['original'])}; majority class "
                    f"{e['majority'] if e['majority'] is None else round(e['majority'], 3)})", ""] + head
            for criterion in results["criteria"]:
                row = []
                for q in fr:
                    for setting in SETTINGS:
                        mine = e["cells"].get(f"{criterion}|{q:g}|{setting}")
                        text = _cell_text(mine)
                        if criterion in tally and learns and mine:
                            best = max((c["mean"] for k, c in e["cells"].items() if k.endswith(f"|{q:g}|{setting}")
                                        and not task_aware(k.split("|")[0])), default=None)
                            if best is not None:
                                below[criterion][1] += 1
                                below[criterion][0] += mine["mean"] < best
                        vs = e["vs"].get(criterion, {}).get(f"{q:g}|{setting}")
                        if vs and vs[vs["strongest"]]["verdict"] in tally[criterion]:
                            v = vs[vs["strongest"]]["verdict"]
                            text += f" ({v} vs {vs['strongest']})"
                            if learns:
                                tally[criterion][v] += 1
                                per_task[criterion].setdefault(task, {"win": 0, "tie": 0, "lose": 0})[v] += 1
                        row.append(text)
                out.append(f"| {criterion} | " + " | ".join(row) + " |")
            out.append("")
            out += massive_table(e.get("massive"), results["criteria"], fr)
    parts = []
    for a in aware:
        name = "skill neurons" if a == "skill" else f"{a} (skill neurons, the massive neurons kept first)"
        total = sum(tally[a].values())
        if total:
            parts.append(f"{name} win {tally[a]['win']}, tie {tally[a]['tie']} and lose {tally[a]['lose']} of "
                         f"{total} comparisons")
    summary = ("On the tasks that learn, against the strongest task-agnostic criterion at each kept fraction and "
               "setting (paired over seeds, 95% interval of the difference), " + "; ".join(parts) + "." if parts else
               "No comparison with two seeds or more on a task that learns: no verdict.")
    if any(len(per_task[a]) > 1 for a in aware):  # where they win, tie or lose: task by task
        summary += " Task by task (win/tie/lose): " + "; ".join(
            f"{'skill neurons' if a == 'skill' else a} " + ", ".join(
                f"{task} {v['win']}/{v['tie']}/{v['lose']}" for task, v in per_task[a].items())
            for a in aware if per_task[a]) + "."
    single = [t for t, e in results["tasks"].items() if e["learns"] and len(e["seeds"]) < 2]
    if single:
        summary += f" With one seed (point estimates only, no verdict): {', '.join(single)}."
    points = [f"{'skill neurons' if a == 'skill' else a} in {below[a][0]} of {below[a][1]} cells"
              for a in aware if below[a][1]]
    if points:
        summary += (" By point estimate (mean over seeds), below the best task-agnostic criterion: "
                    + "; ".join(points) + ".")
    share = massive_share(results)
    if share:
        summary += (" Of the massive-activation neurons in the pruned layers (tables below), the criteria keep "
                    + ", ".join(f"{c} {v * 100:.0f}%" for c, v in share.items())
                    + " (mean over the tasks that learn, their seeds and the kept fractions).")
    note = (f"Every criterion keeps the same number of neurons in each pruned layer ({results['layers']}) and folds "
            f"the others at the same fill value ({results['fill']}); a 3-class task's skill selection (the pn/neu "
            "union rule) holds twice int(keep x width), so its --keep is half the kept fraction. Re-tuning: "
            f"{results['retune_epochs']} epoch(s) of the prompt on the pruned model. ± is the 95% t-interval over "
            "seeds; the seeds share the test rows, so it measures seed-to-seed variation, not test-set sampling.")
    return [summary, "", note] + out


def massive_share(results: dict) -> dict[str, float]:
    """Per criterion, the share of the massive-activation neurons of the pruned layers it keeps, averaged over the
    tasks that learn, their seeds (those with any massive neuron) and the kept fractions; empty when not counted."""
    shares: dict[str, list[float]] = {}
    for e in results["tasks"].values():
        if not e["learns"]:
            continue
        for m in (e.get("massive") or {}).values():
            total = sum(map(len, m["neurons"].values()))
            for key, kept in m["kept"].items() if total else ():
                shares.setdefault(key.split("|")[0], []).append(kept / total)
    return {c: float(np.mean(shares[c])) for c in results["criteria"] if c in shares}


def massive_table(massive: dict | None, criteria, fractions) -> list[str]:
    """Markdown lines: how many of the massive-activation neurons of the pruned layers each criterion kept, per
    seed (:func:`massive_kept`); nothing when they were not counted."""
    if not massive:
        return []
    seeds = sorted(massive, key=int)
    named = {s: "; ".join(f"layer {layer} " + ", ".join(f"#{j}" for j in idx)
                          for layer, idx in massive[s]["neurons"].items() if idx) or "none" for s in seeds}
    where = (named[seeds[0]] if len(set(named.values())) == 1 else
             "; ".join(f"seed {s}: {named[s]}" for s in seeds))
    total = {s: sum(len(i) for i in massive[s]["neurons"].values()) for s in seeds}
    factor = massive[seeds[0]]["factor"]
    lines = [f"Massive-activation neurons in the pruned layers (activation norm over {factor:g}x the layer median, "
             f"the matched perturbation control's rule): {where}. How many of them each criterion keeps, per seed "
             f"({', '.join(seeds)}):", "",
             "| criterion | " + " | ".join(f"{q * 100:g}%" for q in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    for criterion in criteria:
        row = []
        for q in fractions:
            kept = [massive[s]["kept"].get(f"{criterion}|{q:g}") for s in seeds]
            row.append("-" if None in kept else ", ".join(f"{k}/{total[s]}" for k, s in zip(kept, seeds)))
        lines.append(f"| {criterion} | " + " | ".join(row) + " |")
    return lines + [""]


def plot_criteria(results: dict, path: Path) -> None:
    """Accuracy against kept fraction per task (one panel each), a line per criterion, solid pruned and dashed
    re-tuned, error bars the 95% CI over seeds, the unpruned accuracy dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (matplotlib.ticker.NullLocator below)

    tasks = list(results["tasks"])
    cols = min(4, len(tasks)) or 1
    rows = math.ceil(len(tasks) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.0, 3.6 * cols), 3.6 * rows), squeeze=False)
    fr = results["fractions"]
    for ax, task in zip(axes.flat, tasks):
        e = results["tasks"][task]
        for i, criterion in enumerate(results["criteria"]):
            for setting, style in (("pruned", "-"), ("retuned", "--")):
                cells = [e["cells"].get(f"{criterion}|{q:g}|{setting}") for q in fr]
                xs = [q for q, c in zip(fr, cells) if c]
                if not xs:
                    continue
                ys = [c["mean"] for c in cells if c]
                err = [c["ci95"] or 0.0 for c in cells if c]
                ax.errorbar(xs, ys, yerr=err, color=f"C{i}", linestyle=style, marker="o", markersize=3, capsize=2,
                            label=criterion if setting == "pruned" else None)
        ax.axhline(e["original"]["mean"], color="k", linestyle=":", linewidth=1)
        if e["majority"] is not None:
            ax.axhline(e["majority"], color="grey", linestyle="-.", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the kept fractions are labelled
        ax.set_xticks(fr)
        ax.set_xticklabels([f"{q * 100:g}%" for q in fr], fontsize=7)
        ax.set_ylim(0.0, 1.02)  # accuracies: t-intervals over few seeds may reach past [0, 1]
        ax.set_title(task + ("" if e["learns"] else " (at chance)"), fontsize=9)
        ax.set_xlabel("kept per pruned layer", fontsize=8)
        ax.set_ylabel("test accuracy", fontsize=8)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, title="solid: pruned, dashed: re-tuned", title_fontsize=6, loc="lower right")
    fig.suptitle("pruning criteria at the same widths\n(dotted: unpruned; dash-dot: majority class)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, type=Path, help="tuned and scored run folders (a task's seeds)")
    p.add_argument("--out", required=True, type=Path, help="result folder (cells/, pruning_criteria.json and .png)")
    p.add_argument("--work", type=Path, default=None, help="where pruned models are built (default OUT/work; each "
                                                           "is deleted once its cell is written)")
    p.add_argument("--criteria", default=",".join(DEFAULT_CRITERIA),
                   help=f"comma-separated criteria of skillkern prune, each optionally with +massive (--keep-massive) "
                        f"(default {','.join(DEFAULT_CRITERIA)})")
    p.add_argument("--fractions", default=None, help=f"kept fractions (default {','.join(map(str, FRACTIONS))})")
    p.add_argument("--layers", default="top:0.75")
    p.add_argument("--fill", default="tokens", choices=["tokens", "prompt"],
                   help="the fill value of every criterion (default tokens: the moments' mean)")
    p.add_argument("--retune-epochs", type=float, default=1.0, help="the short re-tuning budget (default 1 epoch)")
    p.add_argument("--quick", action="store_true", help=f"fractions {QUICK_FRACTIONS}, 0.25 re-tuning epochs, "
                                                        "every layer (a smoke test on tiny runs)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("skillkern", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.criteria = [c for c in args.criteria.split(",") if c]
    for name in args.criteria:
        try:
            parse_criterion(name)
        except ValueError as err:
            p.error(f"--criteria: {err}")
    if args.quick:
        args.fractions = args.fractions or ",".join(map(str, QUICK_FRACTIONS))
        args.retune_epochs = 0.25
        args.layers = "all"
    args.fractions = [float(x) for x in (args.fractions or ",".join(map(str, FRACTIONS))).split(",") if x.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or args.out / "work"
    results = run_all(args.runs, args.out, args)
    print("\n".join(criteria_table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
