"""Every tensor argument of every op accepts a non-contiguous view, on every backend that runs here.

Each case replaces ONE argument by a strided view holding the same values (every other element of a larger
tensor, or a column-major layout for 2-D ones: ``kernel_checks.LAYOUTS``) and requires the right answer
for the contiguous values, with the shared checks of ``kernel_checks.py``: float outputs by the tolerance
rule against the float64 reference; statistics against the reference fed with the op's own activations,
counts exactly and float64 sums up to the order of additions (atomics add in no fixed order); an in-place
accumulator updated through the view.

The Triton backends run here under ``TRITON_INTERPRET=1`` (CPU) or on a GPU; otherwise they are skipped.
"""

from __future__ import annotations

import pytest
import torch

from kernel_checks import (DEVICE, LAYOUTS, as_float64, assert_equal, assert_sums_close, assert_within_torch_error,
                           every_other, ffn_weights, slots_and_labels, stats_inputs, thresholds_with_ties)
from skillkern.ops import dispatch
from skillkern.ops.ffn_stats import ffn_stats, ffn_stats_reference
from skillkern.ops.masked_ffn import masked_ffn, masked_ffn_reference
from skillkern.ops.stats_moments import stats_moments, stats_moments_reference
from skillkern.ops.stats_update import stats_update, stats_update_reference

CELLS = "(slot, class, neuron)"


def _backends(op):
    return [b for b in dispatch.backends_of(op) if dispatch.unavailable(op, b, DEVICE) is None]


def _check_stats(out, h, slot, label, threshold, what):
    """Statistics accumulated from zero vs the reference on the same h: counts exactly, sums (and moments: out
    (slots, 3, D) with label None) to float64 rounding."""
    if label is None:
        exp = stats_moments_reference(h, slot, torch.zeros_like(out, memory_format=torch.contiguous_format))
        mag = stats_moments_reference(h.abs(), slot, torch.zeros_like(exp))
        mag[:, 0] = mag[:, 2]
        assert_sums_close(out, exp, mag, h.shape[0], what, "(slot, moment, neuron)")
        return
    exp = stats_update_reference(h, slot, label, torch.zeros_like(out, memory_format=torch.contiguous_format),
                                 threshold)
    if threshold is not None:
        assert_equal(out, exp, what, CELLS)
    else:
        abssum = stats_update_reference(h.abs(), slot, label, torch.zeros_like(exp))
        assert_sums_close(out, exp, abssum, h.shape[0], what)


# ------------------------------------------------------------------------------------------ stats_update
def _stats_inputs(mode, seed=0):
    rows, width, slots, classes = 23, 37, 3, 2
    h, slot, label, threshold = stats_inputs(rows, width, slots, classes, seed=seed)
    out = torch.zeros(slots, classes, width, dtype=torch.float64 if mode == "sums" else torch.int64, device=DEVICE)
    return dict(h=h, slot=slot, label=label, out=out, threshold=threshold if mode == "counts" else None)


STATS_ARGS = {"sums": ("h", "slot", "label", "out"), "counts": ("h", "slot", "label", "out", "threshold")}


@pytest.mark.parametrize("backend", _backends("stats_update"))
@pytest.mark.parametrize("mode,arg", [(m, a) for m, args in STATS_ARGS.items() for a in args])
def test_stats_update_strided(backend, mode, arg):
    want = _stats_inputs(mode)
    got = _stats_inputs(mode)
    got[arg] = every_other(got[arg])
    stats_update(**got, backend=backend)
    _check_stats(got["out"], want["h"], want["slot"], want["label"], want["threshold"],
                 f"stats_update[{backend}] with strided {arg}")
    if arg == "out":  # the view itself was updated, not a copy
        assert got["out"].abs().sum() > 0


@pytest.mark.parametrize("backend", _backends("stats_moments"))
@pytest.mark.parametrize("arg", ("h", "slot", "out"))
def test_stats_moments_strided(backend, arg):
    def inputs():
        h, slot, _, _ = stats_inputs(23, 37, 3, 2)
        return dict(h=h, slot=slot, out=torch.zeros(3, 3, 37, dtype=torch.float64, device=DEVICE))

    want, got = inputs(), inputs()
    got[arg] = every_other(got[arg])
    stats_moments(**got, backend=backend)
    _check_stats(got["out"], want["h"], want["slot"], None, None, f"stats_moments[{backend}] with strided {arg}")


# ---------------------------------------------------------------------------------------------- ffn_stats
def _ffn_inputs(mode, gated, seed=1):
    rows, hidden, width, slots, classes = 21, 24, 40, 2, 3
    args = ffn_weights(rows, hidden, width, gated=gated, bias=True, seed=seed)
    slot, label = slots_and_labels(rows, slots, classes, seed=seed + 1)
    out = threshold = None
    if mode == "moments":
        out = torch.zeros(slots, 3, width, dtype=torch.float64, device=DEVICE)
    elif mode != "none":
        out = torch.zeros(slots, classes, width, dtype=torch.float64 if mode == "sums" else torch.int64,
                          device=DEVICE)
    if mode == "counts":
        h = ffn_stats_reference(args["x"], args["w1"], args["b1"], w_gate=args["w_gate"])
        threshold = thresholds_with_ties(h, slot, slots, spread=0.3, seed=seed + 2)
    return dict(args, slot=slot, label=label, out=out, threshold=threshold, mode=mode)


FFN_CASES = [("none", "x", "column_major"), ("none", "x", "every_other"), ("none", "w1", "column_major"),
             ("none", "w1", "every_other"), ("none", "b1", "every_other"), ("none", "w_gate", "column_major"),
             ("sums", "slot", "every_other"), ("sums", "label", "every_other"), ("sums", "out", "every_other"),
             ("counts", "threshold", "every_other"), ("counts", "threshold", "column_major"),
             ("counts", "out", "every_other"), ("counts", "x", "column_major"),
             ("moments", "out", "every_other"), ("moments", "slot", "every_other")]


@pytest.mark.parametrize("backend", _backends("ffn_stats"))
@pytest.mark.parametrize("mode,arg,layout", FFN_CASES)
def test_ffn_stats_strided(backend, mode, arg, layout):
    gated = arg == "w_gate"
    want = _ffn_inputs(mode, gated)
    got = _ffn_inputs(mode, gated)
    got[arg] = LAYOUTS[layout](got[arg])
    h = ffn_stats(**got, backend=backend)
    what = f"ffn_stats[{backend}] with {layout} {arg}"
    weights = [want[k] for k in ("x", "w1", "b1")]
    ref64 = ffn_stats_reference(*map(as_float64, weights), w_gate=as_float64(want["w_gate"]))
    lowp = ffn_stats_reference(*weights, w_gate=want["w_gate"])
    assert_within_torch_error(h, ref64, lowp, what + ": h", "(row, neuron)")
    if mode != "none":
        _check_stats(got["out"], h, want["slot"], None if mode == "moments" else want["label"], want["threshold"],
                     what + ": statistics")


# --------------------------------------------------------------------------------------------- masked_ffn
def _masked_inputs(gated, sets, seed=2):
    rows, hidden, width, out = 9, 24, 50, 31
    args = ffn_weights(rows, hidden, width, out, gated=gated, bias=True, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    if sets == 1:
        keep, row_set = torch.randperm(width, generator=g)[:12], None
    else:
        keep = torch.stack([torch.randperm(width, generator=g)[:12] for _ in range(sets)])
        keep[1, 9:] = -1  # a shorter set, padded
        row_set = torch.randint(0, sets, (rows,), generator=g)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dict(args, keep=to(keep), row_set=to(row_set))


def _check_y(y, inputs, what):
    """The tolerance rule on masked_ffn's y for the (contiguous) ``inputs``."""
    weights = [inputs[k] for k in ("x", "w1", "b1", "w2", "b2")]
    ref64 = masked_ffn_reference(*map(as_float64, weights), inputs["keep"], w_gate=as_float64(inputs["w_gate"]),
                                 row_set=inputs["row_set"])
    lowp = masked_ffn_reference(*weights, inputs["keep"], w_gate=inputs["w_gate"], row_set=inputs["row_set"])
    assert_within_torch_error(y, ref64, lowp, what, "(row, output)")


MASKED_CASES = [(a, lay, 1) for a in ("x", "w1", "w2") for lay in ("column_major", "every_other")] + \
    [("b1", "every_other", 1), ("b2", "every_other", 1), ("keep", "every_other", 1),
     ("w_gate", "column_major", 1), ("keep", "every_other", 3), ("keep", "column_major", 3),
     ("row_set", "every_other", 3), ("b2", "every_other", 3)]


@pytest.mark.parametrize("backend,schedule", [(b, s) for b in _backends("masked_ffn")
                                              for s in (("fused", "two_pass") if b == "triton" else ("auto",))])
@pytest.mark.parametrize("arg,layout,sets", MASKED_CASES)
def test_masked_ffn_strided(backend, schedule, arg, layout, sets):
    gated = arg == "w_gate"
    want = _masked_inputs(gated, sets)
    got = _masked_inputs(gated, sets)
    got[arg] = LAYOUTS[layout](got[arg])
    y = masked_ffn(**got, backend=backend, schedule=schedule)
    _check_y(y, want, f"masked_ffn[{backend}, {schedule}] with {layout} {arg} ({sets} set(s))")


def test_strided_biases_were_wrong_before():
    """The reported case: strided biases read as if contiguous gave differences of 2.4 and 4.1. With every
    backend that runs here, the answer now matches the PyTorch reference on contiguous copies."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 24, generator=g).to(DEVICE)
    w1 = (torch.randn(50, 24, generator=g) / 5).to(DEVICE)
    w2 = (torch.randn(31, 50, generator=g) / 4).to(DEVICE)
    b1 = torch.randn(100, generator=g).to(DEVICE)[::2]
    b2 = torch.randn(62, generator=g).to(DEVICE)[::2]
    keep = torch.randperm(50, generator=g)[:12].to(DEVICE)
    contiguous = dict(x=x, w1=w1, b1=b1.contiguous(), w2=w2, b2=b2.contiguous(), keep=keep, w_gate=None, row_set=None)
    for backend in _backends("masked_ffn"):
        for schedule in ("fused", "two_pass"):
            y = masked_ffn(x, w1, b1, w2, b2, keep, backend=backend, schedule=schedule)
            _check_y(y, contiguous, f"{backend}/{schedule}")
