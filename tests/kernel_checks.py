"""The kernel tests' shared tools: where the kernels run, how their results are compared, and their inputs.

Used by the tests of ``ffn_stats``, ``masked_ffn`` and ``stats_update`` (its PyTorch, C++/CUDA and Triton
backends). Test files import it as ``from kernel_checks import ...``: tests/ has no ``__init__.py``, so
pytest's default import mode puts tests/ on ``sys.path`` (as for ``from conftest import ...``), and
``python -m pytest -q tests`` works from the repository root.

Comparisons (every message names the case and shows the first mismatching elements):

* :func:`assert_within_torch_error`: THE tolerance rule for a float result against a reference
  (flash-attention's, STYLE.md); no hand-tuned ``atol``;
* :func:`assert_equal`: exact equality (counts, index-driven outputs, sums of the same terms in the same
  order), optionally bit for bit;
* :func:`assert_sums_close`: float64 sums of the same terms added in another order (atomics);
* :func:`assert_counts_within_rounding`: counts of a kernel that computed its own activations against the
  end-to-end reference: they may differ only where an activation lies within float rounding of its threshold.

Inputs (all random from a seed, made on the CPU and moved to ``device`` in ``dtype``):

* :func:`ffn_weights`: x and FFN weights scaled so pre-activations are ~N(0, 1) and outputs O(1);
* :func:`slots_and_labels`: per-row slots with a share of untracked rows (-1) and class labels;
* :func:`thresholds_with_ties`: per-slot thresholds of which some equal an activation exactly;
* :func:`stats_inputs` (h, slot, label, threshold) and :func:`random_state` (a starting accumulator);
* :func:`every_other` and :func:`column_major`: strided views holding a tensor's values (``LAYOUTS``).
"""

from __future__ import annotations

import os
from typing import Optional

import pytest
import torch

from skillkern import _ext
from skillkern.ops.activations import HAVE_TRITON
from skillkern.ops.dispatch import triton_interpreted
from skillkern.ops.stats_update import stats_update_reference

# ------------------------------------------------------------------------------------------ where kernels run
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
#: Triton kernels run here: on a GPU, or on the CPU under TRITON_INTERPRET=1 (set before skillkern is imported)
TRITON_OK = HAVE_TRITON and (CUDA or triton_interpreted())
requires_triton = pytest.mark.skipif(
    not TRITON_OK, reason="triton not importable" if not HAVE_TRITON else
    "no CUDA GPU and TRITON_INTERPRET=1 was not set before Python started (the kernels run in the interpreter)")


@pytest.fixture
def ext():
    """Skip when the extension is not built, with the loader's reason; fail instead under SKILLKERN_REQUIRE_EXT=1.

    A test module uses it with ``from kernel_checks import ext`` and an ``ext`` argument."""
    if not _ext.available():
        reason = f"compiled extension unavailable: {_ext.unavailable_reason()}"
        if os.environ.get("SKILLKERN_REQUIRE_EXT") == "1":
            pytest.fail(f"SKILLKERN_REQUIRE_EXT=1 but {reason}")
        pytest.skip(reason)


def as_float64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` in float64 (exact for every float input dtype); None stays None."""
    return None if t is None else t.double()


# ------------------------------------------------------------------------------------------------ comparisons
def first_mismatches(got: torch.Tensor, exp: torch.Tensor, bad: torch.Tensor, k: int = 5) -> str:
    """'index: got vs expected' for the first ``k`` True elements of ``bad`` (in index order)."""
    idx = bad.nonzero()[:k].tolist()
    return "; ".join(f"{tuple(i)}: {got[tuple(i)].item()!r} vs {exp[tuple(i)].item()!r}" for i in idx)


def _same_kind(got: torch.Tensor, exp: torch.Tensor, what: str) -> None:
    assert got.dtype == exp.dtype and got.shape == exp.shape, \
        f"{what}: got {got.dtype} {tuple(got.shape)}, expected {exp.dtype} {tuple(exp.shape)}"


def assert_within_torch_error(got: torch.Tensor, ref64: torch.Tensor, lowp: torch.Tensor, what: str,
                              names: str = "") -> float:
    """The tolerance rule (flash-attention's, STYLE.md), element by element::

        |got - ref64| <= 2 * max|lowp - ref64| + tiny,    tiny = eps(lowp.dtype) * max|ref64|

    ``ref64``: the reference computed in float64 from the same (low-precision) inputs, the truth both sides
    are measured against; ``lowp``: PyTorch's own result in the precision under test. The kernel may be at
    most twice as far off as PyTorch is. ``tiny`` is one unit in the last place of the largest reference
    value in that precision: the result is rounded to it, so a correctly computed element may be off by half
    an ulp of its magnitude where PyTorch, by chance, lands closer (one term, or fp32 where both errors are a
    few ulps: PyTorch's error can be near zero). NaN in ``got`` always fails.

    ``got`` must have ``lowp``'s dtype and ``ref64``'s shape. Returns the allowed error (the right-hand side),
    for checks that depend on it (:func:`assert_counts_within_rounding`)."""
    _same_kind(got, lowp, what)
    assert ref64.dtype == torch.float64 and ref64.shape == got.shape, \
        f"{what}: reference is {ref64.dtype} {tuple(ref64.shape)}, result {tuple(got.shape)}"
    if not ref64.numel():
        return 0.0
    err = (got.double() - ref64).abs()
    err_torch = (lowp.double() - ref64).abs().max().item()
    tiny = torch.finfo(lowp.dtype).eps * ref64.abs().max().item()
    allowed = 2 * err_torch + tiny
    bad = ~(err <= allowed)
    if bool(bad.any()):
        worst = int(err.nan_to_num(float("inf")).flatten().argmax())
        worst_at = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements off the float64 reference by more than 2 * "
            f"{err_torch:.3g} (PyTorch's own error in {lowp.dtype}) + {tiny:.3g} (one ulp at the largest value) "
            f"= {allowed:.3g}; worst {worst_at}: error {err[worst_at].item():.3g}; first {names}: "
            f"{first_mismatches(got, ref64, bad)}")
    return allowed


_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def assert_equal(got: torch.Tensor, exp: torch.Tensor, what: str, names: str = "", bitwise: bool = False) -> None:
    """Same dtype, shape and values, compared on ``exp``'s device.

    By value (``torch.equal``: -0.0 equals 0.0, NaN equals nothing), or with ``bitwise`` bit for bit (so -0.0
    differs from 0.0), where NaNs need only sit at the same places (payloads may differ between devices)."""
    got = got.to(exp.device)
    _same_kind(got, exp, what)
    how = ""
    if bitwise and got.dtype in _BITS:
        nan_g, nan_e = torch.isnan(got), torch.isnan(exp)
        assert torch.equal(nan_g, nan_e), f"{what}: NaNs at different places; first {names}: " + \
            first_mismatches(got, exp, nan_g != nan_e)
        got, exp = (t.masked_fill(n, 0).view(_BITS[t.dtype]) for t, n in ((got, nan_g), (exp, nan_e)))
        how = " (as integer bits)"
    if torch.equal(got, exp):
        return
    bad = got != exp
    raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ{how}; first {names}: "
                         f"{first_mismatches(got, exp, bad)}")


def assert_sums_close(got: torch.Tensor, exp: torch.Tensor, abssum: torch.Tensor, terms: int, what: str,
                      names: str = "(slot, class, neuron)") -> None:
    """float64 sums of the same ``terms`` numbers per cell, added in different orders (atomics add rows in no
    fixed order): ``|got - exp| <= terms * 2^-52 * abssum``, ``abssum`` the per-cell sum of the terms'
    magnitudes. This is the textbook bound for summation in any order, (n - 1) * 2^-53 * sum |x_i| for each
    side, doubled; derived, not tuned. Count a starting value of the accumulator as one of the terms."""
    _same_kind(got, exp, what)
    bound = terms * 2.0 ** -52 * abssum.to(got.device) + 1e-300
    bad = ~((got - exp).abs() <= bound)
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {bad.numel()} sums differ beyond float64 rounding "
                                 f"({terms} terms); first {names}: {first_mismatches(got, exp, bad)}")


def assert_counts_within_rounding(got: torch.Tensor, expected: torch.Tensor, ref64: torch.Tensor,
                                  threshold: torch.Tensor, slot: torch.Tensor, label: torch.Tensor, allowed: float,
                                  what: str) -> None:
    """Counts above threshold from a kernel that computed its own activations (``got``) against the counts of
    the end-to-end reference (``expected``, PyTorch's activations in the same precision).

    Both sets of activations are within ``allowed`` of the float64 activations ``ref64`` (rows, neurons), the
    tolerance rule's bound (:func:`assert_within_torch_error`), so they can fall on different sides of a
    threshold only where ``|ref64 - threshold| <= allowed``. Each (slot, class, neuron) cell may therefore
    differ by at most its number of such near-threshold rows, and every differing cell must have them."""
    _same_kind(got, expected, what)
    slots, classes, width = got.shape
    if ref64.shape[0]:
        near = ((ref64 - threshold[slot.clamp(min=0)]).abs() <= allowed).double()
    else:
        near = ref64
    near_cells = stats_update_reference(near, slot, label, torch.zeros(slots, classes, width, dtype=torch.float64,
                                                                       device=got.device))
    diff = (got - expected).abs()
    bad = diff > near_cells
    assert not bool(bad.any()), (
        f"{what}: {int((diff > 0).sum())} cells differ, {int(bad.sum())} of them by more than their "
        f"near-threshold rows (|h64 - threshold| <= {allowed:.3g}); first (slot, class, neuron): "
        f"{first_mismatches(got, expected, bad)}")


# ------------------------------------------------------------------------------------------------- input makers
def ffn_weights(rows: int, hidden: int, width: int, out: Optional[int] = None, *, dtype=torch.float32,
                device=DEVICE, gated: bool = False, bias: bool = True, seed: int = 0) -> dict:
    """Random inputs of an FFN, scaled so every value the kernels compute is O(1).

    x: (rows, hidden) ~ N(0, 1); w1 and, when ``gated``, w_gate: (width, hidden) ~ N(0, 1/hidden), so that
    pre-activations are ~N(0, 1) and every part of each activation's curve is used; b1: (width,) ~ N(0, 1/4)
    when ``bias``. With ``out``: w2: (out, width) ~ N(0, 1/width) and b2: (out,) ~ N(0, 1/4) when ``bias``, so
    outputs are O(1) too. Returns dict(x, w1, b1, w_gate) plus (w2, b2) with ``out``; absent ones are None."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    w = dict(x=rnd(rows, hidden), w1=rnd(width, hidden, scale=hidden ** -0.5))
    w["w_gate"] = rnd(width, hidden, scale=hidden ** -0.5) if gated else None
    w["b1"] = rnd(width, scale=0.5) if bias else None
    if out is not None:
        w["w2"] = rnd(out, width, scale=max(width, 1) ** -0.5)
        w["b2"] = rnd(out, scale=0.5) if bias else None
    return w


def slots_and_labels(rows: int, slots: int, classes: int, *, untracked: float = 0.25, seed: int = 0,
                     device=DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    """slot: (rows,) int64 in [0, slots), about a share ``untracked`` of the rows -1 (not tracked);
    label: (rows,) int64 in [0, classes)."""
    g = torch.Generator().manual_seed(seed)
    slot = torch.randint(0, slots, (rows,), generator=g)
    slot[torch.rand(rows, generator=g) < untracked] = -1
    label = torch.randint(0, classes, (rows,), generator=g)
    return slot.to(device), label.to(device)


def thresholds_with_ties(h: torch.Tensor, slot: torch.Tensor, slots: int, *, center: Optional[torch.Tensor] = None,
                         spread: float = 1.0, row_step: int = 3, neuron_step: int = 2, seed: int = 0) -> torch.Tensor:
    """(slots, neurons) float64 thresholds: ``center`` (per neuron; default 0) + ``spread`` * N(0, 1), except
    exact ties: for every ``row_step``-th row r that is tracked, the thresholds of its slot on every
    ``neuron_step``-th neuron from ``r % neuron_step`` on equal h[r] there. An activation equal to its
    threshold counts as not above; ties are also where two computations of h may round to different sides.
    On ``h``'s device."""
    g = torch.Generator().manual_seed(seed)
    width = h.shape[1]
    base = torch.zeros(width, dtype=torch.float64) if center is None else center.double().cpu()
    thr = base.repeat(slots, 1) + spread * torch.randn(slots, width, generator=g, dtype=torch.float64)
    h_cpu, slot_cpu = h.double().cpu(), slot.cpu().tolist()
    for r in range(0, h.shape[0], row_step):
        if slot_cpu[r] >= 0:
            cols = slice(r % neuron_step, None, neuron_step)
            thr[slot_cpu[r], cols] = h_cpu[r, cols]
    return thr.to(h.device)


def stats_inputs(rows: int, width: int, slots: int, classes: int, dtype=torch.float32, *, untracked: float = 0.25,
                 seed: int = 0, device=DEVICE):
    """The inputs of ``stats_update``: h (rows, width) ~ 3 * N(0, 1) in ``dtype``, slots (a share ``untracked``
    of -1) and labels (:func:`slots_and_labels`), thresholds with ties (:func:`thresholds_with_ties`).
    Returns (h, slot, label, threshold) on ``device``."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, width, generator=g) * 3).to(dtype)
    slot, label = slots_and_labels(rows, slots, classes, untracked=untracked, seed=seed + 1, device="cpu")
    threshold = thresholds_with_ties(h, slot, slots, seed=seed + 2)
    return h.to(device), slot.to(device), label.to(device), threshold.to(device)


def random_state(slots: int, classes: int, width: int, *, counts: bool, seed: int = 0, device=DEVICE) -> torch.Tensor:
    """A starting accumulator (slots, classes, width): int64 counts in [0, 1000), or float64 sums ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    if counts:
        return torch.randint(0, 1000, (slots, classes, width), generator=g).to(device)
    return torch.randn(slots, classes, width, generator=g, dtype=torch.float64).to(device)


def every_other(t: torch.Tensor, *, column_major: bool = False) -> torch.Tensor:
    """A view with t's values whose last dimension has stride 2 (every other element of a tensor twice as
    wide); with ``column_major`` (2-D) that wider tensor is stored column by column, strides (1, 2 * rows)."""
    shape = (*t.shape[:-1], 2 * t.shape[-1])
    if column_major:
        big = t.new_zeros(shape[::-1]).t()
    else:
        big = t.new_zeros(shape)
    big[..., ::2] = t
    view = big[..., ::2]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


def column_major(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view with t's values stored column by column (strides (1, rows))."""
    view = t.t().contiguous().t()
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


LAYOUTS = {"every_other": every_other, "column_major": column_major}
