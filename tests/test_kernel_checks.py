"""The shared checks of kernel_checks.py fail where they must: a check that cannot fail would pass every kernel."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import (assert_counts_within_rounding, assert_equal, assert_sums_close, assert_within_torch_error,
                           column_major, every_other, ffn_weights, slots_and_labels, stats_inputs,
                           thresholds_with_ties)
from skillkern.ops.stats_update import stats_update_reference


def _lowp_problem(dtype=torch.bfloat16):
    """ref64: a float64 'truth'; lowp: it rounded to ``dtype`` (PyTorch's error: half an ulp at most)."""
    ref64 = torch.linspace(-3, 3, 97, dtype=torch.float64).reshape(1, 97) + 1 / 3
    return ref64, ref64.to(dtype)


def test_tolerance_rule_bounds():
    ref64, lowp = _lowp_problem()
    allowed = assert_within_torch_error(lowp.clone(), ref64, lowp, "PyTorch's own result")
    err_torch = (lowp.double() - ref64).abs().max().item()
    assert allowed == pytest.approx(2 * err_torch + torch.finfo(torch.bfloat16).eps * ref64.abs().max().item())
    # off by three of PyTorch's largest errors plus an ulp, at one element: rejected, and the element named
    bad = lowp.clone()
    bad[0, 40] = (ref64[0, 40] + allowed * 1.01 + 2 ** -6).to(torch.bfloat16)
    with pytest.raises(AssertionError, match=r"1 of 97 elements .* first \(row, col\): \(0, 40\)"):
        assert_within_torch_error(bad, ref64, lowp, "one element off", "(row, col)")
    nan = lowp.clone()
    nan[0, 3] = float("nan")
    with pytest.raises(AssertionError, match="1 of 97"):
        assert_within_torch_error(nan, ref64, lowp, "NaN")
    with pytest.raises(AssertionError, match="got torch.float32"):
        assert_within_torch_error(lowp.float(), ref64, lowp, "wrong dtype")
    assert assert_within_torch_error(lowp[:0], ref64[:0], lowp[:0], "empty") == 0.0


def test_tolerance_rule_exact_lowp_allows_one_ulp():
    # PyTorch exact (error 0): one ulp at the largest magnitude remains, no more
    ref64 = torch.tensor([1.0, 2.0, -4.0], dtype=torch.float64)
    lowp = ref64.float()
    ulp = torch.finfo(torch.float32).eps * 4
    assert assert_within_torch_error(lowp + torch.tensor([0.0, 0.0, ulp]), ref64, lowp, "one ulp") == ulp
    with pytest.raises(AssertionError):
        assert_within_torch_error(lowp + torch.tensor([0.0, 0.0, 2 * ulp]), ref64, lowp, "two ulps")


def test_assert_equal_by_value_and_bitwise():
    a = torch.tensor([0.0, 1.0, float("nan")], dtype=torch.float64)
    b = torch.tensor([-0.0, 1.0, float("nan")], dtype=torch.float64)
    assert_equal(a[:2], b[:2], "signed zero equal by value")
    with pytest.raises(AssertionError, match=r"1 of 3 elements differ \(as integer bits\); first : \(0,\)"):
        assert_equal(a, b, "signed zero", bitwise=True)
    assert_equal(b.clone(), b, "NaNs at the same places", bitwise=True)
    with pytest.raises(AssertionError, match="NaNs at different places"):
        assert_equal(b.flip(0), b, "NaN moved", bitwise=True)
    with pytest.raises(AssertionError, match="1 of 3 elements differ"):
        assert_equal(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]), "counts")
    with pytest.raises(AssertionError, match="got torch.int32"):
        assert_equal(torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([1, 2, 3]), "dtype")


def test_sums_close_bound():
    exp = torch.tensor([[[1.0, 100.0]]], dtype=torch.float64)
    abssum = torch.tensor([[[1.0, 100.0]]], dtype=torch.float64)
    assert_sums_close(exp + torch.tensor([0.0, 8 * 2.0 ** -52 * 100]), exp, abssum, 10, "within the bound")
    with pytest.raises(AssertionError, match=r"1 of 2 sums .* first \(slot, class, neuron\): \(0, 0, 1\)"):
        assert_sums_close(exp + torch.tensor([0.0, 12 * 2.0 ** -52 * 100]), exp, abssum, 10, "beyond")


def test_counts_within_rounding():
    # one row, two neurons: neuron 0 sits on its threshold (near), neuron 1 far above it
    ref64 = torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    thr = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    slot, label = torch.tensor([0]), torch.tensor([1])
    expected = torch.zeros(1, 2, 2, dtype=torch.int64)
    got = expected.clone()
    got[0, 1, 0] = 1  # the near one may flip
    assert_counts_within_rounding(got, expected, ref64, thr, slot, label, 1e-3, "near flips")
    got[0, 1, 1] = 1  # the far one may not
    with pytest.raises(AssertionError, match=r"2 cells differ, 1 of them .* \(0, 1, 1\)"):
        assert_counts_within_rounding(got, expected, ref64, thr, slot, label, 1e-3, "far flips")
    got[0, 1, 1] = 0
    got[0, 1, 0] = 2  # by more than its one near row
    with pytest.raises(AssertionError, match="1 of them"):
        assert_counts_within_rounding(got, expected, ref64, thr, slot, label, 1e-3, "two flips for one row")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_makers(dtype):
    w = ffn_weights(64, 48, 96, 24, dtype=dtype, device="cpu", gated=True, seed=1)
    assert {k: tuple(v.shape) for k, v in w.items()} == dict(x=(64, 48), w1=(96, 48), w_gate=(96, 48), b1=(96,),
                                                            w2=(24, 96), b2=(24,))
    assert all(v.dtype == dtype for v in w.values())
    pre = w["x"].double() @ w["w1"].double().t()
    assert 0.7 < pre.std().item() < 1.3, "pre-activations are not ~N(0, 1)"
    assert ffn_weights(4, 8, 16, dtype=dtype, device="cpu", bias=False)["b1"] is None
    slot, label = slots_and_labels(400, 3, 5, untracked=0.25, seed=2, device="cpu")
    assert 0.15 < (slot == -1).double().mean().item() < 0.35 and set(label.tolist()) == set(range(5))
    h, slot, label, thr = stats_inputs(30, 40, 2, 3, dtype, seed=3, device="cpu")
    tied = [(r, n) for r in range(0, 30, 3) if slot[r] >= 0 for n in range(r % 2, 40, 2)]
    assert tied and any(h[r, n].double() == thr[slot[r], n] for r, n in tied), "no exact ties"
    # the last tracked row of each slot keeps its ties (later rows overwrite earlier ones on the same neurons)
    thr2 = thresholds_with_ties(h, slot, 2, row_step=1, neuron_step=3, seed=4)
    last = max(r for r in range(30) if slot[r] == 0)
    assert torch.equal(thr2[0, last % 3::3], h[last, last % 3::3].double())
    counts = stats_update_reference(h, slot, label, torch.zeros(2, 3, 40, dtype=torch.int64), thr)
    assert 0 < int(counts.sum()) < int((slot >= 0).sum()) * 40


def test_strided_views():
    t = torch.arange(12.0).reshape(3, 4)
    assert every_other(t).stride() == (8, 2)
    assert every_other(t, column_major=True).stride() == (1, 6)
    assert column_major(t).stride() == (1, 3)
    for view in (every_other(t), every_other(t, column_major=True), column_major(t)):
        assert torch.equal(view, t) and not view.is_contiguous()
