"""Writes RESULTS.md from the study's results.json: every number in it is read from that file.

    python experiments/results_md.py        # rewrite RESULTS.md from experiments/study/*.json (computes nothing)

``run_study.py`` and ``run_applications.py`` call :func:`write_results_md` when they finish; this command does
the same from the committed result files alone (the run folders are not needed), e.g. after editing the text.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from skillkern.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
#: where benchmarks/bench_pruned_model.py writes its CSV files (the speed table of the pruning section)
BENCHMARK_RESULTS = ROOT / "benchmarks" / "results"

# The paper's figures as METHOD.md gives them (RoBERTa-base; METHOD.md marks them unverified).
PAPER = {
    "tweet_perturb_20": "about 70 -> about 45 (skill) vs about 65 (random)",
    "sst2_imdb_corr": 0.65,
    "sst2_ag_news_corr": 0.15,
}


def _f(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _p(p: float) -> str:
    """A p-value: two decimals, three below 0.01, and the permutation floor as '< 0.001'."""
    return "p < 0.001" if p < 0.001 else f"p {p:.3f}" if p < 0.01 else f"p {p:.2f}"


def _mean(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else float("nan")


def _sd(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def _acc_cell(values) -> str:
    """Mean test accuracy over seeds, with the seed standard deviation when there are several seeds."""
    return _f(_mean(values)) + (f" ± {_f(_sd(values))}" if len(values) > 1 else "")


def _acc_at(pert: dict, q: float, which: str) -> float:
    for f, v in zip(pert["fractions"], pert[which]):
        if abs(f - q) < 1e-9:
            return v
    return float("nan")


#: perturbation key -> how RESULTS.md names it
PERTURBATION_NAMES = {"gaussian": "gaussian noise, sigma 0.1 (the paper's)",
                      "gaussian_neuron": "gaussian noise, sigma = each neuron's own std",
                      "mean": "mean ablation (set to the prompt-slot threshold)"}


def verdict(ci) -> str:
    """``more`` when perturbing skill neurons costs more than random ones (the 95% interval of skill - random
    lies below 0), ``less`` when it costs less (above 0), ``tie`` when the interval holds 0."""
    return "more" if ci[1] < 0 else "less" if ci[0] > 0 else "tie"


def threads_text(threads) -> str:
    """``threads`` of results.json (the torch threads the runs were tuned with: a list; one number in older
    JSON) in words."""
    t = [threads] if isinstance(threads, int) else list(threads)
    return f"{t[0]} torch thread{'s' if t[0] != 1 else ''} per run" if len(t) == 1 else \
        f"{', '.join(map(str, t[:-1]))} or {t[-1]} torch threads per run"


def _pt(x: float) -> str:
    return f"{100 * x:+.1f}"


def _cell(pool: dict, i: int) -> str:
    ci = pool["ci"][i]
    text = f"{_f(pool['skill'][i])} / {_f(pool['random'][i])} ({_pt(pool['difference'][i])} [{_pt(ci[0])}, {_pt(ci[1])}])"
    return f"**{text}**" if verdict(ci) == "more" else f"_{text}_" if verdict(ci) == "less" else text


def learned(results: dict, head: str, task: str) -> bool:
    """The prompt left chance: mean test accuracy more than 3 points above the test rows' majority rate."""
    accs = [r["test_accuracy"] for r in results["tasks"][head][task]]
    return _mean(accs) > results["majority"][task] + 0.03


def massive_lines(results: dict) -> list[str]:
    """With the matched control: the massive-activation neurons the runs found, and how often skill selections hold
    them (from the perturbation summaries in results.json)."""
    if results.get("control") != "matched":
        return []
    found: dict = {}
    runs = holding = 0
    factor = None
    for per_task in results["tasks"].values():
        for recs in per_task.values():
            for r in recs:
                pert = next(iter(r["perturbation"].values()), None)
                if not pert or pert.get("massive_neurons") is None:
                    continue
                runs += 1
                factor = pert["outlier_factor"]
                for layer, ids in enumerate(pert["massive_neurons"]):
                    for i in ids:
                        found[(layer, i)] = found.get((layer, i), 0) + 1
                holding += any(sum(row) for row in pert["skill_massive"])
    if not runs:
        return []
    names = ", ".join(f"layer {layer} #{i}" + ("" if n == runs else f" ({n} of {runs} runs)")
                      for (layer, i), n in sorted(found.items()))
    return [f"- **Massive-activation neurons decide a uniform random control.** In the {runs} perturbed runs a few "
            f"neurons have an RMS activation over {factor:g}x their layer's median: {names}. "
            "Perturbing a random set that contains one of them can break the model to chance, so the accuracy of a "
            "uniform random control mostly says whether a draw hit one. The random control here is matched: it "
            "holds as many massive neurons as the skill selection (the skill selection holds at least one in "
            f"{holding} of {runs} runs, at some fraction), and every run draws its own neurons. (An earlier version "
            "of this study used uniform draws with one seed, the same neurons in every run: its significant "
            "differences, in both directions, mostly reflected which of those draws hit a massive neuron; it is "
            "superseded.)"]


def chance_task_lines(results: dict) -> list[str]:
    """The tasks that stayed at chance in the first study (``study_tasks["chance"]``), at this study's budget: which
    now leave chance and which still do not, per head, with their test accuracy against the majority rate."""
    planned = (results.get("study_tasks") or {}).get("chance") or []
    s = results["settings"]
    lines = []
    for head, per in results["tasks"].items():
        ran = [t for t in planned if t in per]
        if not ran:
            continue

        def acc(t):
            return (f"{t} {_f(_mean([r['test_accuracy'] for r in per[t]]))} vs {_f(results['majority'][t])}, "
                    f"{len(per[t])} seed{'s' if len(per[t]) > 1 else ''}")

        left = [acc(t) for t in ran if learned(results, head, t)]
        stay = [acc(t) for t in ran if not learned(results, head, t)]
        lines.append(f"- **The tasks at chance in the first study** ({head} head, {s['max_train']} training rows x "
                     f"{s['epochs']} epochs; test accuracy vs the majority rate): "
                     + (f"leave chance: {'; '.join(left)}" if left else "none leaves chance")
                     + (f". Still at chance (within 3 points of the majority rate, or below): {'; '.join(stay)}"
                        if stay else "") + ".")
    return lines


def summary_lines(results: dict) -> list[str]:
    """The "what holds, what does not" section: computed statements, no typed numbers."""
    q = max(results["fractions"])
    lines = ["## What holds, what does not", "",
             "- **The pipeline can see the effect when it is there.** The positive control "
             "(`tests/test_positive_control.py`, run in CI) builds a small BERT in which one planted neuron per layer "
             "carries the label, and runs it through tune, score and perturb: the planted neurons come out at the top "
             "of every layer, and perturbing them (mean ablation, and gaussian noise in units of their std) drops "
             "accuracy far below three random controls, with a paired 95% interval far from zero. The control passes."]
    fr = [q for q in results["fractions"] if q > 0]
    n_tests = 0
    for head in results["tasks"]:
        tasks = [t for t in results["tasks"][head] if learned(results, head, t) and t in results["pooled"][head]]
        at_chance = [t for t in results["tasks"][head] if t not in tasks]
        parts = []
        for key in results["perturbations"]:
            per_task = []
            for t in tasks:
                pool = results["pooled"][head][t][key]
                found = {"more": [], "less": []}
                for q in fr:
                    v = verdict(pool["ci"][pool["fractions"].index(q)])
                    if v != "tie":
                        found[v].append(f"{int(q * 100)}%")
                    n_tests += 1
                words = [f"costs more at {', '.join(found['more'])}" if found["more"] else "",
                         f"costs less at {', '.join(found['less'])}" if found["less"] else ""]
                per_task.append(f"{t} " + (" and ".join(w for w in words if w) or "no significant difference"))
            parts.append(f"{PERTURBATION_NAMES[key].split(' (')[0]}: " + "; ".join(per_task))
        lines.append(f"- **{head} head**, skill vs random neurons at {', '.join(f'{int(q * 100)}%' for q in fr)} "
                     "of each layer (95% paired interval pooled over seeds, test rows and random draws; tasks whose "
                     "prompt left chance): " + ". ".join(parts) + "."
                     + (f" At chance, not counted: {', '.join(at_chance)}." if at_chance else ""))
    lines += massive_lines(results)
    if n_tests:
        lines.append(f"- **Multiplicity**: the lines above read {n_tests} intervals at 95%; about "
                     f"{0.05 * n_tests:.1f} of them are expected to exclude zero by chance alone, so a single "
                     "significant cell is weak evidence, and a claim needs the same sign across fractions, "
                     "perturbations and tasks.")
    planned = results.get("study_tasks")
    if planned:
        done = {t for per in results["tasks"].values() for t in per}
        missing = [t for t in planned["learning"] if t not in done]
        pending = [t for t in planned["chance"] if t not in done]
        if missing or pending:
            lines.append("- **Not covered yet** (the study is resumable and still running on this CPU): "
                         + (f"the tasks that learn {', '.join(missing)}" if missing else "")
                         + ("; " if missing and pending else "")
                         + (f"the tasks at chance in the first study, at a larger budget: {', '.join(pending)}"
                            if pending else "") + ". Everything below is about the tasks listed in its tables.")
    lines += chance_task_lines(results)
    gaps: dict = {}
    for head in results["tasks"]:
        for t, per_seed in results["tasks"][head].items():
            gaps.setdefault(head, []).append(_mean([r["test_accuracy"] for r in per_seed])
                                             - _mean([r["best_predictivity"] for r in per_seed]))
    lines.append("- **Prompt accuracy vs best predictivity** (the paper finds them close): test accuracy minus best "
                 "predictivity averages " + "; ".join(f"{_pt(_mean(v))} points with the {h} head (range "
                                                      f"{_pt(min(v))} to {_pt(max(v))})" for h, v in gaps.items())
                 + ".")
    corr = results["correlation"]
    pairs = []
    for head, c in corr.items():
        names, whole = c["tasks"], np.array(c["whole_model"])
        got = [f"{a}-{b} {_f(whole[names.index(a), names.index(b)], 2)}" for a, b in (("sst2", "imdb"),
                                                                                      ("sst2", "ag_news"))
               if a in names and b in names]
        if got:
            pairs.append(f"{head} head: " + ", ".join(got))
    if pairs:
        lines.append("- **Task specificity** (Spearman correlation of predictivity; the paper: about "
                     f"{PAPER['sst2_imdb_corr']} for sst2-imdb, about {PAPER['sst2_ag_news_corr']} for sst2-ag_news): "
                     + "; ".join(pairs) + ".")
    return lines + [""]


def budget_lines(out: Path) -> list[str]:
    """The budget pilot (``budget.json``): dev accuracy against training rows seen, for two budgets."""
    f = out / "budget.json"
    if not f.is_file():
        return []
    b = json.loads(f.read_text())
    lines = [f"How the budget was chosen: {b['task']}, {b['head']} head, seed {b['seed']}, dev accuracy against "
             "training rows seen (the learning rate decays to zero over each budget):", "",
             "| budget | dev accuracy at rows seen | within 1 point of its best from | test acc |", "|---|---|---|---|"]
    for r in b["runs"]:
        curve = ", ".join(f"{n}: {_f(a)}" for n, a in zip(r["rows_seen"], r["dev_accuracy"]))
        best = max(r["dev_accuracy"])
        first = next(n for n, a in zip(r["rows_seen"], r["dev_accuracy"]) if a >= best - 0.01)
        lines.append(f"| {r['budget']} | {curve} | {first} of {r['rows_seen'][-1]} rows | "
                     f"{_f(r['test_accuracy'])} |")
    return lines + [""]


def write_results_md(results: dict, out: Path, path: Path, benchmarks: Path = BENCHMARK_RESULTS) -> None:
    """Write ``path`` (RESULTS.md) from the study's ``results`` (results.json) and the applications' JSON files in
    ``out``; the pruning section also reads the pruned-model benchmark CSVs in ``benchmarks``."""
    rel = os.path.relpath(out, path.parent)
    s = results["settings"]
    fr = [q for q in results["fractions"] if q > 0]
    heads = list(results["tasks"])
    keys = list(results["perturbations"])
    seeds = sorted({len(v) for per in results["seeds"].values() for v in per.values()})
    lines = [
        "# Results: skill neurons of all-MiniLM-L6-v2, reproduced on real data",
        "",
        "Generated by `python experiments/run_study.py` from "
        f"`{rel}/results.json` (`python experiments/run_study.py --cached-only` rewrites this file byte for byte "
        "from the committed JSON, with no run folders). Model: the embedded sentence-transformers/all-MiniLM-L6-v2 "
        f"(BERT, 6 layers x 1536 FFN neurons), on the 2-core CPU machine ({threads_text(results['threads'])}).",
        "",
    ]
    lines += summary_lines(results)
    lines += [
        "## What was run, and how it differs from the paper",
        "",
        "- **Heads** (all-MiniLM-L6-v2 ships no masked-LM head, so the paper's head cannot be used): "
        "`verbalizer` = a trained temperature times the cosine of slot 0's last hidden state with the frozen input "
        "embeddings of the class words (negative/positive; negative/neutral/positive), the closest analogue of the "
        "paper's masked-LM verbalizer: nothing but the prompt and one scalar learns; `linear` = a linear head on "
        "slot 0 trained with the prompt, which can read the label from features the frozen model computes anyway. "
        "Heads run: " + ", ".join(heads) + ".",
        f"- Prompt tuning: P = {s['prompt_len']} slots (slot 0 = the frozen [MASK] embedding), Adam (betas 0.9/0.98, "
        f"eps 1e-6), linear schedule with 0.6% warm-up, best dev checkpoint (dev evaluated every {s['eval_every']} "
        f"steps of 16 rows). **Deviations forced by the CPU budget**: the first {s['max_train']} training rows, "
        f"{s['epochs']:g} epoch(s), lr {s['lr']:g} (the paper's 1e-3 is meant for tens of thousands of steps), "
        f"sequences truncated to {s['max_length']} tokens, the first {s['max_dev']} dev rows for selection and "
        f"the first {s['max_test']} test rows (all of them where the split has fewer) for every reported accuracy.",
        f"- Scoring: the {s['prompt_len']} prompt slots, thresholds on the same training rows the prompt saw, accuracy "
        "on the dev rows (never training rows); predictivity = max over slots of max(Acc, 1-Acc), mean over seeds.",
        "- Multi-class (tweet, mnli): one 3-class prompt per seed; its skill neurons come from scoring that prompt "
        "on the class-balanced pn and neu sub-tasks and the per-layer union rule (2q neurons per layer at q). "
        "METHOD.md tunes a separate prompt per sub-task; we reuse the 3-class prompt to halve the tuning cost.",
        "- AG News and DBpedia: the paper used unspecified binary variants; we use their first two classes "
        "(World vs Sports; Company vs EducationalInstitution), class-balanced.",
        f"- Perturbation of q% of each layer's neurons at every position of every layer, {len(keys)} way(s): "
        + "; ".join(PERTURBATION_NAMES[k] for k in keys) + ". Beside each, " + f"{s['draws']} independent draws of as "
        + ("many random neurons per layer, each run with its own seed, **matched for massive-activation neurons** (as "
           "many of them as the skill selection holds, the rest uniform; `skillkern perturb --control matched`)."
           if results.get("control") == "matched" else "many uniformly random neurons per layer.")
        + " Skill vs random is judged on the same test rows by a paired "
        "bootstrap (2,000 resamples of seeds, test rows and random draws) giving a 95% interval on the accuracy "
        "difference; McNemar's exact test per run and draw is in the JSON.",
        f"- Seeds per task: {', '.join(map(str, seeds))} (per task and head in results.json). The paper ran 5.",
        "",
        "## Accuracy, predictivity and the training budget",
        "",
        "Test accuracy of the tuned prompt (mean ± sd over seeds), the majority-class rate of the same test rows, "
        "best neuron predictivity, and the training budget: rows seen when dev accuracy first came within 1 point of "
        "its best (the plateau), out of the rows seen in all.",
        "",
        "| task | head | seeds | test acc | majority | best pred | plateau at rows | rows seen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for head in heads:
        for name, per_seed in results["tasks"][head].items():
            curves = [r["curve"] for r in per_seed if r.get("curve")]
            lines.append(f"| {name} | {head} | {len(per_seed)} | {_acc_cell([r['test_accuracy'] for r in per_seed])} | "
                         f"{_f(results['majority'][name])} | {_f(_mean([r['best_predictivity'] for r in per_seed]))} | "
                         + (f"{', '.join(str(c['plateau_rows']) for c in curves)} | {curves[0]['total_rows']} |"
                            if curves else "- | - |"))
    lines += [""] + budget_lines(out)
    for key, name in PERTURBATION_NAMES.items():
        if key not in results["perturbations"]:
            continue
        lines += [f"## Perturbation: {name}", "",
                  "Test accuracy with q% of each layer's neurons perturbed: skill / random (mean of the draws), and "
                  "skill - random in points with its 95% paired interval, pooled over seeds. **Bold**: skill "
                  "neurons cost significantly more; _italic_: significantly less. Last column: the spread (min-max) "
                  f"of the single random draws at {int(max(fr) * 100)}%, over seeds and draws.", "",
                  "| task | head | clean | " + " | ".join(f"{int(q * 100)}%" for q in fr) + " | random draws |",
                  "|---|---|---|" + "---|" * len(fr) + "---|"]
        for head in heads:
            for task, per_seed in results["tasks"][head].items():
                if task not in results["pooled"][head]:  # every seed stayed at chance: scored, not perturbed
                    lines.append(f"| {task} (chance) | {head} | - | " + " | ".join("not perturbed" for _ in fr)
                                 + " | - |")
                    continue
                per_seed = [r for r in per_seed if r["perturbation"]]
                pool = results["pooled"][head][task][key]
                clean = _mean([r["perturbation"][key]["clean_accuracy"] for r in per_seed])
                draws = [d for r in per_seed for d in r["perturbation"][key]["random_draws"][-1]]
                chance = "" if learned(results, head, task) else " (chance)"
                lines.append(f"| {task}{chance} | {head} | {_f(clean)} | "
                             + " | ".join(_cell(pool, pool["fractions"].index(q)) for q in fr)
                             + f" | {_f(min(draws))}-{_f(max(draws))} |")
        lines += [""]
    lines += [f"Paper (RoBERTa-base, METHOD.md, unverified): TweetEval at 20%: {PAPER['tweet_perturb_20']}.", "",
              f"![perturbation curves]({rel}/perturbation_overview.png)", ""]
    n_layers = len(next(iter(next(iter(results["tasks"].values())).values()))[0]["layer_profile"])
    lines += ["## Where skill neurons live", "",
              "Share of each layer among the model's top 1% neurons by predictivity (mean over seeds).", "",
              "| task | head | " + " | ".join(f"layer {k}" for k in range(n_layers)) + " |",
              "|---|---|" + "---|" * n_layers]
    for head in heads:
        for task, per_seed in results["tasks"][head].items():
            prof = np.mean([r["layer_profile"] for r in per_seed], axis=0)
            lines.append(f"| {task} | {head} | " + " | ".join(f"{v:.0%}" for v in prof) + " |")
    lines += [""]
    for head, corr in results["correlation"].items():
        tasks = corr["tasks"]
        whole = np.array(corr["whole_model"])
        lines += [f"## Task specificity ({head} head): Spearman correlation of neuron predictivity", "",
                  "| | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for i, a in enumerate(tasks):
            lines.append(f"| {a} | " + " | ".join(_f(whole[i, j], 2) for j in range(len(tasks))) + " |")
        lines += ["", "Whole model (all layers' neurons, seed-mean predictivity; 3-class tasks: max of pn and neu).",
                  "", f"![correlations]({rel}/correlation_{head}.png)", ""]
    if results.get("controls"):
        lines += ["## Untrained random prompt and hand-written prompt", "",
                  f"Best predictivity and mean of the top 1% of neurons ({results['controls_head']} head), scored on "
                  "the same rows as the tuned prompt (seed 0, for the tuned prompt too).", "",
                  "| task | tuned best | random best | hand-written best | tuned top-1% | random top-1% | "
                  "hand-written top-1% |", "|---|---|---|---|---|---|---|"]
        for name, c in results["controls"].items():
            lines.append(f"| {name} | {_f(c['tuned'])} | {_f(c['random'])} | {_f(c['handwritten'])} | "
                         f"{_f(c['tuned_mean_top1pct'])} | {_f(c['random_mean_top1pct'])} | "
                         f"{_f(c['handwritten_mean_top1pct'])} |")
        lines += ["", "The hand-written prompt's slots hold the token embeddings of one question per task "
                  f"(`HANDWRITTEN` in experiments/run_study.py), cycled to fill the {s['prompt_len'] - 1} trained "
                  "slots.", ""]
    if results.get("bitfit"):
        lines += ["## BitFit: do prompt-found skill neurons matter without a prompt?", "",
                  "BitFit trains only the backbone's biases (and the head), with no prompt; we then perturb the skill "
                  "neurons found with the task's prompt (seed 0) at every position.", "",
                  "| task | perturbation | BitFit test acc | " + " | ".join(f"{int(q * 100)}% skill / random"
                                                                           for q in fr) + " |",
                  "|---|---|---|" + "---|" * len(fr)]
        for name, b in results["bitfit"].items():
            for key, pert in b["perturbation"].items():
                cells = [f"{_f(_acc_at(pert, q, 'skill'))} / {_f(_acc_at(pert, q, 'random'))}" for q in fr]
                lines.append(f"| {name} | {key} | {_f(b['test_accuracy'])} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += applications_sections(out, rel, benchmarks, study=results)
    lines += ["## Files", "",
              f"- `{rel}/results.json`: everything above, per seed and head, with the perturbation curves and the "
              "pooled tests;",
              f"- `{rel}/table.csv`: the perturbation tables; `{rel}/perturbation/*.png`: one curve per run (mean "
              "ablation);",
              "- the run folders (prompts, stats files, per-row outcomes) are written under `runs/study/` and not "
              "committed.", ""]
    atomic_write_text(path, "\n".join(lines))


def _latest_rows(results_dir: Path, bench: str) -> list[dict]:
    """The rows of ``bench``'s CSV files, the newest of each measurement: a CSV keeps every run (its rows carry
    device, commit and date), and a later run of a shape supersedes an earlier one here."""
    import csv

    latest: dict = {}
    for f in sorted(results_dir.glob(f"{bench}_*.csv")):
        for r in csv.DictReader(f.open()):
            key = tuple(r.get(k, "") for k in ("op", "provider", "shape", "dtype", "metric", "device"))
            if key not in latest or r.get("timestamp", "") >= latest[key].get("timestamp", ""):
                latest[key] = r
    return list(latest.values())


def _speed_lines(results_dir: Path) -> list[str]:
    """The measured end-to-end speed-up of pruned models, from benchmarks/bench_pruned_model.py's CSV files."""
    measured = _latest_rows(results_dir, "pruned_model")
    rows = [r for r in measured if r["metric"] == "speedup_vs_dense"]
    if not rows:
        return []
    table: dict = {}
    for r in rows:
        model, *rest = r["shape"].split(":")
        shape = " ".join(x for x in rest if x.startswith(("batch", "seq")))
        table.setdefault((r["device"], r.get("dtype", ""), model, shape), {})[r["provider"]] = r
    lines = ["Measured speed-up of the pruned model, end to end (`benchmarks/bench_pruned_model.py`, median of "
             "repeated forward passes, dense model timed in the same run; `flop-limit` = the speed-up the removed "
             "FLOPs allow; where several pruned providers were timed, the faster one is shown):", "",
             "| device | dtype | model | shape | provider | measured | p20-p80 | FLOP limit | share of limit |",
             "|---|---|---|---|---|---|---|---|---|"]
    low = []
    for (device, dtype, model, shape), v in table.items():
        pruned = [r for k, r in v.items() if k.startswith("pruned")]
        best = max(pruned, key=lambda r: float(r["median"]), default=None)
        got = float(best["median"]) if best else float("nan")
        lim = float(v["flop-limit"]["median"]) if "flop-limit" in v else float("nan")
        spread = f"{float(best['p20']):.2f}-{float(best['p80']):.2f}" if best else "-"
        lines.append(f"| {device} | {dtype} | {model} | {shape} | {best['provider'][7:] if best else '-'} | "
                     f"{got:.2f}x | {spread} | {lim:.2f}x | {got / lim:.0%} |")
        if not got >= 0.9 * lim:
            low.append(f"{model} {shape}")
    lines += ["", "Shares above 100% are within the timing spread (p20/p80 are in the CSV): the FLOP limit counts "
              "matrix products only, and the shrunken weights also stay in cache. "
              + (f"Below the 90% goal: {', '.join(low)}." if low else "Every shape reaches the 90% goal.")]
    shares: dict = {}
    for r in measured:
        if r["metric"] == "matmul_time_share":
            shares.setdefault(r["shape"].split(":")[0], []).append(float(r["median"]))
    if shares:
        lines += ["Profiled share of the dense model's time in matrix products (the part that shrinks with the "
                  "removed FLOPs; LayerNorm, activations, adds, copies and dispatch do not): "
                  + ", ".join(f"{m} {min(v):.0%}-{max(v):.0%}" for m, v in shares.items())
                  + ". The smaller the model, the larger the part the FLOP limit does not see."]
    if all(f.name.endswith("_cpu.csv") for f in results_dir.glob("pruned_model_*.csv")):
        lines += ["Only CPU numbers exist: no GPU has been available to this project's sessions so far."]
    return lines + [""]


def _retune_epochs(pr: dict) -> str:
    return ", ".join(sorted({f"{e['prompt']['retune_epochs']:g}" for e in pr.values() if "retune_epochs" in e["prompt"]}))


_TRANSFER_METRICS = (("zero-shot", "zero_shot"), ("after tuning", "after_steps"),
                     ("relative zero-shot", "relative_zero_shot"), ("relative after tuning", "relative_after_steps"),
                     ("gain over scratch", "gain_over_scratch"))


def applications_sections(out: Path, rel: str, benchmarks: Path = BENCHMARK_RESULTS,
                          study: dict | None = None) -> list[str]:
    """Sections from experiments/run_applications.py's and run_pruning.py's outputs, when they exist; ``study``
    (results.json) names the tasks that learn but have no pruning comparison yet."""
    lines: list[str] = []
    f = out / "pruning.json"
    if f.is_file():
        pr = json.loads(f.read_text())
        any_task = next(iter(pr.values()))["prompt"]
        if "head" not in any_task:
            lines += ["## Applications (from the first study's runs)", "",
                      "The pruning, cross-task and transferability sections below were computed on the first "
                      "study's seed-0 runs (linear head, 1,000 training rows, 2 epochs, 400 test rows) and have not "
                      "been rerun on the runs above.", ""]
        lines += ["## Pruning to skill neurons", "",
                  f"`skillkern prune --keep {any_task['keep']} --layers {any_task['layers']}` on each task's seed-0 run "
                  f"(layers {any_task['pruned_layers']} keep {any_task['keep']:.0%} of their neurons, 2x that for "
                  "3-class tasks by the union rule; the rest frozen at a baseline and folded into the bias). Two "
                  "baselines for the folded neurons: the paper's (the run's thresholds, averaged over the prompt "
                  "slots) and the mean over all real positions of the training rows. Test accuracy on the same rows "
                  "as the main table; 'pruned + re-tuned' starts from the run's prompt and head and tunes again on "
                  "the pruned model" + ("" if all("test_accuracy_pruned_retuned" in e["prompt"] for e in pr.values())
                                        else " (only for some tasks, CPU budget)")
                  + f", for {_retune_epochs(pr)} epoch(s) on the same rows.", "",
                  "| task | original | pruned (prompt-slot baseline) | pruned (token-mean baseline) | "
                  "pruned + re-tuned | parameters kept |", "|---|---|---|---|---|---|"]
        wins = {"prompt": 0, "tokens": 0}
        for name, e in pr.items():
            p, t = e["prompt"], e["tokens"]
            if p["test_accuracy_pruned"] > t["test_accuracy_pruned"]:
                wins["prompt"] += 1
            elif t["test_accuracy_pruned"] > p["test_accuracy_pruned"]:
                wins["tokens"] += 1
            lines.append(f"| {name} | {_f(p['test_accuracy_original'])} | {_f(p['test_accuracy_pruned'])} | "
                         f"{_f(t['test_accuracy_pruned'])} | {_f(p.get('test_accuracy_pruned_retuned'))} | "
                         f"{p['params_after'] / p['params_before']:.1%} |")
        drops = [e["prompt"]["test_accuracy_original"] - e["prompt"]["test_accuracy_pruned_retuned"]
                 for e in pr.values() if "test_accuracy_pruned_retuned" in e["prompt"]]
        if drops:
            lines += ["", f"After re-tuning, the pruned model is within 2 points of the original on "
                      f"{sum(d <= 0.02 for d in drops)} of {len(drops)} tasks (mean change "
                      f"{-100 * _mean(drops):+.1f} points, worst {-100 * max(drops):+.1f})."]
        lines += ["", f"The prompt-slot baseline keeps more accuracy on {wins['prompt']} tasks, the token-mean "
                  f"baseline on {wins['tokens']} (ties: the rest). The paper (RoBERTa-base, 9 of 12 layers at 2%, "
                  "re-tuned prompt) reports a few points lost and about 1.34-1.38x faster inference; its Table 4 "
                  "figures are not in METHOD.md, so none are copied here.", ""]
        lines += _speed_lines(benchmarks)
    f = out / "pruning_criteria" / "pruning_criteria.json"
    if f.is_file():  # experiments/run_pruning.py --out OUT/pruning_criteria
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from run_pruning import criteria_table

        pc = json.loads(f.read_text())
        lines += ["## Skill neurons against the structured-pruning criteria", "",
                  "`skillkern prune --criterion skill|flap|wanda|magnitude|random` on every seed of each task "
                  "(experiments/run_pruning.py): the same number of neurons kept in each pruned layer, the others "
                  "folded at the same fill value; FLAP = activation variance x squared W2 column norm, Wanda = "
                  "activation L2 norm x W2 column norm (per neuron), magnitude = mean |activation|, from the "
                  "moments of the training rows. Test accuracy, pruned and pruned + re-tuned.", ""]
        lines += criteria_table(pc)
        compared = {t.split("/")[0] for t in pc["tasks"]}  # a sub-task's label (ag_news/pair:0,1) counts as its task
        # the study's tasks left out are named, not left out silently: those whose prompt learns with some head are
        # still owed a comparison; those at chance with every head are stated, since their pruned accuracy can only
        # match the majority rate and so cannot rank the criteria
        todo, flat = [], []
        for t in [] if study is None else study["majority"]:
            heads = [h for h, per in study["tasks"].items() if t in per]
            if t not in compared and heads:
                (todo if any(learned(study, h, t) for h in heads) else flat).append(t)
        if todo:
            lines += ["", "Not compared yet (the study's other tasks whose prompts learn; still to run, with "
                      f"experiments/run_pruning.py on their run folders): {', '.join(todo)}."]
        if flat:
            lines += ["", "Not compared (prompts at chance with every head, so a pruned model has no accuracy to "
                      f"keep and cannot rank the criteria): {', '.join(flat)}."]
        lines += ["", f"![pruning criteria]({rel}/pruning_criteria/pruning_criteria.png)", ""]
    f = out / "cross_task.json"
    if f.is_file():
        ct = json.loads(f.read_text())
        tasks = ct["tasks"]
        lines += ["## Cross-task perturbation", "",
                  f"Rows: evaluated task B; columns: task A whose skill neurons are perturbed (gaussian, as many per "
                  f"layer as B's own selection at q = {ct['q']}), first {ct['test_rows']} test rows. Cells: accuracy "
                  "minus B's random-control accuracy (negative = A's skill neurons hurt B more than random ones).", "",
                  "| B \\ A | clean | random | " + " | ".join(tasks) + " |", "|---|---|---|" + "---|" * len(tasks)]
        own_worst = 0
        for b in tasks:
            r = ct["rows"][b]
            deltas = {a: r["skill_of"][a] - r["random"] for a in tasks}
            if all(deltas[b] < d for a, d in deltas.items() if a != b):
                own_worst += 1
            lines.append(f"| {b} | {_f(r['clean'])} | {_f(r['random'])} | "
                         + " | ".join(f"{100 * deltas[a]:+.1f}" for a in tasks) + " |")
        lines += ["", f"A task's own skill neurons are strictly the most harmful column for {own_worst} of "
                  f"{len(tasks)} tasks.", "", f"![cross-task perturbation]({rel}/cross_task.png)", ""]
    f = out / "transfer.json"
    if f.is_file():
        tr = json.loads(f.read_text())
        seeds = tr.get("seeds", [0])
        n_pairs = len(tr["pairs"])
        counts = tr.get("pairs_per_metric", {})
        lines += ["## Transferability indicators", "",
                  f"For every ordered pair of {', '.join(tr['tasks'])} ({n_pairs} pairs): task A's prompt "
                  f"initialises task B's tuning, and accuracy on B is measured zero-shot and after "
                  f"{tr['transfer_steps']} tuning steps (first {tr['test_rows']} test rows"
                  + (f"; each pair run with the runs of seeds {', '.join(map(str, seeds))} and averaged" if len(seeds) > 1
                     else f"; seed {seeds[0]}") + "). A's linear head comes with the prompt when A and B have the "
                  "same number of labels; across label counts B starts from a fresh head and zero-shot is not "
                  f"defined ({counts.get('zero_shot', n_pairs)} of {n_pairs} pairs have a zero-shot number). "
                  "Indicators: Su et al.'s overlap of the neurons the two prompts activate (> 0 at a prompt slot on "
                  "most of 64 fixed probe texts; Jaccard), and the overlap of the two tasks' skill neurons (top "
                  f"{tr['indicator_q']:.0%} per layer; for 3-class tasks of the larger of the pn / neu "
                  "predictivities; Jaccard).", "",
                  "Spearman correlation of each indicator, over the pairs, with: the zero-shot accuracy; the accuracy "
                  "after tuning; both divided by B's own prompt accuracy (Su et al.'s relative performance, which "
                  "removes how easy B is); and the gain after tuning over the same budget from scratch.", ""]

        def table(block: dict, title: str) -> list[str]:
            sp, pv, cnt = block["spearman"], block.get("spearman_p_two_sided", {}), block.get("pairs_per_metric", {})
            out_lines = [title, "", "| indicator | " + " | ".join(
                             f"{m} ({cnt[key]} pairs)" if key in cnt else m for m, key in _TRANSFER_METRICS) + " |",
                         "|---|" + "---|" * len(_TRANSFER_METRICS)]
            for ind, label in (("overlap_indicator", "activated-neuron overlap (Su et al.)"),
                               ("skill_indicator", "skill-neuron overlap")):
                out_lines.append(f"| {label} | " + " | ".join(
                    _f(sp.get(f"{ind}~{key}"), 2)
                    + (f" ({_p(pv[f'{ind}~{key}'])})" if pv.get(f"{ind}~{key}") == pv.get(f"{ind}~{key}")
                       and f"{ind}~{key}" in pv else "")
                    for _, key in _TRANSFER_METRICS) + " |")
            return out_lines + [""]

        lines += table(tr, "All pairs" + (", seed means:" if len(seeds) > 1 else ":"))
        if tr.get("same_labels") and tr["same_labels"]["pairs_per_metric"].get("after_steps", 0) < n_pairs:
            lines += table(tr["same_labels"], "Only the pairs with the same number of labels (head carried over):")
        per_seed = tr.get("per_seed", {})
        if len(per_seed) > 1:
            lines += ["Per seed (all pairs), Spearman with the accuracy after tuning and with the gain over scratch:",
                      "", "| seed | overlap ~ after | skill ~ after | overlap ~ gain | skill ~ gain |",
                      "|---|---|---|---|---|"]
            for sd, block in per_seed.items():
                sp = block["spearman"]
                lines.append(f"| {sd} | " + " | ".join(_f(sp.get(k), 2) for k in (
                    "overlap_indicator~after_steps", "skill_indicator~after_steps",
                    "overlap_indicator~gain_over_scratch", "skill_indicator~gain_over_scratch")) + " |")
            lines.append("")
        lines += ["p: two-sided permutation p-value over the pairs (2,000 permutations); the pairs share tasks, so "
                  "they are not independent and p is, if anything, too small.", ""]
        if tr.get("scratch"):
            pairs = tr["pairs"]
            helped = sum(p.get("gain_over_scratch", 0) > 0 for p in pairs.values())
            lines += [f"Transfer beats the same {tr['transfer_steps']} steps from scratch on {helped} of "
                      f"{n_pairs} pairs (mean gain {100 * _mean([p.get('gain_over_scratch') for p in pairs.values()]):+.1f} "
                      "points). From scratch: " + ", ".join(f"{b} {_f(v)}" for b, v in tr["scratch"].items()) + ".", ""]
        lines += ["Paper (RoBERTa-base, METHOD.md, unverified): 0.71 for the skill-neuron indicator vs 0.53 for the "
                  "overlap indicator. Here the head is a linear head carried over with the prompt, so on a pair with "
                  "a carried head the zero-shot accuracy also depends on whether the two tasks' label ids mean alike; "
                  f"with short budgets and {tr['test_rows']} test rows the real-transfer numbers are noisy; read the correlations "
                  "with that in mind.", "",
                  f"![transfer]({rel}/transfer.png)", ""]
    return lines


def results_md_path(out: Path, quick: bool) -> Path:
    """Where RESULTS.md goes: the repository root for the committed study (``--out experiments/study``), else
    ``out/RESULTS.md``, so that a preview in another folder or a --quick study never replaces the committed file."""
    committed = (ROOT / "experiments" / "study").resolve()
    return ROOT / "RESULTS.md" if not quick and Path(out).resolve() == committed else Path(out) / "RESULTS.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "experiments" / "study"),
                   help="the study's result folder (results.json, pruning.json, ...)")
    p.add_argument("--results-md", default=None,
                   help="file to write (default: RESULTS.md at the repository root for the committed study, "
                        "OUT/RESULTS.md for any other --out or a --quick study)")
    p.add_argument("--benchmarks", default=str(BENCHMARK_RESULTS), help="folder of the benchmark CSVs")
    args = p.parse_args(argv)
    out = Path(args.out)
    results = json.loads((out / "results.json").read_text())
    path = Path(args.results_md) if args.results_md else results_md_path(out, bool(results.get("quick")))
    write_results_md(results, out, path, Path(args.benchmarks))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
