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
    p.add_argument("--task", required=True, help="task name (folder under --data / SKILLKERN_DATA) or a task folder")
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
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "ext"])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/dev split when a task has no dev file")
    p.add_argument("--top", type=int, default=10, help="print this many top neurons")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint*.safetensors if present (same job only)")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="K",
                   help="save an atomic checkpoint every K batches (default 50)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="drop samples with NaN/Inf activations (counted in summary.json) instead of stopping")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_score)


def _first(rows: Sequence, n: Optional[int]) -> Sequence:
    if n is None:
        return rows
    if n < 1:
        raise SystemExit(f"error: --max-baseline/--max-eval must be >= 1, got {n}")
    return rows[:n]


def cmd_score(args) -> int:
    import torch

    from . import __version__
    from .data import binary_subtask, load_task
    from .models import load_model, model_id
    from .ops.stats_update import resolve_backend
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
        "backend_resolved": resolve_backend(args.backend, device),
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
    })
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_predictivity(pred, out / "predictivity.png", title=f"{task.name}: {meta['model']} ({args.pool})")

    print(f"scored {len(scorer.layers)} x {scorer.width} neurons of {meta['model']} on {task.name} "
          f"({len(baseline)} baseline rows, {len(evaluation)} eval rows) in {elapsed:.1f}s")
    print(f"{'rank':>4} {'layer':>5} {'neuron':>6} {'pred':>7} {'sign':>4}")
    for rank, row in enumerate(top, 1):
        print(f"{rank:>4} {row['layer']:>5} {row['neuron']:>6} {row['predictivity']:>7.4f} {row['sign']:>+4d}")
    print(f"wrote {out / 'stats.safetensors'}, {out / 'summary.json'}, {out / 'predictivity.png'}")
    _finish_distributed(world)
    checkpoint.remove()  # the result file now holds everything the checkpoint had
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
