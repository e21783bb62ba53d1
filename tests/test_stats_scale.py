"""Statistics at scale: Llama-7B / 70B neuron counts, and float64 sums after 10 million rows.

Floats are compared by the tolerance rule of ``kernel_checks.py`` against correctly rounded references
(``math.fsum``), PyTorch's own float64 computation of the same quantity giving the error it may double."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kernel_checks import assert_within_torch_error
from skillkern.ops.stats_update import stats_update, stats_update_reference
from skillkern.stats import NeuronStats


def state_bytes_formula(L: int, S: int, D: int, C: int) -> int:
    """float64 sums + int64 counts (L*S*C*D each), float64 thresholds (L*S*D), two int64 class counts (C)."""
    return 8 * (2 * L * S * C * D + L * S * D + 2 * C)


@pytest.mark.parametrize("L,D", [(32, 11008), (80, 28672)], ids=["llama-7b", "llama-70b"])
def test_huge_models_state_size_and_update(L, D):
    S, C, R = 1, 2, 16
    stats = NeuronStats(L, S, D, C)
    g = torch.Generator().manual_seed(L)
    h = torch.randn(R, D, generator=g)
    label = torch.arange(R) % C
    slot = torch.zeros(R, dtype=torch.long)
    for layer in range(L):
        stats.add_rows(layer, h, slot, label)
    stats.count_rows(label)
    stats.finalize_thresholds()
    assert sum(t.numel() * t.element_size() for t in stats.state_tensors().values()) == state_bytes_formula(L, S, D, C)
    # every layer saw the same rows: its thresholds are the column means (R = 16: dividing fsum's correctly
    # rounded sum by it is exact)
    expected = h.double().mean(0)
    exact = torch.tensor([math.fsum(col) / R for col in h.double().t().tolist()], dtype=torch.float64)
    assert_within_torch_error(stats.threshold[L - 1, 0], exact, expected, "thresholds of the last layer", "(neuron,)")
    for layer in range(L):
        stats.add_rows(layer, h, slot, label)
    assert torch.equal(stats.above[0], stats.above[L - 1])
    assert int(stats.above[0, 0].sum()) == int((h.double() > expected).sum())


@pytest.mark.slow
def test_float64_sums_after_ten_million_rows():
    """Sequential float64 sums of 10M float32 activations stay within 1e-9 relative of the exact sum, and within
    the tolerance rule of it (PyTorch's reference accumulating the same chunks giving its own error)."""
    D, C, total, chunk = 3, 2, 10_000_000, 1_000_000
    out = torch.zeros(1, C, D, dtype=torch.float64)
    out_torch = torch.zeros(1, C, D, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    exact_parts = [[[] for _ in range(D)] for _ in range(C)]
    for _ in range(total // chunk):
        # GELU-like activations: mostly small, a heavy positive tail, some negatives
        h = torch.nn.functional.gelu(torch.randn(chunk, D, generator=g) * 2.0).to(torch.float32)
        label = torch.randint(0, C, (chunk,), generator=g)
        stats_update(h, torch.zeros(chunk, dtype=torch.long), label, out)
        stats_update_reference(h, torch.zeros(chunk, dtype=torch.long), label, out_torch)
        hn, ln = h.double().numpy(), label.numpy()
        for c in range(C):
            for d in range(D):
                # math.fsum is correctly rounded: partial sums kept exactly, one rounding at the very end
                exact_parts[c][d].append(math.fsum(hn[ln == c, d]))
    exact = np.array([[math.fsum(exact_parts[c][d]) for d in range(D)] for c in range(C)])
    rel = np.abs(out[0].numpy() - exact) / np.abs(exact)
    assert rel.max() < 1e-9, f"relative error {rel.max():.3g} after {total} rows"
    assert_within_torch_error(out[0], torch.from_numpy(exact), out_torch[0], f"sums after {total} rows",
                              "(class, neuron)")
