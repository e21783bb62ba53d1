"""The paper's applications on the study's runs: pruning, cross-task perturbation, transferability (METHOD.md 7).

Run after ``experiments/run_study.py`` (it reads the seed-0 run of every task under ``--work``):

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
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_study import MULTICLASS, TASKS, spearman, task_data  # noqa: E402

from skillkern.perturb import perturbation, random_selection, run_predictivity, skill_selection  # noqa: E402
from skillkern.prune import prune_run  # noqa: E402
from skillkern.stats import select_per_layer  # noqa: E402
from skillkern.tune import STATE_FILE, TuneSettings, evaluate, load_run, read_run, run_splits, tune_run  # noqa: E402

log = logging.getLogger("applications")


def _json(path: Path, compute, needs: str = ""):
    """Read ``path`` if it exists (and holds the key ``needs``), else compute and write it."""
    if path.exists():
        value = json.loads(path.read_text())
        if not needs or needs in value:
            return value
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
    return value


def part_prune(tasks, work: Path, out: Path, args) -> dict:
    results = {}
    for name in tasks:
        run = work / name / "seed0"
        entry = {}
        for baseline in ("prompt", "tokens"):
            retune = baseline == "prompt" and name in args.retune_tasks
            r = _json(work / name / f"pruned_{baseline}" / "prune_summary.json",
                      lambda: prune_run(run, work / name / f"pruned_{baseline}", keep=args.keep, layers=args.layers,
                                        baseline=baseline, retune=retune, retune_epochs=args.retune_epochs,
                                        progress=False),
                      needs="test_accuracy_pruned_retuned" if retune else "")
            entry[baseline] = r
        results[name] = entry
        log.info("pruned %s: original %.3f, prompt-baseline %.3f, token-baseline %.3f", name,
                 entry["prompt"]["test_accuracy_original"], entry["prompt"]["test_accuracy_pruned"],
                 entry["tokens"]["test_accuracy_pruned"])
    (out / "pruning.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def part_cross(tasks, work: Path, out: Path, args) -> dict:
    """Perturb task A's skill neurons (q) while evaluating task B; beside B's random control."""
    q = args.cross_q
    preds = {a: run_predictivity(work / a / "seed0") for a in tasks}
    rows = {}
    cache = out / "cross_task_partial.json"
    if cache.exists():
        rows = json.loads(cache.read_text())
    for b in tasks:
        if b in rows and len(rows[b]["skill_of"]) == len(tasks):
            continue
        pm, task, info = load_run(work / b / "seed0")
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
            sel = [select_per_layer(_single(preds[a]), 1.0)[layer][: counts[layer]] for layer in range(len(counts))]
            entry["skill_of"][a] = evaluate(pm, test, 32, s.max_length,
                                            edit=perturbation(sel, "gaussian", seed=5))
        rows[b] = entry
        cache.write_text(json.dumps(rows, indent=2) + "\n")
        log.info("cross-task on %s: clean %.3f random %.3f own %.3f", b, entry["clean"], entry["random"],
                 entry["skill_of"][b])
    result = {"q": q, "test_rows": args.cross_rows, "tasks": tasks, "rows": rows,
              "note": "row = evaluated task B, column = task A whose skill neurons are perturbed (gaussian, sigma "
                      "0.1), as many per layer as B's own selection at q"}
    (out / "cross_task.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_cross(result, out / "cross_task.png")
    return result


def _single(pred: dict) -> torch.Tensor:
    return pred["task"] if "task" in pred else torch.maximum(pred["pn"], pred["neu"])


@torch.no_grad()
def activated_neurons(pm, probe) -> torch.Tensor:
    """Su et al.'s indicator input: which neurons a prompt activates (> 0) at its slots, on probe texts.

    Returns (L, D) bool: activated at any prompt slot on a majority of the probe rows."""
    from skillkern.models import capture_neurons
    from skillkern.scoring import iter_batches

    acc = {}
    with capture_neurons(pm.backbone, lambda i, h: acc.__setitem__(i, acc.get(i, 0) +
                                                                    (h[:, : pm.prompt_len] > 0).any(1).sum(0))):
        for batch in iter_batches(pm.tokenizer, probe, 32, 64, pad_multiple=0):
            pm(**batch.inputs)
    return torch.stack([acc[i] for i in sorted(acc)]) * 2 > len(probe)


def permutation_p(x: np.ndarray, y: np.ndarray, rho: float, n: int = 2000, seed: int = 0) -> float:
    """Two-sided permutation p-value of a Spearman correlation ``rho`` of x and y (fixed seed: reproducible)."""
    if math.isnan(rho):
        return float("nan")
    g = np.random.default_rng(seed)
    hits = sum(abs(spearman(x, g.permutation(y))) >= abs(rho) - 1e-12 for _ in range(n))
    return (hits + 1) / (n + 1)


def _transfer_settings(info_b: dict, args) -> TuneSettings:
    """Task B's own settings with a budget of ``args.transfer_steps`` steps and the transfer test rows."""
    return TuneSettings(**{**info_b["settings"], "epochs": args.transfer_steps * info_b["settings"]["batch_size"]
                           / info_b["rows"]["train"],
                           "eval_every": 10 ** 9, "max_test": args.transfer_rows, "max_dev": args.transfer_rows})


def part_transfer(tasks, work: Path, out: Path, args) -> dict:
    """Real transfer A -> B (binary tasks) beside the overlap indicator and the skill-neuron indicator."""
    binary = [t for t in tasks if t not in MULTICLASS and t in args.transfer_tasks]
    probe = run_splits(task_data("sst2"), TuneSettings(max_test=64))[2][:64]  # fixed probe texts for all prompts
    activated, skill = {}, {}
    for a in binary:
        pm, _, _ = load_run(work / a / "seed0")
        activated[a] = activated_neurons(pm, probe)
        skill[a] = torch.zeros_like(activated[a])
        for layer, idx in enumerate(skill_selection(run_predictivity(work / a / "seed0"), args.indicator_q)):
            skill[a][layer, idx] = True
    pairs_file = out / "transfer_pairs.json"
    pairs = json.loads(pairs_file.read_text()) if pairs_file.exists() else {}
    for a in binary:
        state = None
        for b in binary:
            if a == b or f"{a}->{b}" in pairs:
                continue
            from safetensors.torch import load_file

            state = state or load_file(str(work / a / "seed0" / STATE_FILE))
            info_b = read_run(work / b / "seed0")
            s = _transfer_settings(info_b, args)
            pm, task, _ = load_run(work / b / "seed0")
            pm.load_trained_state(state)
            test = run_splits(task, s)[2]
            zero = evaluate(pm, test, 32, s.max_length)
            t0 = time.perf_counter()
            r = tune_run(info_b["model"], task, s, work / "transfer" / f"{a}__{b}", progress=False, init_state=state,
                         label=f"initialised from {a}")
            inter = lambda x, y: float((x & y).sum()) / max(1.0, float((x | y).sum()))  # noqa: E731
            pairs[f"{a}->{b}"] = {"zero_shot": zero, "after_steps": r["test_accuracy"], "steps": r["steps"],
                                  "own_accuracy": info_b["test_accuracy"],
                                  "overlap_indicator": inter(activated[a], activated[b]),
                                  "skill_indicator": inter(skill[a], skill[b]),
                                  "seconds": round(time.perf_counter() - t0, 1)}
            (out / "transfer_pairs.json").write_text(json.dumps(pairs, indent=2) + "\n")
            log.info("transfer %s -> %s: zero-shot %.3f, after %d steps %.3f", a, b, zero, r["steps"],
                     r["test_accuracy"])
    # the same budget from the usual initialisation, so "after_steps" can be read as a gain (or a loss)
    scratch_file = out / "transfer_scratch.json"
    scratch = json.loads(scratch_file.read_text()) if scratch_file.exists() else {}
    for b in binary:
        if b in scratch:
            continue
        info_b = read_run(work / b / "seed0")
        s = _transfer_settings(info_b, args)
        scratch[b] = tune_run(info_b["model"], task_data(b), s, work / "transfer" / f"scratch__{b}", progress=False,
                              label="from scratch (transfer baseline)")["test_accuracy"]
        scratch_file.write_text(json.dumps(scratch, indent=2) + "\n")
        log.info("transfer baseline on %s: %d steps from scratch %.3f", b, args.transfer_steps, scratch[b])
    keys = sorted(pairs)
    for k in keys:  # Su et al.'s relative performance: transfer accuracy over the target's own prompt accuracy
        p = pairs[k]
        p["relative_zero_shot"] = p["zero_shot"] / p["own_accuracy"]
        p["relative_after_steps"] = p["after_steps"] / p["own_accuracy"]
        p["gain_over_scratch"] = p["after_steps"] - scratch[k.split("->")[1]]
    real = {m: np.array([pairs[k][m] for k in keys])
            for m in ("zero_shot", "after_steps", "relative_zero_shot", "relative_after_steps", "gain_over_scratch")}
    ind = {m: np.array([pairs[k][m] for k in keys]) for m in ("overlap_indicator", "skill_indicator")}
    corr = {f"{i}~{m}": spearman(ind[i], real[m]) for i in ind for m in real}
    p_values = {f"{i}~{m}": permutation_p(ind[i], real[m], corr[f"{i}~{m}"]) for i in ind for m in real}
    result = {"tasks": binary, "pairs": pairs, "scratch": scratch, "spearman": corr,
              "spearman_p_two_sided": p_values, "indicator_q": args.indicator_q,
              "transfer_steps": args.transfer_steps, "test_rows": args.transfer_rows}
    (out / "transfer.json").write_text(json.dumps(result, indent=2) + "\n")
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
            ax.scatter([p[ind] for p in pairs.values()], [p[m] for p in pairs.values()], s=10)
            ax.set_title(f"Spearman {result['spearman'][f'{ind}~{m}']:.2f}", fontsize=9)
            ax.set_xlabel(ind.replace("_", " "), fontsize=8)
            ax.set_ylabel(m.replace("_", " ") + (f" ({result['transfer_steps']} steps)" if m != "zero_shot" else ""),
                          fontsize=8)
    fig.suptitle(f"transfer over {len(pairs)} ordered task pairs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/study")
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
    p.add_argument("--transfer-tasks", default=",".join(t for t in TASKS if t not in MULTICLASS),
                   help="binary tasks whose ordered pairs are transferred (each pair costs a short tuning run; "
                        "3-class tasks are left out: a linear head cannot carry over between label sets)")
    p.add_argument("--transfer-rows", type=int, default=200)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("skillkern", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.retune_tasks = [t for t in args.retune_tasks.split(",") if t]
    args.transfer_tasks = [t for t in args.transfer_tasks.split(",") if t]
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in args.tasks.split(",") if (work / t / "seed0" / "run.json").exists()]
    parts = args.parts.split(",")
    if "prune" in parts:
        part_prune(tasks, work, out, args)
    if "cross" in parts:
        part_cross(tasks, work, out, args)
    if "transfer" in parts:
        part_transfer(tasks, work, out, args)
    if (out / "results.json").is_file():  # regenerate RESULTS.md with the new sections
        from results_md import write_results_md

        results = json.loads((out / "results.json").read_text())
        write_results_md(results, out, ROOT / "RESULTS.md" if not results.get("quick") else out / "RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
