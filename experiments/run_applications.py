"""The paper's applications on the study's runs: pruning, cross-task perturbation, transferability (METHOD.md 7).

Run after ``experiments/run_study.py`` (it reads the seed-0 run of every task under ``--work``, with the head of
``--head``: ``WORK/<task>/<head>/seed0``):

    python experiments/run_applications.py                 # all three parts; resumable
    python experiments/run_applications.py --parts prune   # one part

Outputs (small, committed) go to ``--out``: ``pruning.json``, ``cross_task.json`` + PNG, ``transfer.json`` + PNG;
``experiments/results_md.py`` turns them into sections of RESULTS.md. Every step is skipped when its output
exists, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from skillkern.files import atomic_write_text
from skillkern.perturb import perturbation, random_selection
from skillkern.prune import prune_run
from skillkern.stats import select_per_layer
from skillkern.transfer import (activated_neurons, add_relative_metrics, correlate, jaccard, mean_over_seeds,
                                scratch_accuracy, skill_neurons, task_predictivity, transfer_pair)
from skillkern.runs import load_run, run_predictivity, run_splits, skill_selection
from skillkern.tune import TuneSettings, evaluate

from run_study import TASKS, task_data  # experiments/run_study.py (a script's own folder is first on sys.path)


log = logging.getLogger("applications")


def _json(path: Path, compute, needs: str = ""):
    """Read ``path`` if it exists (and holds the key ``needs``), else compute and write it."""
    if path.exists():
        value = json.loads(path.read_text())
        if not needs or needs in value:
            return value
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")
    return value


def part_prune(tasks, work: Path, out: Path, args) -> dict:
    results = {}
    for name in tasks:
        run = work / name / args.head / "seed0"
        entry = {}
        for fill in ("prompt", "tokens"):
            retune = fill == "prompt" and name in args.retune_tasks
            folder = work / name / args.head / f"pruned_{fill}"
            r = _json(folder / "prune_summary.json",
                      lambda: prune_run(run, folder, keep=args.keep, layers=args.layers, fill=fill, retune=retune,
                                        retune_epochs=args.retune_epochs, progress=False, overwrite=True),
                      needs="test_accuracy_pruned_retuned" if retune else "")
            entry[fill] = {**r, "head": args.head}
        results[name] = entry
        log.info("pruned %s: original %.3f, prompt-slot fill %.3f, token-mean fill %.3f", name,
                 entry["prompt"]["test_accuracy_original"], entry["prompt"]["test_accuracy_pruned"],
                 entry["tokens"]["test_accuracy_pruned"])
    atomic_write_text(out / "pruning.json", json.dumps(results, indent=2) + "\n")
    return results


def part_cross(tasks, work: Path, out: Path, args) -> dict:
    """Perturb task A's skill neurons (q) while evaluating task B; beside B's random control."""
    q = args.cross_q
    preds = {a: run_predictivity(work / a / args.head / "seed0") for a in tasks}
    rows = {}
    cache = out / "cross_task_partial.json"
    if cache.exists():
        rows = json.loads(cache.read_text())
    for b in tasks:
        if b in rows and len(rows[b]["skill_of"]) == len(tasks):
            continue
        pm, task, info = load_run(work / b / args.head / "seed0")
        s = TuneSettings(**info["settings"])
        test = run_splits(task, s)[2][: args.cross_rows]
        width = next(iter(preds[b].values())).shape[1]
        own = skill_selection(preds[b], q)
        counts = [len(t) for t in own]
        entry = {"clean": evaluate(pm, test, 32, s.max_length), "skill_of": {}}
        entry["random"] = evaluate(pm, test, 32, s.max_length,
                                   edit=perturbation(random_selection(counts, width, 11), "gaussian", seed=5))
        for a in tasks:
            # the same number of neurons per layer as B's own selection, so rows are comparable
            ranked = select_per_layer(task_predictivity(preds[a]), 1.0)
            sel = [ranked[layer][: counts[layer]] for layer in range(len(counts))]
            entry["skill_of"][a] = evaluate(pm, test, 32, s.max_length,
                                            edit=perturbation(sel, "gaussian", seed=5))
        rows[b] = entry
        atomic_write_text(cache, json.dumps(rows, indent=2) + "\n")
        log.info("cross-task on %s: clean %.3f random %.3f own %.3f", b, entry["clean"], entry["random"],
                 entry["skill_of"][b])
    result = {"q": q, "test_rows": args.cross_rows, "tasks": tasks, "rows": rows,
              "note": "row = evaluated task B, column = task A whose skill neurons are perturbed (gaussian, sigma "
                      "0.1), as many per layer as B's own selection at q"}
    atomic_write_text(out / "cross_task.json", json.dumps(result, indent=2) + "\n")
    plot_cross(result, out / "cross_task.png")
    return result


def _seed_files(out: Path, work: Path, seed: int) -> tuple[Path, Path, Path]:
    """(pairs cache, scratch cache, run folder root) of one transfer seed (seed 0 keeps the original names)."""
    tag = "" if seed == 0 else f"_seed{seed}"
    return out / f"transfer_pairs{tag}.json", out / f"transfer_scratch{tag}.json", work / f"transfer{tag}"


def transfer_seed(chosen: list, work: Path, out: Path, args, seed: int) -> tuple[dict, dict]:
    """Every ordered pair of ``chosen`` with seed ``seed``'s runs (:func:`skillkern.transfer.transfer_pair`), with
    the two indicators; returns (pairs, scratch: B -> accuracy after the same budget from the usual
    initialisation). Resumable: pairs and scratch accuracies are cached in ``out`` as they finish."""
    run = f"seed{seed}"
    probe = run_splits(task_data("sst2"), TuneSettings(max_test=64))[2][:64]  # fixed probe texts for all prompts
    activated, skill = {}, {}
    for a in chosen:
        pm, _, _ = load_run(work / a / args.head / run)
        activated[a] = activated_neurons(pm, probe)
        # the top q of each layer for every task, 3-class ones included (max of the pn / neu predictivities), so
        # the Jaccard overlaps compare sets of one size
        skill[a] = skill_neurons(task_predictivity(run_predictivity(work / a / args.head / run)), args.indicator_q)
    pairs_file, scratch_file, folders = _seed_files(out, work, seed)
    pairs = json.loads(pairs_file.read_text()) if pairs_file.exists() else {}
    for a in chosen:
        for b in chosen:
            if a == b:
                continue
            indicators = {"overlap_indicator": jaccard(activated[a], activated[b]),
                          "skill_indicator": jaccard(skill[a], skill[b])}
            if f"{a}->{b}" in pairs:  # cached; the indicators are cheap and recomputed with the current rule
                pairs[f"{a}->{b}"].update(indicators)
                continue
            r = transfer_pair(work / a / args.head / run, work / b / args.head / run, folders / f"{a}__{b}",
                              steps=args.transfer_steps,
                              test_rows=args.transfer_rows)
            pairs[f"{a}->{b}"] = {k: v for k, v in r.items() if k != "seconds"} | indicators | {"seconds": r["seconds"]}
            atomic_write_text(pairs_file, json.dumps(pairs, indent=2) + "\n")
            log.info("transfer seed %d %s -> %s: zero-shot %s, after %d steps %.3f", seed, a, b,
                     "n/a" if r["zero_shot"] is None else f"{r['zero_shot']:.3f}", r["steps"], r["after_steps"])
    atomic_write_text(pairs_file, json.dumps(pairs, indent=2) + "\n")
    scratch = json.loads(scratch_file.read_text()) if scratch_file.exists() else {}
    for b in chosen:
        if b in scratch:
            continue
        scratch[b] = scratch_accuracy(work / b / args.head / run, folders / f"scratch__{b}", steps=args.transfer_steps,
                                      test_rows=args.transfer_rows)
        atomic_write_text(scratch_file, json.dumps(scratch, indent=2) + "\n")
        log.info("from-scratch reference seed %d on %s: %d steps %.3f", seed, b, args.transfer_steps,
                 scratch[b])
    keys = sorted(k for k in pairs if all(t in chosen for t in k.split("->")))
    return add_relative_metrics({k: pairs[k] for k in keys}, scratch), scratch


def part_transfer(tasks, work: Path, out: Path, args) -> dict:
    """Real transfer A -> B for every ordered pair, beside the overlap and the skill-neuron indicators, for each
    seed in ``args.transfer_seeds``; correlations over the seed-mean of each pair and per seed."""
    chosen = [t for t in tasks if t in args.transfer_tasks]
    seeds = [sd for sd in args.transfer_seeds
             if all((work / t / args.head / f"seed{sd}" / "run.json").exists() for t in chosen)]
    if len(seeds) < len(args.transfer_seeds):
        log.warning("transfer: seeds %s lack runs of some of %s; using seeds %s",
                    sorted(set(args.transfer_seeds) - set(seeds)), chosen, seeds)
    if not seeds:
        raise SystemExit(f"transfer: no seed of {args.transfer_seeds} has runs of every task {chosen} under {work}")
    runs = {sd: transfer_seed(chosen, work, out, args, sd) for sd in seeds}
    common = sorted(set.intersection(*(set(p) for p, _ in runs.values())))
    per_seed = [{k: runs[sd][0][k] for k in common} for sd in seeds]
    pairs = mean_over_seeds(per_seed)
    scratch = {b: float(np.mean([runs[sd][1][b] for sd in seeds])) for b in chosen}
    corr, p_values, counts = correlate(pairs, common)
    same = [k for k in common if pairs[k]["head_carried"]]
    corr_same, p_same, counts_same = correlate(pairs, same)
    seed_corr = {str(sd): dict(zip(("spearman", "spearman_p_two_sided", "pairs_per_metric"),
                               correlate(ps, common))) for sd, ps in zip(seeds, per_seed)}
    result = {"tasks": chosen, "seeds": seeds, "pairs": pairs, "scratch": scratch,
              "spearman": corr, "spearman_p_two_sided": p_values, "pairs_per_metric": counts,
              "same_labels": {"spearman": corr_same, "spearman_p_two_sided": p_same, "pairs_per_metric": counts_same},
              "per_seed": seed_corr,
              "per_seed_pairs": {str(sd): {k: {f: ps[k][f] for f in ("zero_shot", "after_steps", "overlap_indicator",
                                                                     "skill_indicator")} for k in common}
                                 for sd, ps in zip(seeds, per_seed)},
              "per_seed_scratch": {str(sd): runs[sd][1] for sd in seeds},
              "indicator_q": args.indicator_q, "transfer_steps": args.transfer_steps,
              "test_rows": args.transfer_rows}
    atomic_write_text(out / "transfer.json", json.dumps(result, indent=2) + "\n")
    plot_transfer(result, out / "transfer.png")
    return result


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cross(result: dict, path: Path) -> None:
    plt = _plt()
    tasks = result["tasks"]
    m = np.array([[result["rows"][b]["skill_of"][a] - result["rows"][b]["random"] for a in tasks] for b in tasks])
    fig, ax = plt.subplots(figsize=(1 + 0.55 * len(tasks), 1 + 0.5 * len(tasks)))
    lim = max(0.02, float(np.abs(m).max()))
    im = ax.imshow(m, cmap="RdBu", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=90)
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels(tasks)
    ax.set_xlabel("skill neurons of task A (perturbed)")
    ax.set_ylabel("evaluated task B")
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            ax.text(j, i, f"{100 * m[i, j]:+.0f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label="accuracy change vs random control (points / 100)")
    ax.set_title(f"cross-task perturbation, q={result['q']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_transfer(result: dict, path: Path) -> None:
    plt = _plt()
    pairs = result["pairs"]
    metrics = [m for m in ("zero_shot", "after_steps", "gain_over_scratch") if all(m in p for p in pairs.values())]
    fig, axes = plt.subplots(2, len(metrics), figsize=(3.6 * len(metrics), 6.2), squeeze=False)
    for row, ind in enumerate(("overlap_indicator", "skill_indicator")):
        for col, m in enumerate(metrics):
            ax = axes[row, col]
            for carried, style in ((True, dict(c="C0", label="head carried over")),
                                   (False, dict(c="C3", marker="x", label="prompt only (other label count)"))):
                pts = [(p[ind], p[m]) for p in pairs.values()
                       if p.get(m) is not None and p.get("head_carried", True) == carried]
                if pts:
                    ax.scatter(*zip(*pts), s=10, **style)
            n = result.get("pairs_per_metric", {}).get(m, len(pairs))
            ax.set_title(f"Spearman {result['spearman'][f'{ind}~{m}']:.2f} ({n} pairs)", fontsize=9)
            ax.set_xlabel(ind.replace("_", " "), fontsize=8)
            ax.set_ylabel(m.replace("_", " ") + (f" ({result['transfer_steps']} steps)" if m != "zero_shot" else ""),
                          fontsize=8)
    axes[0][-1].legend(fontsize=6)
    seeds = result.get("seeds", [0])
    fig.suptitle(f"transfer over {len(pairs)} ordered pairs of {len(result['tasks'])} tasks"
                 + (f", means over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f", seed {seeds[0]}"),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/study")
    p.add_argument("--head", default="verbalizer", help="whose runs to use: WORK/<task>/<head>/seed<k>")
    p.add_argument("--out", default="experiments/study")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--parts", default="prune,cross,transfer")
    p.add_argument("--keep", type=float, default=0.02)
    p.add_argument("--layers", default="top:0.75")
    p.add_argument("--retune-tasks", default=",".join(TASKS))
    p.add_argument("--retune-epochs", type=float, default=1.0)
    p.add_argument("--cross-q", type=float, default=0.1)
    p.add_argument("--cross-rows", type=int, default=200)
    p.add_argument("--indicator-q", type=float, default=0.05)
    p.add_argument("--transfer-steps", type=int, default=20)
    p.add_argument("--transfer-tasks", default=",".join(TASKS),
                   help="tasks whose ordered pairs are transferred (each pair costs a short tuning run)")
    p.add_argument("--transfer-rows", type=int, default=200)
    p.add_argument("--transfer-seeds", default="0,1,2", help="study seeds whose runs are transferred (each seed "
                   "costs a short tuning run per pair; pairs are averaged over seeds)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("skillkern", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.retune_tasks = [t for t in args.retune_tasks.split(",") if t]
    args.transfer_tasks = [t for t in args.transfer_tasks.split(",") if t]
    args.transfer_seeds = [int(x) for x in args.transfer_seeds.split(",") if x.strip()]
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in args.tasks.split(",") if (work / t / args.head / "seed0" / "run.json").exists()]
    parts = args.parts.split(",")
    if "prune" in parts:
        part_prune(tasks, work, out, args)
    if "cross" in parts:
        part_cross(tasks, work, out, args)
    if "transfer" in parts:
        part_transfer(tasks, work, out, args)
    if (out / "results.json").is_file():  # regenerate RESULTS.md with the new sections
        from results_md import results_md_path, write_results_md

        results = json.loads((out / "results.json").read_text())
        write_results_md(results, out, results_md_path(out, bool(results.get("quick"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
