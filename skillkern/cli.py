"""The ``skillkern`` command (also ``python -m skillkern``).

Every command validates, then works, then publishes: all options and inputs are checked before a model is
loaded (where the check needs the data, before the model at least), the work runs, and the result is written to
a temporary place and moved into place at the end (docs/errors.md). Every error ends in one line on
stderr, ``skillkern <command>: error: <what> [<what to do>]``, exit status 2; ``--verbose`` or
``SKILLKERN_DEBUG=1`` raises it with its traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger("skillkern")


class UsageError(ValueError):
    """A bad option value or combination, named by its flag."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the usage first) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _add_common(p) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="debug logging; errors raise with their traceback (also SKILLKERN_DEBUG=1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier result of this command at the output (never results of another kind)")


# ------------------------------------------------------------------------------------------------ validation
def _at_least(flag: str, value, low) -> None:
    if value is not None and value < low:
        raise UsageError(f"{flag} must be >= {low}, got {value}")


def _number(flag: str, value: Optional[float], low: Optional[float] = None, high: Optional[float] = None,
            low_open: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise UsageError(f"{flag} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and value > high:
        raise UsageError(f"{flag} must be <= {high:g}, got {value:g}")


def _check_device(spec: Optional[str], flag: str = "--device"):
    """The torch device ``spec`` names, checked to exist and be usable in this build of torch."""
    import torch

    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {spec!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise UsageError(f"{flag} {spec}: this build of torch ({torch.__version__}) has no CUDA support; use "
                             f"{flag} cpu, or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {spec}: no CUDA GPU is visible to torch; use {flag} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {spec}: there are only {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return device
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    backend = getattr(torch, device.type, None)
    if device.type != "mps" and backend is not None and getattr(backend, "is_available", lambda: False)():
        return device
    raise UsageError(f"{flag} {spec}: {device.type} devices are not available in this build of torch; use "
                     f"{flag} cpu or cuda")


def _check_backend(backend: str, device) -> None:
    """``--backend`` must be able to run on ``device`` (ops/dispatch.py says where each backend runs)."""
    from .ops import dispatch

    try:
        dispatch.resolve("stats_update", backend, device)
    except dispatch.BackendUnavailable:
        reason = dispatch.unavailable("stats_update", backend, device)
        if backend == "ext":
            raise UsageError(f"--backend ext: the compiled extension cannot run on {device} ({reason}); use "
                             "--backend auto or torch") from None
        raise UsageError(f"--backend {backend} cannot run on {device}: {reason}; use --backend auto") from None


def _check_data(data: Optional[str]) -> None:
    if data is not None and not Path(data).expanduser().is_dir():
        raise UsageError(f"--data {data}: no such folder; give the data folder (one sub-folder per task, each with "
                         "task.json, train.jsonl, test.jsonl) with --data DIR or the SKILLKERN_DATA environment "
                         "variable")


def _existing(path: Optional[str]) -> Optional[Path]:
    if path is None:
        return None
    p = Path(path).expanduser()
    return p if p.exists() else None


def _data_inputs(args) -> list:
    """The command's data inputs that an output must not be or contain."""
    from .data import DATA_ENV

    return [("data folder", _existing(args.data) or _existing(os.environ.get(DATA_ENV))),
            ("task folder", _existing(getattr(args, "task", None)))]


class _Given(argparse.Action):
    """Stores the value and records that the option was given (``args.given``), whatever its value: ``score
    --run`` refuses the options a run fixes even when they repeat the default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = set(getattr(namespace, "given", ())) | {self.dest}


class _Renamed(argparse.Action):
    """A flag that was renamed: refused at once, in one line naming the new flag."""

    def __init__(self, option_strings, dest, new: str, usage: str, **kwargs):
        self.new, self.usage = new, usage
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        use = f"{self.new} {values}" if isinstance(values, str) else self.usage
        parser.error(f"{option_string} was renamed to {self.new}; use {use}")


def _add_score_parser(sub) -> None:
    p = sub.add_parser("score", help="score every FFN neuron's predictivity for a task",
                       description="Two streaming passes: thresholds on the baseline split, accuracy counts on the "
                                   "evaluation split. Writes OUT/stats.safetensors, OUT/summary.json and "
                                   "OUT/predictivity.png.")
    p.add_argument("--model", default="minilm", action=_Given,
                   help="'minilm' (embedded default), a hub id or a local path")
    p.add_argument("--task", default=None, action=_Given,
                   help="task name (folder under --data / SKILLKERN_DATA) or a task folder")
    p.add_argument("--run", default=None, help="score the prompt slots of this tuned run (pool 'slots') on the "
                                               "train/dev split it was tuned on; the run fixes --model, --task, "
                                               "--pool, --max-length and --seed (refused with --run), and loads on "
                                               "one --device (no --device-map)")
    p.add_argument("--data", default=None, help="data folder holding <task>/{train,dev,test}.jsonl + task.json "
                                                "(default: $SKILLKERN_DATA, then the HF hub when online)")
    p.add_argument("--subtask", default=None, help="binary sub-task of a multi-class task: pn, neu, ovr:<c>, pair:<a>,<b>")
    p.add_argument("--pool", default="cls", action=_Given, choices=["cls", "last", "mean", "max"],
                   help="tracked position(s)")
    p.add_argument("--baseline-split", default="train", help="split giving the thresholds")
    p.add_argument("--eval-split", default="dev", help="split on which accuracy is counted")
    p.add_argument("--max-baseline", type=int, default=None, help="use the first N rows of the baseline split")
    p.add_argument("--max-eval", type=int, default=None, help="use the first N rows of the evaluation split")
    p.add_argument("--max-length", type=int, default=128, action=_Given)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pad-multiple", type=int, default=32,
                   help="pad each sample to a multiple of this many tokens (batch-invariant results); 0: longest in batch")
    p.add_argument("--which", default="neuron", choices=["neuron", "gate"],
                   help="neuron: input of the down-projection; gate: act(W_gate x) of gated MLPs")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "ext", "triton"],
                   help="statistics op; triton (and auto on CUDA) scores through the fused FFN kernel for pools "
                        "cls/last")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--device-map", default=None, action=_Given, metavar="MAP",
                   help="split a large model over the GPUs: 'auto', 'balanced', 'balanced_low_0', 'sequential' "
                        "(transformers' device_map, needs accelerate); each layer's statistics stay on its GPU. "
                        "Not with --device")
    p.add_argument("--seed", type=int, default=0, action=_Given,
                   help="seed of the train/dev split when a task has no dev file")
    p.add_argument("--top", type=int, default=10, help="print (and list in summary.json) this many top neurons")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint*.safetensors if present (same job only; with --run too)")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="K",
                   help="save an atomic checkpoint every K batches (default 50)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="drop samples with NaN/Inf activations (counted in summary.json) instead of stopping")
    p.add_argument("--out", default=None, help="output folder (default with --run: RUN/scores/<subtask or task>)")
    _add_common(p)
    p.set_defaults(func=cmd_score, parser=p, given=set())


#: options of ``score`` that do not apply with --run (refused when given, whatever their value), and why
_NOT_WITH_RUN = {
    "model": "the run fixes the model",
    "task": "the run fixes the task",
    "pool": "the run's prompt slots are scored",
    "max_length": "the run fixes it",
    "seed": "the run fixes its train/dev split",
    "device_map": "a run loads on one --device",
}


def cmd_score(args) -> int:
    for flag, low in (("--max-baseline", 1), ("--max-eval", 1), ("--max-length", 1), ("--batch-size", 1),
                      ("--pad-multiple", 0), ("--seed", 0), ("--top", 0), ("--checkpoint-every", 1)):
        _at_least(flag, getattr(args, flag[2:].replace("-", "_")), low)
    if args.run is not None:
        for dest, why in _NOT_WITH_RUN.items():
            if dest in args.given:
                raise UsageError(f"--{dest.replace('_', '-')} does not apply with --run ({why}); drop it")
    elif args.task is None or args.out is None:
        raise UsageError("needs --task and --out (or --run RUN)")
    if args.device_map is not None:
        if args.device is not None:
            raise UsageError("give --device or --device-map, not both")
        if args.device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise UsageError(f"--device-map must be auto, balanced, balanced_low_0 or sequential, got "
                             f"{args.device_map!r}")
    device = _check_device(args.device)
    _check_backend(args.backend, device)
    _check_data(args.data)
    common = dict(data=args.data, subtask=args.subtask, baseline_split=args.baseline_split,
                  eval_split=args.eval_split, max_baseline=args.max_baseline, max_eval=args.max_eval,
                  nonfinite="skip" if args.skip_nonfinite else "raise", resume=args.resume,
                  checkpoint_every=args.checkpoint_every, top=args.top, progress=not args.no_progress,
                  overwrite=args.overwrite)
    if args.run is not None:
        from .runs import score_run, scores_dir

        stats, summary = score_run(args.run, out=args.out, batch_size=args.batch_size,
                                   pad_multiple=args.pad_multiple, which=args.which, backend=args.backend,
                                   device=device, **common)
        out = Path(args.out) if args.out else scores_dir(args.run, args.subtask)
        what = f"the {stats.num_slots} prompt slots of {args.run}"
    else:
        from .scoring import ScoreSettings, score_task

        settings = ScoreSettings(pool=args.pool, max_length=args.max_length, batch_size=args.batch_size,
                                 pad_multiple=args.pad_multiple, backend=args.backend, which=args.which)
        stats, summary = score_task(args.model, args.task, args.out, settings, seed=args.seed,
                                    device=None if args.device_map else device, device_map=args.device_map,
                                    **common)
        out, what = Path(args.out), None
    if summary is None:  # a process of rank > 0: rank 0 reports
        return 0
    what = what or f"{summary['layers']} x {summary['width']} neurons of {summary['model']}"
    print(f"scored {what} on {summary['task']} ({summary['baseline_rows']} baseline rows, {summary['eval_rows']} "
          f"eval rows) in {summary['seconds']:.1f}s")
    _print_top(summary["top_neurons"])
    print(f"wrote {out / 'stats.safetensors'}, {out / 'summary.json'}, {out / 'predictivity.png'}")
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
    p.add_argument("--prompt-len", type=int, default=16, help="P prompt slots, slot 0 included (>= 2)")
    p.add_argument("--head", default="auto", choices=["auto", "mlm", "verbalizer", "linear"],
                   help="auto: masked-LM verbalizer when the model has an MLM head, else a linear head on slot 0; "
                        "verbalizer: temperature x cosine with the frozen class-word embeddings (the paper-like head "
                        "for a model without an MLM head)")
    p.add_argument("--epochs", type=float, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.006, help="fraction of the steps that warm up, in [0, 1]")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-train", type=int, default=None, help="first N training rows")
    p.add_argument("--max-dev", type=int, default=None, help="first N dev rows")
    p.add_argument("--max-test", type=int, default=None, help="first N test rows")
    p.add_argument("--eval-every", type=int, default=0, help="steps between dev evaluations (0: each epoch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 80/20 train/dev split")
    p.add_argument("--device", default=None)
    p.add_argument("--resume", action="store_true", help="continue from RUN/tune_checkpoint.safetensors")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="run folder")
    _add_common(p)
    p.set_defaults(func=cmd_tune, parser=p)


def cmd_tune(args) -> int:
    for flag, low in (("--batch-size", 1), ("--max-length", 1), ("--max-train", 1), ("--max-dev", 1),
                      ("--max-test", 1), ("--eval-every", 0), ("--seed", 0), ("--split-seed", 0)):
        _at_least(flag, getattr(args, flag[2:].replace("-", "_")), low)
    if args.method == "prompt":
        _at_least("--prompt-len", args.prompt_len, 2)
    _number("--epochs", args.epochs, 0)
    _number("--lr", args.lr, 0, low_open=True)
    _number("--warmup", args.warmup, 0, 1)
    _check_device(args.device)
    _check_data(args.data)
    from .batching import check_positions
    from .models import check_model_source
    from .runs import check_tune_out, tune_run
    from .tune import TuneSettings

    check_tune_out(args.out, model_name=args.model, overwrite=args.overwrite, resume=args.resume,
                   inputs=_data_inputs(args))
    check_model_source(args.model)
    check_positions(args.model, args.prompt_len if args.method == "prompt" else 0, args.max_length)

    from .data import binary_subtask, load_task

    settings = TuneSettings(method=args.method, prompt_len=args.prompt_len, head=args.head, epochs=args.epochs,
                            lr=args.lr, warmup=args.warmup, batch_size=args.batch_size, max_length=args.max_length,
                            max_train=args.max_train, max_dev=args.max_dev, max_test=args.max_test,
                            eval_every=args.eval_every, seed=args.seed, split_seed=args.split_seed)
    task = load_task(args.task, args.data, seed=args.split_seed)
    if args.subtask:
        task = binary_subtask(task, args.subtask, seed=args.split_seed)
    info = tune_run(args.model, task, settings, args.out, device=args.device, resume=args.resume,
                    progress=not args.no_progress, overwrite=args.overwrite)
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
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= v <= 1 for v in values):  # NaN fails this too
        raise argparse.ArgumentTypeError(f"every fraction must be in [0, 1], got {text!r}")
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
    p.add_argument("--sigma", type=float, default=0.1,
                   help="gaussian noise standard deviation (with --noise neuron: in units of each neuron's own std)")
    p.add_argument("--noise", default="fixed", choices=["fixed", "neuron"],
                   help="gaussian noise scale: fixed sigma, or sigma x each neuron's activation std over the run's "
                        "first 256 training rows")
    p.add_argument("--draws", type=int, default=3, help="independent random controls per fraction (default 3)")
    p.add_argument("--control", default="uniform", choices=["uniform", "matched"],
                   help="random control: uniform (the paper's), or matched: as many massive-activation neurons "
                        "(RMS over --outlier-factor x the layer median) as the skill selection holds, the rest "
                        "uniform")
    p.add_argument("--outlier-factor", type=float, default=16.0,
                   help="with --control matched: RMS over this many times the layer median is massive (default 16)")
    p.add_argument("--seed", type=int, default=0, help="noise and random-control seed (the same seed draws the same "
                                                       "random neurons in every run of a model)")
    p.add_argument("--max-test", type=int, default=None, help="first N test rows (default: the run's cap)")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="output JSON (default RUN/perturb_<mode>[_from_<run>].json)")
    _add_common(p)
    p.set_defaults(func=cmd_perturb, parser=p)


def cmd_perturb(args) -> int:
    for flag, low in (("--seed", 0), ("--max-test", 1), ("--batch-size", 1), ("--draws", 1)):
        _at_least(flag, getattr(args, flag[2:].replace("-", "_")), low)
    _number("--sigma", args.sigma, 0)
    _number("--outlier-factor", args.outlier_factor, 0, low_open=True)
    if args.noise != "fixed" and args.mode != "gaussian":
        raise UsageError(f"--noise {args.noise} scales gaussian noise; it does nothing with --mode {args.mode}")
    _check_device(args.device)
    _check_data(args.data)
    from .files import check_out_file
    from .perturb import is_perturbation_file, perturb_run, save_perturbation
    from .runs import default_perturb_out, prompt_file, read_run, run_file, scores_dir

    read_run(args.run)
    if args.neurons_from is not None:
        read_run(args.neurons_from, "--neurons-from")
    out = Path(args.out) if args.out else default_perturb_out(args.run, args.mode, args.neurons_from, args.noise)
    inputs = [("run description", run_file(args.run)), ("prompt file", prompt_file(args.run)),
              ("scores folder", scores_dir(args.run).parent)]
    check_out_file(out, flag="--out" if args.out else "the default output", overwrite=args.overwrite,
                   ours=is_perturbation_file, what="perturbation result", inputs=inputs)
    if out.with_suffix(".png").is_dir():
        raise UsageError(f"--out {out}: its picture {out.with_suffix('.png')} would replace a folder; choose "
                         "another path")
    result = perturb_run(args.run, mode=args.mode, fractions=args.fractions, neurons_from=args.neurons_from,
                         sigma=args.sigma, noise=args.noise, draws=args.draws, seed=args.seed,
                         control=args.control, outlier_factor=args.outlier_factor,
                         max_test=args.max_test, split=args.split, batch_size=args.batch_size, device=args.device,
                         data=args.data, progress=not args.no_progress)
    save_perturbation(result, out)
    print(f"{result['task']}: {args.mode} perturbation of the skill neurons of {result['neurons_task']} "
          f"({result['test_rows']} {args.split} rows, clean accuracy {result['clean_accuracy']:.4f})")
    print(f"{'q':>6} {'neurons':>8} {'skill':>7} {'random':>7}  {'skill - random [95% CI]':<26} {'McNemar p':>9}")
    for q, n, a, b, d, ci, pv in zip(result["fractions"], result["neurons_per_layer"], result["skill"],
                                     result["random"], result["difference"], result["difference_ci"],
                                     result["mcnemar_p"]):
        print(f"{q:>6.2f} {sum(n):>8d} {a:>7.4f} {b:>7.4f}  {d:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]  {max(pv):>9.3g}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _add_prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a run's model to the neurons a criterion keeps (bias folding), save and "
                                     "evaluate",
                       description="Keeps --keep of the neurons of each pruned layer, chosen by --criterion (skill "
                                   "neurons by default), freezes the others at their fill value (--fill) and folds "
                                   "them into the down-projection bias, slices W1/b1/W2. OUT/model reloads with "
                                   "skillkern.load_model(OUT/model).")
    p.add_argument("--run", required=True, help="a tuned run folder (scored with `score --run` for --criterion "
                                                "skill and --fill prompt)")
    p.add_argument("--keep", type=float, default=0.02, help="per-layer fraction of neurons kept, in (0, 1] "
                                                            "(default 0.02)")
    p.add_argument("--layers", default="top:0.75", help="top:F (top F of layers), all, or indices (default top:0.75)")
    p.add_argument("--criterion", default="skill", choices=["skill", "flap", "wanda", "magnitude", "random"],
                   help="which neurons stay: skill (predictivity; default), flap (activation variance x squared W2 "
                        "column norm), wanda (activation L2 norm x W2 column norm), magnitude (mean |activation|) or "
                        "random; the moment criteria read one pass over the run's training rows")
    p.add_argument("--fill", default=None, choices=["prompt", "tokens"],
                   help="fill value of the pruned neurons: prompt, their thresholds averaged over the prompt slots "
                        "(the paper's; default with --criterion skill), or tokens, their mean activation over every "
                        "real token of the training rows (default with the other criteria)")
    p.add_argument("--flap-adaptive", action="store_true",
                   help="--criterion flap: per-layer widths from FLAP's global ranking of standardised scores, with "
                        "the same total as --keep")
    p.add_argument("--seed", type=int, default=None, help="--criterion random: the seed (default 0)")
    p.add_argument("--keep-massive", action="store_true",
                   help="keep each pruned layer's massive-activation neurons (activation norm over 16x the layer "
                        "median) first, then the criterion's best of the others, at the same count")
    p.add_argument("--moments", default=None, metavar="FILE",
                   help="reuse the moments.safetensors of an earlier prune of the same run instead of a pass over "
                        "its training rows")
    p.add_argument("--baseline", nargs="?", action=_Renamed, new="--fill", usage="--fill prompt|tokens",
                   help=argparse.SUPPRESS)
    p.add_argument("--retune", action="store_true", help="re-tune the prompt on the pruned model (OUT/retuned)")
    p.add_argument("--retune-epochs", type=float, default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True)
    _add_common(p)
    p.set_defaults(func=cmd_prune, parser=p)


def cmd_prune(args) -> int:
    from .prune import parse_layers, prune_run, uses_moments

    _number("--keep", args.keep, 0, 1, low_open=True)
    parse_layers(args.layers, None)
    if args.retune_epochs is not None:
        if not args.retune:
            raise UsageError("--retune-epochs needs --retune")
        _number("--retune-epochs", args.retune_epochs, 0, low_open=True)
    if args.flap_adaptive and args.criterion != "flap":
        raise UsageError(f"--flap-adaptive needs --criterion flap (FLAP's standardised global ranking), not "
                         f"--criterion {args.criterion}")
    if args.seed is not None:
        if args.criterion != "random":
            raise UsageError(f"--seed applies to --criterion random only, not {args.criterion}")
        _at_least("--seed", args.seed, 0)
    fill = args.fill or ("prompt" if args.criterion == "skill" else "tokens")
    if args.moments is not None and not uses_moments(args.criterion, fill, args.keep_massive):
        raise UsageError(f"--moments: --criterion {args.criterion} with --fill {fill} uses no moments; drop it")
    _check_device(args.device)
    _check_data(args.data)
    r = prune_run(args.run, args.out, keep=args.keep, layers=args.layers, criterion=args.criterion, fill=fill,
                  flap_adaptive=args.flap_adaptive, seed=args.seed or 0, keep_massive=args.keep_massive,
                  moments=args.moments, retune=args.retune, retune_epochs=args.retune_epochs, device=args.device,
                  data=args.data,
                  progress=not args.no_progress, overwrite=args.overwrite)
    print(f"pruned layers {r['pruned_layers']} of {args.run} by {r['criterion']} to widths {r['widths']} "
          f"({r['params_after'] / r['params_before']:.1%} of the parameters)")
    line = f"test accuracy: original {r['test_accuracy_original']:.4f}, pruned {r['test_accuracy_pruned']:.4f}"
    if "test_accuracy_pruned_retuned" in r:
        line += f", pruned + re-tuned prompt {r['test_accuracy_pruned_retuned']:.4f}"
    print(line)
    print(f"wrote {args.out}/model (load with skillkern.load_model), {args.out}/prune.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="skillkern", description="Find the skill neurons of transformers.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging; errors raise with their traceback (also SKILLKERN_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_score_parser(sub)
    _add_tune_parser(sub)
    _add_perturb_parser(sub)
    _add_prune_parser(sub)
    return parser


# ---------------------------------------------------------------------------------------------------- errors
#: the error families bad input produces (ours, the data readers', transformers', torch's, safetensors'): one
#: line and exit status 2. Anything else is a bug and keeps its traceback, which a bug report needs.
_INPUT_ERRORS: tuple = (ValueError, KeyError, OSError, RuntimeError, ImportError, ArithmeticError, MemoryError)


def _input_error(err: BaseException) -> bool:
    if isinstance(err, _INPUT_ERRORS):
        return True
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - older safetensors
        return False
    return isinstance(err, SafetensorError)


def describe_error(err: BaseException) -> str:
    """One line saying what went wrong, for ``skillkern <command>: error: ...``."""
    msg = ""
    if isinstance(err, KeyError) and err.args and isinstance(err.args[0], str):
        msg = err.args[0]
    elif type(err).__name__ == "SafetensorError":
        msg = f"a safetensors file is truncated or corrupt ({err}); rerun with --verbose to see which"
    elif isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        msg = f"out of memory ({str(err).splitlines()[0] if str(err) else 'MemoryError'}); lower --batch-size"
    elif isinstance(err, OSError) and err.filename is not None and err.strerror:
        msg = f"{err.filename}: {err.strerror}" + (f" (and {err.filename2})" if err.filename2 else "")
    if not msg:
        msg = str(err) or type(err).__name__
    msg = " ".join(msg.split())
    return msg if len(msg) <= 1200 else msg[:1200] + " ..."


def _hide_library_progress() -> None:
    """--no-progress hides the progress bars of transformers and the Hugging Face Hub too ("Loading weights")."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is imported
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help (0) or a one-line argparse error (2): a status, not an exception
        return done.code if isinstance(done.code, int) else 2
    debug = getattr(args, "verbose", False) or os.environ.get("SKILLKERN_DEBUG", "").strip() not in ("", "0")
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "no_progress", False):
        _hide_library_progress()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"skillkern {args.command}: interrupted; results are published only when complete, so nothing "
              "half-written is left" + ("; rerun with --resume to continue" if hasattr(args, "resume") else ""),
              file=sys.stderr)
        return 130
    except Exception as err:
        # Bad input: one clear line, not a traceback (--verbose / SKILLKERN_DEBUG=1 for the traceback).
        if debug or not _input_error(err):
            raise
        print(f"skillkern {args.command}: error: {describe_error(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
