"""stats_moments: every backend against the PyTorch reference; the accumulator NeuronMoments; the variance bound.

The compiled op adds each element's rows in row order in float64, as the reference's ``index_add_`` does, and
the squares of float32/16/bfloat16 values are exact in float64: its moments must equal the reference bit for
bit. Triton adds with atomics in no fixed order: sums within float64 rounding (``assert_sums_close``), and
bit for bit on values that add exactly in any order (small multiples of 1/8), which shows that every tracked row
is added exactly once. The one-pass variance is checked against exact rational arithmetic with the bound the
module docstring of ``skillkern.stats`` states.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from kernel_checks import (DEVICE, TRITON_OK, assert_equal, assert_sums_close, every_other, ext,  # noqa: F401
                           requires_triton, stats_inputs)
from skillkern.ops.dispatch import resolve
from skillkern.ops.stats_moments import stats_moments, stats_moments_reference
from skillkern.stats import NeuronMoments, StatsFileError

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
CELLS = "(slot, moment, neuron)"


def make_inputs(rows, width, slots, dtype, seed=0, device="cpu"):
    """h (rows, width) ~ 3 N(0, 1) in ``dtype`` and slots with about a quarter of the rows untracked (-1)."""
    h, slot, _, _ = stats_inputs(rows, width, slots, 2, dtype, seed=seed, device=device)
    return h, slot


def random_start(slots, width, seed=1, device="cpu"):
    """A starting accumulator: sums ~ N(0, 1), sums of squares and of magnitudes >= 0 (as real moments are)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(slots, 3, width, generator=g, dtype=torch.float64)
    start[:, 1:] = start[:, 1:].abs()
    return start.to(device)


def magnitudes(h, slot, start):
    """Per cell, the sum of the magnitudes of the terms added (start included): the float64 rounding scale."""
    mag = stats_moments_reference(h.abs(), slot, start.abs().clone())
    mag[:, 0] = mag[:, 2]  # |h| summed: the scale of the plain sums
    return mag


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", (0, 1, 57))
@pytest.mark.parametrize("width", (1, 123, 431))
def test_ext_matches_reference_bit_for_bit(ext, dtype, rows, width):
    for slots in (1, 3):
        h, slot = make_inputs(rows, width, slots, dtype, seed=rows * 1000 + width + slots)
        start = random_start(slots, width)
        got = stats_moments(h, slot, start.clone(), backend="ext")
        want = stats_moments_reference(h, slot, start.clone())
        assert_equal(got, want, f"{dtype} rows={rows} width={width} slots={slots}", CELLS, bitwise=True)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width", [(0, 123), (1, 1), (1, 123), (57, 1), (57, 431)])
def test_triton_matches_reference(dtype, rows, width):
    for slots in (1, 3):
        h, slot = make_inputs(rows, width, slots, dtype, seed=rows * 100 + width, device=DEVICE)
        start = random_start(slots, width, device=DEVICE)
        got = stats_moments(h, slot, start.clone(), backend="triton")
        want = stats_moments_reference(h, slot, start.clone())
        assert_sums_close(got, want, magnitudes(h, slot, start), rows + 1,
                          f"{dtype} rows={rows} width={width} slots={slots}", CELLS)


@requires_triton
def test_triton_adds_every_row_exactly_once():
    # multiples of 1/8 in [-16, 16]: their squares and sums are exact in float64 in any order
    h, slot = make_inputs(57, 431, 3, torch.float32, seed=4, device=DEVICE)
    h = (h * 8).round().clamp(-128, 128) / 8
    zeros = torch.zeros(3, 3, 431, dtype=torch.float64, device=DEVICE)
    assert_equal(stats_moments(h, slot, zeros.clone(), backend="triton"),
                 stats_moments_reference(h, slot, zeros.clone()), "exact moments", CELLS)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" or not TRITON_OK, reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
def test_gpu_triton_bert_base_shapes(dtype):
    # 32 sequences x 128 tokens of BERT-base's FFN (D=3072), 4 slots: many rows per atomic target
    h, slot = make_inputs(4096, 3072, 4, dtype, seed=9, device="cuda")
    start = random_start(4, 3072, device="cuda")
    got = stats_moments(h, slot, start.clone(), backend="triton")
    want = stats_moments_reference(h, slot, start.clone())
    assert_sums_close(got, want, magnitudes(h, slot, start), 4097, f"{dtype} BERT-base shape", CELLS)
    exact = (h.float() * 8).round().clamp(-128, 128).div(8).to(dtype)  # exact in any order: each row once
    zeros = torch.zeros(4, 3, 3072, dtype=torch.float64, device="cuda")
    assert_equal(stats_moments(exact, slot, zeros.clone(), backend="triton"),
                 stats_moments_reference(exact, slot, zeros.clone()), f"{dtype} exact moments", CELLS)


@pytest.mark.parametrize("backend", ("torch", "ext", "triton"))
def test_every_row_untracked_leaves_out_alone(backend, request):
    if backend == "ext":
        request.getfixturevalue("ext")
    if backend == "triton" and not TRITON_OK:
        pytest.skip("triton cannot run here")
    device = DEVICE if backend == "triton" else "cpu"
    h, slot = make_inputs(40, 123, 2, torch.float32, device=device)
    ones = torch.ones(2, 3, 123, dtype=torch.float64, device=device)
    got = stats_moments(h, torch.full_like(slot, -1), ones.clone(), backend=backend)
    assert_equal(got, ones, f"{backend}: every slot -1", CELLS)


@pytest.mark.parametrize("backend", ("torch", "ext"))
def test_halves_merge_to_whole(backend, request):
    if backend == "ext":
        request.getfixturevalue("ext")
    h, slot = make_inputs(57, 123, 3, torch.float32, seed=7)
    h = (h * 8).round().clamp(-16, 16) / 8  # exact in any order: merged halves must equal one pass
    zeros = torch.zeros(3, 3, 123, dtype=torch.float64)
    whole = stats_moments(h, slot, zeros.clone(), backend=backend)
    first = stats_moments(h[:20], slot[:20], zeros.clone(), backend=backend)
    second = stats_moments(h[20:], slot[20:], zeros.clone(), backend=backend)
    assert_equal(first + second, whole, f"{backend}: merged halves", CELLS)


@pytest.mark.parametrize("chunk", (1, 7, 32))
def test_chunked_feeding_is_bit_identical(ext, chunk):
    # chunks do not change the order in which each element receives its rows: any floats, bit for bit
    h, slot = make_inputs(57, 431, 3, torch.float32, seed=11)
    one_call = stats_moments_reference(h, slot, torch.zeros(3, 3, 431, dtype=torch.float64))
    out = torch.zeros(3, 3, 431, dtype=torch.float64)
    for i in range(0, h.shape[0], chunk):
        stats_moments(h[i:i + chunk], slot[i:i + chunk], out, backend="ext")
    assert_equal(out, one_call, f"chunks of {chunk}", CELLS, bitwise=True)


def test_float64_rows_square_once_then_add(ext):
    """Float64 rows: the square rounds, then the addition (no fused multiply-add in the compiled op), as the
    reference does. Values chosen so that fma(v, v, acc) and acc + fl(v * v) differ."""
    v = torch.tensor([[1 + 2.0 ** -30], [1 + 2.0 ** -29], [3 + 2.0 ** -40]], dtype=torch.float64)
    slot = torch.zeros(3, dtype=torch.int64)
    start = torch.full((1, 3, 1), 1e-3, dtype=torch.float64)
    got = stats_moments(v, slot, start.clone(), backend="ext")
    assert_equal(got, stats_moments_reference(v, slot, start.clone()), "float64 squares", CELLS, bitwise=True)


def test_moments_are_the_three_sums():
    h = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-4.0, 1.0]])
    slot = torch.tensor([0, -1, 0])
    out = stats_moments(h, slot, torch.zeros(1, 3, 2, dtype=torch.float64), backend="torch")
    assert out[0].tolist() == [[-3.0, -1.0], [17.0, 5.0], [5.0, 3.0]]


def test_public_function_takes_strided_views(ext):
    h, slot = make_inputs(31, 123, 3, torch.float32)
    want = stats_moments(h, slot, torch.zeros(3, 3, 123, dtype=torch.float64), backend="ext")
    view = torch.zeros(3, 123, 3, dtype=torch.float64).transpose(1, 2)
    got = stats_moments(every_other(h), every_other(slot), view, backend="ext")
    assert got.data_ptr() == view.data_ptr()
    assert_equal(view, want, "strided h, slot and out", CELLS, bitwise=True)


def _valid(rows=6, width=5, slots=2):
    h, slot = make_inputs(rows, width, slots, torch.float32)
    slot[0] = 1
    return dict(h=h, slot=slot, out=torch.zeros(slots, 3, width, dtype=torch.float64))


BAD_INPUTS = {
    "slot above range": (lambda a: a["slot"].__setitem__(0, 2), r"slot index 2 out of range for 2 slots"),
    "slot below -1": (lambda a: a["slot"].__setitem__(0, -2), r"slot index -2"),
    "h 1-D": (lambda a: a.update(h=a["h"][0]), r"h must be 2-D"),
    "slot too short": (lambda a: a.update(slot=a["slot"][:-1]), r"slot must have shape \(6,\)"),
    "slot int32": (lambda a: a.update(slot=a["slot"].int()), r"slot must be int64"),
    "out not 3 moments": (lambda a: a.update(out=torch.zeros(2, 2, 5, dtype=torch.float64)),
                          r"out must have shape \(slots, 3, 5\)"),
    "out float32": (lambda a: a.update(out=a["out"].float()), r"moments are accumulated in float64"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS) + ["h integer"])
def test_bad_input_raises_value_error(case):
    args = _valid()
    if case == "h integer":
        args["h"] = args["h"].int()
        message = "h must be floating point"
    else:
        mutate, message = BAD_INPUTS[case]
        mutate(args)
    with pytest.raises(ValueError, match=message):
        stats_moments(**args, backend="torch")


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_ext_op_checks_its_own_arguments(ext, case):
    args = _valid()
    mutate, message = BAD_INPUTS[case]
    mutate(args)
    message = {"slot above range": r"slot index 2 at row 0 out of range for 2 slots",
               "slot below -1": r"slot index -2 at row 0 out of range"}.get(case, message)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.skillkern.stats_moments(args["h"], args["slot"], args["out"])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_opcheck(ext, dtype):
    h, slot = make_inputs(13, 37, 3, dtype)
    torch.library.opcheck(torch.ops.skillkern.stats_moments.default, (h, slot, random_start(3, 37)))


def test_auto_backend_on_cpu(ext):
    assert resolve("stats_moments", "auto", torch.device("cpu")) == "ext"


# ---------------------------------------------------------------------------------------------- NeuronMoments
def _filled(seed=0, L=2, S=1, D=9, rows=30) -> tuple[NeuronMoments, list[torch.Tensor]]:
    """Moments of random rows (each layer its own), and the rows each layer received (slot 0 only)."""
    g = torch.Generator().manual_seed(seed)
    m = NeuronMoments(L, S, D)
    stored = []
    slot = torch.zeros(rows, dtype=torch.int64)
    for layer in range(L):
        h = torch.randn(rows, D, generator=g) * (layer + 1) + layer
        m.add_rows(layer, h, slot, backend="torch")
        stored.append(h.double())
    m.count_positions(slot)
    return m, stored


def test_statistics_equal_the_stored_activations():
    m, stored = _filled()
    for layer, a in enumerate(stored):
        torch.testing.assert_close(m.mean()[layer], a.mean(0), rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(m.variance()[layer], a.var(0), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(m.l2_norm()[layer], a.norm(dim=0), rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(m.mean_abs()[layer], a.abs().mean(0), rtol=1e-14, atol=1e-14)
    assert m.positions() == 30 and m.count.tolist() == [30]


def test_merge_clone_and_shape_checks():
    a, _ = _filled(seed=1)
    b, _ = _filled(seed=2)
    both = a + b
    assert_equal(both.moments, a.moments + b.moments, "merged moments")
    assert both.count.tolist() == [60] and a.count.tolist() == [30]  # __add__ leaves a alone
    with pytest.raises(ValueError, match="cannot merge moments of shape"):
        a.merge_(NeuronMoments(2, 1, 8))
    with pytest.raises(ValueError, match="at least 2"):
        NeuronMoments(1, 1, 3).variance()
    with pytest.raises(ValueError, match="slot 1 out of range for 1 slots"):
        a.count_positions(torch.tensor([0, 1]))


def test_file_round_trip_and_refusals(tmp_path):
    m, _ = _filled()
    path = tmp_path / "moments.safetensors"
    m.save(path, {"run": "r", "rows": 30})
    back, settings = NeuronMoments.load(path, expect={"run": "r"})
    assert settings == {"run": "r", "rows": 30}
    assert_equal(back.moments, m.moments, "moments after a round trip", bitwise=True)
    assert_equal(back.count, m.count, "counts after a round trip")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"moments", "count", "mean", "variance", "l2_norm", "mean_abs"}
        assert torch.equal(f.get_tensor("variance"), m.variance())
        assert f.metadata()["format"] == "skillkern-moments" and f.metadata()["format_version"] == "1"
    with pytest.raises(StatsFileError, match="belongs to run='r', not 'other'"):
        NeuronMoments.load(path, expect={"run": "other"})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(StatsFileError, match="not a readable safetensors file"):
        NeuronMoments.load(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NeuronMoments.load(tmp_path / "nothing.safetensors")


# ----------------------------------------------------------------------------------------- the variance bound
U = 2.0 ** -53


def _exact_variance(values: list[float]) -> Fraction:
    xs = [Fraction(v) for v in values]
    mean = sum(xs) / len(xs)
    return sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)


def _two_pass(column: torch.Tensor) -> float:
    mean = column.mean()
    return float(((column - mean) ** 2).sum() / (column.numel() - 1))


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.3, 0.05), (100.0, 1.0), (1e4, 1e-2)])
def test_one_pass_variance_within_the_stated_bound(mean, std):
    """|var - var_exact| <= (3 n + 5) u sumsq / (n - 1) (skillkern.stats), against exact rationals, for float32
    activations from well-conditioned (mean 0) to badly conditioned (mean 10^6 standard deviations) neurons, fed
    in chunks in row order (CPU) and by atomics (Triton, when it runs here)."""
    n, width = 2000, 4
    g = torch.Generator().manual_seed(int(mean) + 3)
    h = (torch.randn(n, width, generator=g, dtype=torch.float64) * std + mean).float()
    exact = [_exact_variance(h[:, j].double().tolist()) for j in range(width)]
    backends = ["torch"] + (["triton"] if TRITON_OK else [])
    for backend in backends:
        m = NeuronMoments(1, 1, width, device=DEVICE if backend == "triton" else "cpu")
        slot = torch.zeros(500, dtype=torch.int64, device=m.count.device)
        for i in range(0, n, 500):
            m.add_rows(0, h[i:i + 500].to(m.count.device), slot, backend=backend)
            m.count_positions(slot)
        var = m.variance()[0].cpu()
        sumsq = m.totals()[0, 1].cpu()
        for j in range(width):
            err = abs(Fraction(float(var[j])) - exact[j])
            bound = (3 * n + 5) * U * float(sumsq[j]) / (n - 1)
            assert float(err) <= bound, (backend, mean, std, j, float(err), bound)
            # the two-pass variance from the stored activations is within a few n u of the exact one whatever
            # the mean: the one-pass form is what the bound is about
            two = abs(Fraction(_two_pass(h[:, j].double())) - exact[j])
            assert float(two) <= 4 * n * U * float(exact[j]) + 1e-300, (mean, j, float(two))


def test_the_bound_is_not_vacuous():
    """Where the mean is 10^6 standard deviations the one-pass variance really loses digits that the two-pass one
    keeps (the cancellation the bound is about is real), and accumulating in float32 instead of float64 breaks the
    bound (it is tight enough to catch a wrong accumulator)."""
    n = 2000
    g = torch.Generator().manual_seed(5)
    h = (torch.randn(n, 1, generator=g, dtype=torch.float64) * 1e-2 + 1e4).float()
    exact = _exact_variance(h[:, 0].double().tolist())
    m = NeuronMoments(1, 1, 1)
    m.add_rows(0, h, torch.zeros(n, dtype=torch.int64), backend="torch")
    m.count_positions(torch.zeros(n, dtype=torch.int64))
    sumsq = float(m.totals()[0, 1, 0])
    bound = (3 * n + 5) * U * sumsq / (n - 1)
    err = float(abs(Fraction(float(m.variance()[0, 0])) - exact))
    two = float(abs(Fraction(_two_pass(h[:, 0].double())) - exact))
    assert err <= bound and err > 1e-6 * float(exact) > 1e4 * two, (err, bound, two, float(exact))
    s32, q32 = h.double().sum().float(), (h.double() ** 2).float().sum()  # a float32 accumulator
    var32 = (q32.double() - s32.double() ** 2 / n) / (n - 1)
    assert float(abs(Fraction(float(var32)) - exact)) > bound


def test_variance_of_constant_activations_is_zero_not_negative():
    m = NeuronMoments(1, 1, 3)
    h = torch.full((1000, 3), 0.1, dtype=torch.float32)
    m.add_rows(0, h, torch.zeros(1000, dtype=torch.int64), backend="torch")
    m.count_positions(torch.zeros(1000, dtype=torch.int64))
    assert bool((m.variance() >= 0).all()) and float(m.variance().max()) <= 3003 * U * float(m.totals()[0, 1].max()) / 999

