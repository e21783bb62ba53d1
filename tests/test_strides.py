"""Every tensor argument of every op accepts a non-contiguous view, on every backend that runs here.

Each case replaces ONE argument by a strided view holding the same values (every other element of a larger
tensor, or a column-major layout for 2-D ones) and requires the result of the contiguous call: counts and
index-driven outputs exactly, float outputs to the float rounding the backend itself shows between two
identical calls (atomics add in no fixed order), and an in-place accumulator updated through the view.

The Triton backends run here under ``TRITON_INTERPRET=1`` (CPU) or on a GPU; otherwise they are skipped.
"""

from __future__ import annotations

import pytest
import torch

from skillkern.ops import dispatch
from skillkern.ops.ffn_stats import ffn_stats
from skillkern.ops.masked_ffn import masked_ffn
from skillkern.ops.stats_update import stats_update

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _backends(op):
    return [b for b in dispatch.backends_of(op) if dispatch.unavailable(op, b, DEVICE) is None]


def every_other(t: torch.Tensor) -> torch.Tensor:
    """A view with t's values whose last dimension has stride 2."""
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    view = big[..., ::2]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


def column_major(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view with t's values stored column by column."""
    view = t.t().contiguous().t()
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


LAYOUTS = {"every_other": every_other, "column_major": column_major}


def _close(got, exp, what, rtol=1e-5):
    assert got.shape == exp.shape and got.dtype == exp.dtype, f"{what}: {got.dtype} {tuple(got.shape)}"
    if not got.is_floating_point():
        bad = got != exp
        assert not bool(bad.any()), f"{what}: {int(bad.sum())} of {bad.numel()} values differ"
        return
    scale = exp.abs().max().item() if exp.numel() else 0.0
    err = (got - exp).abs().max().item() if exp.numel() else 0.0
    assert err <= rtol * scale + 1e-12, f"{what}: max difference {err:.3g} (scale {scale:.3g})"


# ------------------------------------------------------------------------------------------ stats_update
def _stats_inputs(mode, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, width, slots, classes = 23, 37, 3, 2
    h = torch.randn(rows, width, generator=g)
    slot = torch.randint(-1, slots, (rows,), generator=g)
    label = torch.randint(0, classes, (rows,), generator=g)
    threshold = torch.randn(slots, width, generator=g, dtype=torch.float64) if mode == "counts" else None
    out = torch.zeros(slots, classes, width, dtype=torch.float64 if mode == "sums" else torch.int64)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dict(h=to(h), slot=to(slot), label=to(label), out=to(out), threshold=to(threshold))


STATS_ARGS = {"sums": ("h", "slot", "label", "out"), "counts": ("h", "slot", "label", "out", "threshold")}


@pytest.mark.parametrize("backend", _backends("stats_update"))
@pytest.mark.parametrize("mode,arg", [(m, a) for m, args in STATS_ARGS.items() for a in args])
def test_stats_update_strided(backend, mode, arg):
    want = _stats_inputs(mode)
    stats_update(**want, backend=backend)
    got = _stats_inputs(mode)
    t = got[arg]
    got[arg] = every_other(t)
    stats_update(**got, backend=backend)
    _close(got["out"], want["out"], f"stats_update[{backend}] with strided {arg}", rtol=1e-12)
    if arg == "out":  # the view itself was updated, not a copy
        assert got["out"].abs().sum() > 0


# ---------------------------------------------------------------------------------------------- ffn_stats
def _ffn_inputs(mode, gated, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows, hidden, width, slots, classes = 21, 24, 40, 2, 3
    x = torch.randn(rows, hidden, generator=g)
    w1 = torch.randn(width, hidden, generator=g) / hidden ** 0.5
    wg = torch.randn(width, hidden, generator=g) / hidden ** 0.5 if gated else None
    b1 = torch.randn(width, generator=g)
    slot = torch.randint(-1, slots, (rows,), generator=g)
    label = torch.randint(0, classes, (rows,), generator=g)
    out = threshold = None
    if mode != "none":
        out = torch.zeros(slots, classes, width, dtype=torch.float64 if mode == "sums" else torch.int64)
        threshold = torch.randn(slots, width, generator=g, dtype=torch.float64) * 0.3 if mode == "counts" else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dict(x=to(x), w1=to(w1), b1=to(b1), w_gate=to(wg), slot=to(slot), label=to(label), out=to(out),
                threshold=to(threshold), mode=mode)


FFN_CASES = [("none", "x", "column_major"), ("none", "x", "every_other"), ("none", "w1", "column_major"),
             ("none", "w1", "every_other"), ("none", "b1", "every_other"), ("none", "w_gate", "column_major"),
             ("sums", "slot", "every_other"), ("sums", "label", "every_other"), ("sums", "out", "every_other"),
             ("counts", "threshold", "every_other"), ("counts", "threshold", "column_major"),
             ("counts", "out", "every_other"), ("counts", "x", "column_major")]


@pytest.mark.parametrize("backend", _backends("ffn_stats"))
@pytest.mark.parametrize("mode,arg,layout", FFN_CASES)
def test_ffn_stats_strided(backend, mode, arg, layout):
    gated = arg == "w_gate"
    want = _ffn_inputs(mode, gated)
    h_want = ffn_stats(**want, backend=backend)
    got = _ffn_inputs(mode, gated)
    got[arg] = LAYOUTS[layout](got[arg])
    h_got = ffn_stats(**got, backend=backend)
    what = f"ffn_stats[{backend}] with {layout} {arg}"
    _close(h_got, h_want, what + ": h")
    if mode != "none":
        _close(got["out"], want["out"], what + ": statistics", rtol=1e-12)


# --------------------------------------------------------------------------------------------- masked_ffn
def _masked_inputs(gated, sets, seed=2):
    g = torch.Generator().manual_seed(seed)
    rows, hidden, width, out = 9, 24, 50, 31
    x = torch.randn(rows, hidden, generator=g)
    w1 = torch.randn(width, hidden, generator=g) / 5
    w2 = torch.randn(out, width, generator=g) / 4
    b1 = torch.randn(width, generator=g)
    b2 = torch.randn(out, generator=g)
    wg = torch.randn(width, hidden, generator=g) / 5 if gated else None
    if sets == 1:
        keep, row_set = torch.randperm(width, generator=g)[:12], None
    else:
        keep = torch.stack([torch.randperm(width, generator=g)[:12] for _ in range(sets)])
        keep[1, 9:] = -1  # a shorter set, padded
        row_set = torch.randint(0, sets, (rows,), generator=g)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dict(x=to(x), w1=to(w1), b1=to(b1), w2=to(w2), b2=to(b2), keep=to(keep), w_gate=to(wg),
                row_set=to(row_set))


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
    y_want = masked_ffn(**want, backend=backend, schedule=schedule)
    got = _masked_inputs(gated, sets)
    got[arg] = LAYOUTS[layout](got[arg])
    y_got = masked_ffn(**got, backend=backend, schedule=schedule)
    _close(y_got, y_want, f"masked_ffn[{backend}, {schedule}] with {layout} {arg} ({sets} set(s))")


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
    ref = masked_ffn(x, w1, b1.contiguous(), w2, b2.contiguous(), keep, backend="torch")
    for backend in _backends("masked_ffn"):
        for schedule in ("fused", "two_pass"):
            y = masked_ffn(x, w1, b1, w2, b2, keep, backend=backend, schedule=schedule)
            _close(y, ref, f"{backend}/{schedule}", rtol=1e-5)
