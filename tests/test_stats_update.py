"""stats_update: the compiled op (backend="ext") against the PyTorch reference, plus argument checks.

Float64 sums are compared with torch.equal, not a tolerance: both sides add the rows of each element in row
order in float64, and the conversion of every input dtype to float64 is exact, so any difference is a bug.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kernel_checks import assert_equal, every_other, ext, random_state, stats_inputs  # noqa: F401 (ext: fixture)
from skillkern.ops.stats_update import stats_update, stats_update_reference

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
CELLS = "(slot, class, neuron)"


def make_inputs(rows, width, slots, classes, dtype, seed=0):
    """Random rows (about a quarter untracked), with thresholds of which some equal an h value exactly (ties)."""
    return stats_inputs(rows, width, slots, classes, dtype, seed=seed, device="cpu")



def run_both(h, slot, label, threshold, slots, classes, seed=1):
    """Accumulate into random starting state with the reference and with the ext op; return both results."""
    start = random_state(slots, classes, h.shape[1], counts=threshold is not None, seed=seed, device="cpu")
    ref = stats_update_reference(h, slot, label, start.clone(), threshold)
    got = stats_update(h, slot, label, start.clone(), threshold, backend="ext")
    return got, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", (0, 1, 57))
@pytest.mark.parametrize("width", (1, 123, 431))
def test_ext_matches_reference(ext, dtype, rows, width):
    for slots, classes in itertools.product((1, 3), (2, 5)):
        h, slot, label, threshold = make_inputs(rows, width, slots, classes, dtype, seed=rows * 1000 + width)
        where = f"{dtype} rows={rows} width={width} slots={slots} classes={classes}"
        assert_equal(*run_both(h, slot, label, None, slots, classes), f"sums, {where}", CELLS)
        assert_equal(*run_both(h, slot, label, threshold, slots, classes), f"counts, {where}", CELLS)


def test_ext_all_rows_untracked(ext):
    h, slot, label, threshold = make_inputs(9, 40, 2, 3, torch.float32)
    slot[:] = -1
    assert_equal(*run_both(h, slot, label, None, 2, 3), "sums with every slot -1", CELLS)
    assert_equal(*run_both(h, slot, label, threshold, 2, 3), "counts with every slot -1", CELLS)
    # The public function returns early on zero rows; the op itself must cope with them too.
    out = torch.ones(2, 3, 40, dtype=torch.float64)
    torch.ops.skillkern.stats_update(h[:0], slot[:0], label[:0], out, None)
    assert_equal(out, torch.ones(2, 3, 40, dtype=torch.float64), "op on zero rows", CELLS)


def test_ext_non_contiguous_inputs(ext):
    h, slot, label, threshold = make_inputs(31, 123, 3, 2, torch.float32)
    h, threshold = every_other(h), every_other(threshold, column_major=True)
    assert_equal(*run_both(h, slot, label, None, 3, 2), "sums of a strided h", CELLS)
    assert_equal(*run_both(h, slot, label, threshold, 3, 2), "counts with strided h and threshold", CELLS)


@pytest.mark.parametrize("backend", ("torch", "ext"))
def test_halves_merge_to_whole(backend, request):
    if backend == "ext":
        request.getfixturevalue("ext")
    slots, classes, width = 3, 5, 123
    h, slot, label, threshold = make_inputs(57, width, slots, classes, torch.float32, seed=7)
    # Float sums depend on the order of additions, and (first half) + (second half) is another order than one
    # pass over all rows. Multiples of 1/8 of small size add exactly in float64 in any order, so with them
    # merging must give the identical result; counts are integers, so any data works.
    h_exact = (h * 8).round().clamp(-16, 16) / 8
    for data, thr, zeros in ((h_exact, None, torch.zeros(slots, classes, width, dtype=torch.float64)),
                             (h, threshold, torch.zeros(slots, classes, width, dtype=torch.int64))):
        whole = stats_update(data, slot, label, zeros.clone(), thr, backend=backend)
        first = stats_update(data[:20], slot[:20], label[:20], zeros.clone(), thr, backend=backend)
        second = stats_update(data[20:], slot[20:], label[20:], zeros.clone(), thr, backend=backend)
        assert_equal(first + second, whole, f"{backend}: merged halves ({'sums' if thr is None else 'counts'})", CELLS)


@pytest.mark.parametrize("chunk", (1, 7, 32))
def test_chunked_feeding_is_identical(ext, chunk):
    # Chunking does not change the order in which each element receives its rows, so even float64 sums of
    # arbitrary floats are bit-identical to a single call.
    slots, classes, width = 3, 2, 431
    h, slot, label, threshold = make_inputs(57, width, slots, classes, torch.float32, seed=11)
    for thr, dtype in ((None, torch.float64), (threshold, torch.int64)):
        one_call = stats_update_reference(h, slot, label, torch.zeros(slots, classes, width, dtype=dtype), thr)
        out = torch.zeros(slots, classes, width, dtype=dtype)
        for i in range(0, h.shape[0], chunk):
            stats_update(h[i:i + chunk], slot[i:i + chunk], label[i:i + chunk], out, thr, backend="ext")
        assert_equal(out, one_call, f"chunks of {chunk} ({'sums' if thr is None else 'counts'})", CELLS)


@pytest.mark.parametrize("backend", ("torch", "ext"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_ties_count_as_not_above(backend, dtype, request):
    if backend == "ext":
        request.getfixturevalue("ext")
    h = torch.tensor([[0.5, -1.25, 3.0, 0.0]], dtype=dtype)
    at = h.to(torch.float64)
    slot, label = torch.tensor([0]), torch.tensor([1])
    counts = stats_update(h, slot, label, torch.zeros(1, 2, 4, dtype=torch.int64), at, backend=backend)
    assert counts.sum() == 0, f"{backend}: h equal to its threshold counted as above: {counts}"
    below = torch.nextafter(at, torch.full_like(at, -torch.inf))
    counts = stats_update(h, slot, label, torch.zeros(1, 2, 4, dtype=torch.int64), below, backend=backend)
    assert counts[0, 1].tolist() == [1, 1, 1, 1] and counts[0, 0].sum() == 0, f"{backend}: {counts}"


def _valid(rows=6, width=5, slots=2, classes=3):
    h, slot, label, threshold = make_inputs(rows, width, slots, classes, torch.float32)
    slot[0] = 1  # at least one tracked row, so label checks see something
    return dict(h=h, slot=slot, label=label, out=torch.zeros(slots, classes, width, dtype=torch.int64),
                threshold=threshold)


BAD_INPUTS = {
    "label above range": (lambda a: a["label"].__setitem__(0, 3), r"label 3 out of range \[0, 3\)"),
    "negative label": (lambda a: a["label"].__setitem__(0, -1), r"label -1 out of range"),
    "slot above range": (lambda a: a["slot"].__setitem__(0, 2), r"slot index 2 out of range for 2 slots"),
    "slot below -1": (lambda a: a["slot"].__setitem__(0, -2), r"slot index -2 is invalid"),
    "h 1-D": (lambda a: a.update(h=a["h"][0]), r"h must be 2-D"),
    "h integer": (lambda a: a.update(h=a["h"].to(torch.int32)), r"h must be floating point"),
    "slot too short": (lambda a: a.update(slot=a["slot"][:-1]), r"slot must have shape \(6,\)"),
    "label int32": (lambda a: a.update(label=a["label"].to(torch.int32)), r"label must be int64"),
    "out width": (lambda a: a.update(out=torch.zeros(2, 3, 4, dtype=torch.int64)), r"out must have shape"),
    "counts in float64": (lambda a: a.update(out=a["out"].double()), r"counts are accumulated in int64"),
    "sums in float32": (lambda a: a.update(threshold=None, out=a["out"].float()), r"sums are accumulated in float64"),
    "threshold shape": (lambda a: a.update(threshold=a["threshold"][:1]), r"threshold must have shape \(2, 5\)"),
    "threshold float32": (lambda a: a.update(threshold=a["threshold"].float()), r"threshold must be float64"),
}


# The compiled op also refuses what the public function accepts: a non-contiguous out (the public function
# accumulates through a contiguous copy and writes it back, see test_public_function_takes_a_strided_out).
OP_ONLY_BAD_INPUTS = {
    "out non-contiguous": (lambda a: a.update(out=torch.zeros(2, 5, 3, dtype=torch.int64).transpose(1, 2)),
                           r"out must be contiguous"),
}


@pytest.mark.parametrize("backend", ("torch", "ext"))
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_value_error(case, backend):
    # The public checks run before the backend is chosen, so these hold with or without the extension.
    args = _valid()
    mutate, message = BAD_INPUTS[case]
    mutate(args)
    with pytest.raises(ValueError, match=message):
        stats_update(backend=backend, **args)


# The op's own messages where they differ from the Python checks (it also names the row).
OP_MESSAGES = {
    "label above range": r"label 3 at row 0 out of range \[0, 3\)",
    "negative label": r"label -1 at row 0 out of range",
    "slot above range": r"slot index 2 at row 0 out of range for 2 slots",
    "slot below -1": r"slot index -2 at row 0 out of range",
    "h integer": r"h must be float32, float64, float16 or bfloat16",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS | OP_ONLY_BAD_INPUTS))
def test_ext_op_checks_its_own_arguments(ext, case):
    # Unchecked calls (check=False) must still never write out of bounds: the op validates on its own.
    args = _valid()
    mutate, message = (BAD_INPUTS | OP_ONLY_BAD_INPUTS)[case]
    mutate(args)
    with pytest.raises(RuntimeError, match=OP_MESSAGES.get(case, message)):
        torch.ops.skillkern.stats_update(args["h"], args["slot"], args["label"], args["out"], args["threshold"])


@pytest.mark.parametrize("backend", ("torch", "ext"))
def test_public_function_takes_a_strided_out(backend, request):
    """Every op accepts non-contiguous views (ops/dispatch.py): a transposed out receives the counts a
    contiguous one does, in place."""
    if backend == "ext":
        request.getfixturevalue("ext")
    args = _valid()
    want = stats_update(backend=backend, **args)
    assert int(want.sum()) > 0, "nothing counted: the comparison below would be vacuous"
    view = torch.zeros(2, 5, 3, dtype=torch.int64).transpose(1, 2)
    assert not view.is_contiguous()
    got = stats_update(backend=backend, **dict(args, out=view))
    assert got.data_ptr() == view.data_ptr() and got.stride() == view.stride(), "the result is not the view passed"
    assert_equal(view, want, f"{backend}: counts in a transposed out", CELLS)


def test_unknown_backend_raises():
    args = _valid()
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        stats_update(backend="bogus", **args)


def test_empty_input_leaves_out_untouched():
    out = torch.full((2, 3, 5), 7, dtype=torch.int64)
    stats_update(torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), out,
                 torch.zeros(2, 5, dtype=torch.float64))
    assert bool((out == 7).all())
