"""The ``skillkern`` command (also ``python -m skillkern``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger("skillkern")


def _add_score_parser(sub) -> None:
    p = sub.add_parser("score", help="score every FFN neuron's predictivity for a task",
                       description="Two streaming passes: thresholds on the baseline split, accuracy counts on the "
                                   "evaluation split. Writes OUT/stats.safetensors, OUT/summary.json and "
                                   "OUT/predictivity.png.")
    p.add_argument("--model", default="minilm", help="'minilm' (embedded default), a hub id or a local path")
    p.add_argument("--task", default=None, help="task name (folder under --data / SKILLKERN_DATA) or a task folder")
    p.add_argument("--run", default=None, help="score the prompt slots of this tuned run (pool 'prompt') on the "
                                               "train/dev split it was tuned on; --task/--model come from the run")
    p.add_argument("--data", default=None, help="data folder holding <task>/{train,dev,test}.jsonl + task.json "
                                                "(default: $SKILLKERN_DATA, then the HF hub when online)")
    p.add_argument("--subtask", default=None, help="binary sub-task of a multi-class task: pn, neu, ovr:<c>, pair:<a>,<b>")
    p.add_argument("--pool", default="cls", choices=["cls", "last", "mean", "max"], help="tracked position(s)")
    p.add_argument("--baseline-split", default="train", help="split giving the thresholds")
    p.add_argument("--eval-split", default="dev", help="split on which accuracy is counted")
    p.add_argument("--max-baseline", type=int, default=None, help="use the first N rows of the baseline split")
    p.add_argument("--max-eval", type=int, default=None, help="use the first N rows of the evaluation split")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pad-multiple", type=int, default=32,
                   help="pad each sample to a multiple of this many tokens (batch-invariant results); 0: longest in batch")
    p.add_argument("--which", default="neuron", choices=["neuron", "gate"],
                   help="neuron: input of the down-projection; gate: act(W_gate x) of gated MLPs")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "ext", "triton"],
                   help="statistics op; triton (and auto on CUDA) scores through the fused FFN kernel for pools "
                        "cls/last")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="split a large model over the GPUs: 'auto', 'balanced', 'sequential' (transformers' "
                        "device_map, needs accelerate); each layer's statistics stay on its GPU. Not with --device")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/dev split when a task has no dev file")
    p.add_argument("--top", type=int, default=10, help="print this many top neurons")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint*.safetensors if present (same job only)")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="K",
                   help="save an atomic checkpoint every K batches (default 50)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="drop samples with NaN/Inf activations (counted in summary.json) instead of stopping")
    p.add_argument("--out", default=None, help="output folder (default with --run: RUN/scores/<subtask or task>)")
    p.set_defaults(func=cmd_score)


def _first(rows: Sequence, n: Optional[int]) -> Sequence:
    if n is None:
        return rows
    if n < 1:
        raise SystemExit(f"error: --max-baseline/--max-eval must be >= 1, got {n}")
    return rows[:n]


def cmd_score(args) -> int:
    if args.run is not None:
        return _score_run(args)
    if args.task is None or args.out is None:
        raise SystemExit("error: skillkern score needs --task and --out (or --run RUN)")
    import torch

    from . import __version__
    from .data import binary_subtask, load_task
    from .models import load_model, model_id
    from .plotting import plot_predictivity
    from .scoring import ScoreSettings, Scorer
    from .stats import top_neurons

    from .checkpoint import Checkpoint

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = _init_distributed(args.device)
    task = load_task(args.task, args.data, seed=args.seed)
    if args.subtask:
        task = binary_subtask(task, args.subtask, seed=args.seed)
    baseline = _first(task.split(args.baseline_split), args.max_baseline)
    evaluation = _first(task.split(args.eval_split), args.max_eval)

    if args.device_map is not None:
        if args.device is not None:
            raise SystemExit("error: give --device or --device-map, not both")
        model, tokenizer = load_model(args.model, device_map=args.device_map)
        device = next(model.parameters()).device  # where the batches go; the layers may be elsewhere
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and world > 1 and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        model, tokenizer = load_model(args.model, device=device)
    settings = ScoreSettings(pool=args.pool, max_length=args.max_length, batch_size=args.batch_size,
                             pad_multiple=args.pad_multiple, backend=args.backend, which=args.which)
    scorer = Scorer(model, tokenizer, task.num_classes, settings, progress=not args.no_progress and rank == 0,
                    nonfinite="skip" if args.skip_nonfinite else "raise")
    logger.info("scoring %s on %s: %d layers x %d neurons, baseline %s (%d rows), eval %s (%d rows)",
                model_id(model), task.name, len(scorer.layers), scorer.width,
                args.baseline_split, len(baseline), args.eval_split, len(evaluation))
    fingerprint = {"model": model_id(model), "task": task.name, "task_source": task.source,
                   "subtask": args.subtask, "baseline_split": args.baseline_split, "eval_split": args.eval_split,
                   "baseline_rows": len(baseline), "eval_rows": len(evaluation), "seed": args.seed,
                   "settings": settings.to_dict(), "world_size": world, "rank": rank}
    ckpt_name = "checkpoint.safetensors" if world == 1 else f"checkpoint.rank{rank}.safetensors"
    checkpoint = Checkpoint(out / ckpt_name, fingerprint, every=args.checkpoint_every, resume=args.resume)
    started = time.perf_counter()
    stats = scorer.score(baseline, evaluation, checkpoint=checkpoint)
    elapsed = time.perf_counter() - started
    if rank != 0:
        _finish_distributed(world)
        checkpoint.remove()
        return 0

    pred = stats.predictivity()
    sign = stats.sign()
    meta = {
        "skillkern_version": __version__,
        "model": model_id(model),
        "model_type": model.config.model_type,
        "layers": len(scorer.layers),
        "width": scorer.width,
        "task": task.name,
        "task_source": task.source,
        "label_names": task.label_names,
        "subtask": args.subtask,
        "baseline_split": args.baseline_split,
        "eval_split": args.eval_split,
        "baseline_rows": len(baseline),
        "eval_rows": len(evaluation),
        "split_seed": args.seed,
        "settings": settings.to_dict(),
        "backends": scorer.backends,
        "neuron_path": scorer.path,
        "neuron": "input of the FFN down-projection" if args.which == "neuron" else "act(W_gate x)",
        "world_size": world,
        "skipped_nonfinite": scorer.skipped,
    }
    stats.save(out / "stats.safetensors", meta)
    top = top_neurons(pred, args.top, sign)
    summary = dict(meta)
    summary.update({
        "baseline_class_count": stats.baseline_class_count.tolist(),
        "eval_class_count": stats.eval_class_count.tolist(),
        "per_layer_best_predictivity": pred.max(dim=1).values.tolist(),
        "per_layer_mean_predictivity": pred.mean(dim=1).tolist(),
        "top_neurons": top,
        "seconds": round(elapsed, 3),
        "device": str(device),
        "layer_devices": sorted({str(d) for d in scorer.layer_devices}),
    })
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_predictivity(pred, out / "predictivity.png", title=f"{task.name}: {meta['model']} ({args.pool})")

    print(f"scored {len(scorer.layers)} x {scorer.width} neurons of {meta['model']} on {task.name} "
          f"({len(baseline)} baseline rows, {len(evaluation)} eval rows) in {elapsed:.1f}s")
    _print_top(top)
    print(f"wrote {out / 'stats.safetensors'}, {out / 'summary.json'}, {out / 'predictivity.png'}")
    _finish_distributed(world)
    checkpoint.remove()  # the result file now holds everything the checkpoint had
    return 0


def _score_run(args) -> int:
    from .perturb import score_run, scores_path
    from .plotting import plot_predictivity
    from .stats import top_neurons

    out = Path(args.out) / "stats.safetensors" if args.out else scores_path(args.run, args.subtask)
    started = time.perf_counter()
    stats, meta = score_run(args.run, subtask=args.subtask, max_baseline=args.max_baseline, max_eval=args.max_eval,
                            batch_size=args.batch_size, backend=args.backend, device=args.device, data=args.data,
                            progress=not args.no_progress, out=out)
    pred, sign = stats.predictivity(), stats.sign()
    top = top_neurons(pred, args.top, sign)
    summary = dict(meta, top_neurons=top, seconds=round(time.perf_counter() - started, 3),
                   per_layer_best_predictivity=pred.max(dim=1).values.tolist(),
                   per_layer_mean_predictivity=pred.mean(dim=1).tolist(),
                   baseline_class_count=stats.baseline_class_count.tolist(),
                   eval_class_count=stats.eval_class_count.tolist())
    (out.parent / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_predictivity(pred, out.parent / "predictivity.png", title=f"{meta['task']}: prompt slots of {args.run}")
    print(f"scored the {stats.num_slots} prompt slots of {args.run} on {meta['task']} "
          f"({meta['baseline_rows']} baseline rows, {meta['eval_rows']} eval rows)")
    _print_top(top)
    print(f"wrote {out}")
    return 0


def _print_top(top) -> None:
    print(f"{'rank':>4} {'layer':>5} {'neuron':>6} {'pred':>7} {'sign':>4}")
    for rank, row in enumerate(top, 1):
        print(f"{rank:>4} {row['layer']:>5} {row['neuron']:>6} {row['predictivity']:>7.4f} {row['sign']:>+4d}")


def _add_tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="prompt-tune a frozen model on a task (or BitFit)",
                       description="Soft prompt tuning on a frozen backbone (METHOD.md section 2). Writes RUN/run.json, "
                                   "RUN/prompt.safetensors and RUN/curve.png.")
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--subtask", default=None, help="binary sub-task: pn, neu, ovr:<c>, pair:<a>,<b>")
    p.add_argument("--method", default="prompt", choices=["prompt", "bitfit"])
    p.add_argument("--prompt-len", type=int, default=16, help="P prompt slots, slot 0 included")
    p.add_argument("--head", default="auto", choices=["auto", "mlm", "linear"],
                   help="auto: masked-LM verbalizer when the model has an MLM head, else a linear head on slot 0")
    p.add_argument("--epochs", type=float, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.006)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-train", type=int, default=None, help="first N training rows")
    p.add_argument("--max-dev", type=int, default=None, help="first N dev rows")
    p.add_argument("--max-test", type=int, default=None, help="first N test rows")
    p.add_argument("--eval-every", type=int, default=0, help="steps between dev evaluations (0: each epoch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 80/20 train/dev split")
    p.add_argument("--device", default=None)
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="run folder")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    from .data import binary_subtask, load_task
    from .tune import TuneSettings, tune_run

    settings = TuneSettings(method=args.method, prompt_len=args.prompt_len, head=args.head, epochs=args.epochs,
                            lr=args.lr, warmup=args.warmup, batch_size=args.batch_size, max_length=args.max_length,
                            max_train=args.max_train, max_dev=args.max_dev, max_test=args.max_test,
                            eval_every=args.eval_every, seed=args.seed, split_seed=args.split_seed)
    task = load_task(args.task, args.data, seed=args.split_seed)
    if args.subtask:
        task = binary_subtask(task, args.subtask, seed=args.split_seed)
    info = tune_run(args.model, task, settings, args.out, device=args.device, resume=args.resume,
                    progress=not args.no_progress)
    test = info["test_accuracy"]
    print(f"{info['task']}{'/' + info['subtask'] if info['subtask'] else ''}: best dev accuracy "
          f"{info['dev_accuracy']:.4f} (step {info['best_step']}), test accuracy "
          f"{'n/a' if test is None else f'{test:.4f}'}; head: {info['head_description']}")
    print(f"wrote {args.out}/run.json, prompt.safetensors, curve.png")
    return 0


def _fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fractions must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"--fractions must be in [0, 1], got {text!r}")
    return values


def _add_perturb_parser(sub) -> None:
    p = sub.add_parser("perturb", help="perturb a run's skill neurons beside random neurons; test accuracy",
                       description="Perturbs the selected neurons at all positions and, beside them, the same number "
                                   "of random neurons per layer. Writes JSON and a PNG curve.")
    p.add_argument("--run", required=True)
    p.add_argument("--mode", default="gaussian", choices=["gaussian", "zero", "mean"])
    p.add_argument("--fractions", type=_fractions, default=[0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2],
                   help="comma-separated per-layer fractions q (default 0,0.01,0.02,0.05,0.1,0.15,0.2)")
    p.add_argument("--neurons-from", default=None, help="use the skill neurons of this other run (cross-task)")
    p.add_argument("--sigma", type=float, default=0.1, help="gaussian noise standard deviation")
    p.add_argument("--seed", type=int, default=0, help="noise and random-control seed")
    p.add_argument("--max-test", type=int, default=None, help="first N test rows (default: the run's cap)")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="output JSON (default RUN/perturb_<mode>[_from_<run>].json)")
    p.set_defaults(func=cmd_perturb)


def cmd_perturb(args) -> int:
    from .perturb import perturb_run
    from .plotting import plot_perturbation

    result = perturb_run(args.run, mode=args.mode, fractions=args.fractions, neurons_from=args.neurons_from,
                         sigma=args.sigma, seed=args.seed, max_test=args.max_test, split=args.split,
                         batch_size=args.batch_size, device=args.device, data=args.data,
                         progress=not args.no_progress)
    if args.out:
        out = Path(args.out)
    else:
        suffix = f"_from_{Path(args.neurons_from).name}" if args.neurons_from else ""
        out = Path(args.run) / f"perturb_{args.mode}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot_perturbation(result, out.with_suffix(".png"))
    print(f"{result['task']}: {args.mode} perturbation of the skill neurons of {result['neurons_task']} "
          f"({result['test_rows']} {args.split} rows, clean accuracy {result['clean_accuracy']:.4f})")
    print(f"{'q':>6} {'neurons':>8} {'skill':>7} {'random':>7}")
    for q, n, a, b in zip(result["fractions"], result["neurons_per_layer"], result["skill"], result["random"]):
        print(f"{q:>6.2f} {sum(n):>8d} {a:>7.4f} {b:>7.4f}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _add_prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a run's model to its skill neurons (bias folding), save and evaluate",
                       description="Keeps the top --keep skill neurons of each pruned layer, freezes the others at "
                                   "their baseline and folds them into the down-projection bias, slices W1/b1/W2. "
                                   "OUT/model reloads with skillkern.load_model(OUT/model).")
    p.add_argument("--run", required=True, help="a scored run folder")
    p.add_argument("--keep", type=float, default=0.02, help="per-layer fraction of neurons kept (default 0.02)")
    p.add_argument("--layers", default="top:0.75", help="top:F (top F of layers), all, or indices (default top:0.75)")
    p.add_argument("--baseline", default="prompt", choices=["prompt", "tokens"],
                   help="value of pruned neurons: prompt-slot mean (paper) or mean over all tokens")
    p.add_argument("--retune", action="store_true", help="re-tune the prompt on the pruned model (OUT/retuned)")
    p.add_argument("--retune-epochs", type=float, default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_prune)


def cmd_prune(args) -> int:
    from .prune import prune_run

    r = prune_run(args.run, args.out, keep=args.keep, layers=args.layers, baseline=args.baseline,
                  retune=args.retune, retune_epochs=args.retune_epochs, device=args.device, data=args.data,
                  progress=not args.no_progress)
    print(f"pruned layers {r['pruned_layers']} of {args.run} to widths {r['widths']} "
          f"({r['params_after'] / r['params_before']:.1%} of the parameters)")
    line = f"test accuracy: original {r['test_accuracy_original']:.4f}, pruned {r['test_accuracy_pruned']:.4f}"
    if "test_accuracy_pruned_retuned" in r:
        line += f", pruned + re-tuned prompt {r['test_accuracy_pruned_retuned']:.4f}"
    print(line)
    print(f"wrote {args.out}/model (load with skillkern.load_model), {args.out}/prune.json")
    return 0


def _init_distributed(device_arg: Optional[str]) -> tuple[int, int]:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        use_cuda = (device_arg or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _finish_distributed(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skillkern", description="Find the skill neurons of transformers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_score_parser(sub)
    _add_tune_parser(sub)
    _add_perturb_parser(sub)
    _add_prune_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        # Bad input: one clear line, not a traceback (use -v for the traceback).
        if args.verbose:
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"skillkern {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
