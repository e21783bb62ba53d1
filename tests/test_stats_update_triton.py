"""stats_update with backend="triton" against the PyTorch reference.

Counts are integers: they must be identical. Float64 sums are added with atomics, in no fixed row order, so
they equal the reference up to float64 rounding (bounded per cell by rows * 2^-52 * sum |h|); with values
that add exactly in any order (small multiples of 1/8) they must be identical too, which shows that every
tracked row is added exactly once.

On CPU the kernel runs only under ``TRITON_INTERPRET=1`` (set before Python starts).
"""

from __future__ import annotations

import pytest
import torch

from kernel_checks import (DEVICE, assert_equal, assert_sums_close, every_other, random_state,
                           requires_triton, stats_inputs)
from skillkern.ops.dispatch import resolve
from skillkern.ops.stats_update import stats_update, stats_update_reference

CUDA = DEVICE == "cuda"
pytestmark = requires_triton

torch.set_num_threads(1)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
CELLS = "(slot, class, neuron)"



def check_both(h, slot, label, threshold, slots, classes, what, seed=1):
    """Sums and counts from random starting state: triton vs the reference."""
    width = h.shape[1]
    start = random_state(slots, classes, width, counts=False, seed=seed, device=h.device)
    got = stats_update(h, slot, label, start.clone(), None, backend="triton")
    exp = stats_update_reference(h, slot, label, start.clone(), None)
    abssum = stats_update_reference(h.abs(), slot, label, start.abs(), None)
    assert_sums_close(got, exp, abssum, h.shape[0] + 1, f"sums, {what}")
    start = random_state(slots, classes, width, counts=True, seed=seed + 1, device=h.device)
    got = stats_update(h, slot, label, start.clone(), threshold, backend="triton")
    assert_equal(got, stats_update_reference(h, slot, label, start.clone(), threshold), f"counts, {what}", CELLS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width", [(0, 123), (1, 1), (1, 123), (57, 1), (57, 431)])
def test_triton_matches_reference(dtype, rows, width):
    for slots, classes in ((1, 2), (3, 5)):
        h, slot, label, threshold = stats_inputs(rows, width, slots, classes, dtype, seed=rows * 1000 + width)
        check_both(h, slot, label, threshold, slots, classes,
                   f"{dtype} rows={rows} width={width} slots={slots} classes={classes}")


def test_every_row_added_exactly_once():
    # multiples of 1/8 in [-16, 16]: float64 adds them exactly in any order, so atomics must match bit for bit
    h, slot, label, _ = stats_inputs(57, 431, 3, 5, torch.float32, seed=4)
    h = (h * 8).round().clamp(-128, 128) / 8
    start = torch.zeros(3, 5, 431, dtype=torch.float64, device=h.device)
    assert_equal(stats_update(h, slot, label, start.clone(), backend="triton"),
                 stats_update_reference(h, slot, label, start.clone()), "exact sums", CELLS)


def test_every_slot_untracked():
    h, slot, label, threshold = stats_inputs(40, 123, 2, 3, torch.float32)
    slot[:] = -1
    ones_f, ones_i = (torch.ones(2, 3, 123, dtype=dt, device=h.device) for dt in (torch.float64, torch.int64))
    assert_equal(stats_update(h, slot, label, ones_f.clone(), backend="triton"), ones_f, "sums with every slot -1",
                 CELLS)
    assert_equal(stats_update(h, slot, label, ones_i.clone(), threshold, backend="triton"), ones_i,
                 "counts with every slot -1", CELLS)


def test_strided_h_and_threshold():
    h, slot, label, threshold = stats_inputs(31, 123, 3, 2, torch.float32)
    h, threshold = every_other(h), every_other(threshold, column_major=True)
    check_both(h, slot, label, threshold, 3, 2, "strided h and threshold")


def test_ties_count_as_not_above():
    h = torch.tensor([[0.5, -1.25, 3.0, 0.0]], device=DEVICE)
    at = h.double()
    slot, label = torch.tensor([0], device=DEVICE), torch.tensor([1], device=DEVICE)
    zeros = torch.zeros(1, 2, 4, dtype=torch.int64, device=DEVICE)
    assert int(stats_update(h, slot, label, zeros.clone(), at, backend="triton").sum()) == 0
    below = torch.nextafter(at, torch.full_like(at, -torch.inf))
    counts = stats_update(h, slot, label, zeros.clone(), below, backend="triton")
    assert counts[0, 1].tolist() == [1, 1, 1, 1] and int(counts[0, 0].sum()) == 0, counts


def test_thresholds_between_float32_values():
    """Counts of float32/bfloat16 rows compare in float32 against thresholds rounded toward -inf; that must
    equal the reference's float64 comparison for thresholds a hair above/below an h value, between float32
    neighbours, and at +-1e300, +-inf and NaN."""
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        h = (torch.randn(16, 40, generator=g) * 3).to(dtype)
        h[0, :4] = torch.tensor([float("inf"), float("-inf"), 3.4e38, 0.0]).to(dtype)
        at = h.double()
        thr = torch.stack([at[0] + 1e-300, at[1] * (1 + 1e-12), at[2] * (1 - 1e-12), at[3] + 2.0 ** -60,
                           at[4] - 2.0 ** -60, at[5].nextafter(torch.full_like(at[5], float("inf")))])
        thr[:, 0::7] = torch.tensor([1e300, -1e300, float("inf"), float("-inf"), float("nan"), 0.0],
                                    dtype=torch.float64)[:, None]
        slot = torch.arange(16) % 6
        label = torch.arange(16) % 2
        start = torch.zeros(6, 2, 40, dtype=torch.int64)
        got = stats_update(h.to(DEVICE), slot.to(DEVICE), label.to(DEVICE), start.clone().to(DEVICE),
                           thr.to(DEVICE), backend="triton")
        assert_equal(got.cpu(), stats_update_reference(h, slot, label, start.clone(), thr), f"{dtype} rounding", CELLS)


def test_neuron_stats_with_triton_backend():
    """The accumulator class end to end: both passes through the triton backend equal the reference."""
    from skillkern.stats import NeuronStats

    h, slot, label, _ = stats_inputs(57, 123, 2, 3, torch.float32, seed=9)
    h = (h * 8).round() / 8  # exact sums, so thresholds (and hence counts) must be identical
    runs = {}
    for backend in ("torch", "triton"):
        stats = NeuronStats(2, 2, 123, 3, device=DEVICE)
        for layer in range(2):
            stats.add_rows(layer, h * (layer + 1), slot, label, backend=backend)
        stats.count_rows(label[slot >= 0])
        stats.finalize_thresholds()
        for layer in range(2):
            stats.add_rows(layer, h.flip(0) * (layer + 1), slot, label, backend=backend)
        runs[backend] = stats
    assert_equal(runs["triton"].sums, runs["torch"].sums, "NeuronStats sums", CELLS)
    assert_equal(runs["triton"].above, runs["torch"].above, "NeuronStats counts", CELLS)


def test_auto_never_picks_the_interpreter():
    # auto (one policy, ops/dispatch.py): CUDA: triton > ext > torch; elsewhere ext > torch; never the interpreter
    assert resolve("stats_update", "auto", torch.device("cpu")) in ("ext", "torch")
    if CUDA:
        assert resolve("stats_update", "auto", torch.device("cuda")) in ("ext", "triton")
