"""torch.library integration of the compiled op: opcheck, the fake (meta) implementation, torch.compile.

``skillkern::stats_update`` mutates ``out`` and returns nothing; its fake (registered by ``skillkern._ext`` when
the extension loads) only checks metadata. With it, torch.compile traces the public function into one graph
(``fullgraph=True``) when it is called with ``check=False`` (the checks read index ranges with ``int(tensor)``,
a graph break).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kernel_checks import assert_equal, assert_within_torch_error, ext, random_state, stats_inputs  # noqa: F401
from skillkern import _ext
from skillkern.ops.stats_update import stats_update


def _inputs(mode, dtype=torch.float32, rows=13, width=37, slots=3, classes=2, seed=0):
    """(h, slot, label, out, threshold) with random contents; about a quarter of the rows untracked."""
    h, slot, label, threshold = stats_inputs(rows, width, slots, classes, dtype, seed=seed, device="cpu")
    out = random_state(slots, classes, width, counts=mode == "counts", seed=seed + 3, device="cpu")
    return h, slot, label, out, threshold if mode == "counts" else None


@pytest.mark.parametrize("mode", ("sums", "counts"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_opcheck(ext, mode, dtype):
    # Schema (the mutation of out is declared), fake vs real kernel, autograd registration, and AOT dispatch
    # with dynamic shapes.
    torch.library.opcheck(torch.ops.skillkern.stats_update.default, _inputs(mode, dtype))


def test_opcheck_untracked_rows_only(ext):
    h, slot, label, out, threshold = _inputs("counts")
    untracked = torch.full_like(slot, -1)
    torch.library.opcheck(torch.ops.skillkern.stats_update.default, (h, untracked, label, out, threshold))


def test_fake_checks_metadata(ext):
    h, slot, label, out, threshold = _inputs("counts")
    with FakeTensorMode() as mode:
        fh, fslot, flabel, fout, fthr = (mode.from_tensor(t) for t in (h, slot, label, out, threshold))
        torch.ops.skillkern.stats_update(fh, fslot, flabel, fout, fthr)  # valid: nothing happens
        with pytest.raises(RuntimeError, match="out must be torch.int64"):
            torch.ops.skillkern.stats_update(fh, fslot, flabel, fout.double(), fthr)
        with pytest.raises(RuntimeError, match=r"threshold must have shape \(3, 37\)"):
            torch.ops.skillkern.stats_update(fh, fslot, flabel, fout, fthr[:1])
        with pytest.raises(RuntimeError, match="label must have shape"):
            torch.ops.skillkern.stats_update(fh, fslot, flabel[:-1], fout, fthr)


def _scoring_step(h, slot, label, sums, counts, threshold):
    # Both passes, plus some ordinary tensor work around them, as a scoring loop would have.
    stats_update(torch.relu(h), slot, label, sums, None, backend="ext", check=False)
    stats_update(h * 2, slot, label, counts, threshold, backend="ext", check=False)
    return sums.sum(), counts.sum()


@pytest.mark.parametrize("backend", ("aot_eager", "inductor"))
def test_compile_matches_eager(ext, backend):
    # inductor: its code generation for this graph (one opaque op, in-place copies) takes a few seconds on CPU.
    torch._dynamo.reset()
    h, slot, label, sums, _ = _inputs("sums", seed=1)
    _, _, _, counts, threshold = _inputs("counts", seed=1)
    eager = (sums.clone(), counts.clone())
    compiled = (sums.clone(), counts.clone())
    expected = _scoring_step(h, slot, label, *eager, threshold)
    step = torch.compile(_scoring_step, backend=backend, fullgraph=True)
    got = step(h, slot, label, *compiled, threshold)
    # The op is opaque to the compiler, so even the float64 sums must be identical.
    assert_equal(compiled[0], eager[0], f"{backend}: sums vs eager", "(slot, class, neuron)")
    assert_equal(compiled[1], eager[1], f"{backend}: counts vs eager", "(slot, class, neuron)")
    assert_equal(got[1], expected[1], f"{backend}: returned count")
    # The returned float64 total is ordinary tensor work: aot_eager runs eager's own kernel (identical), inductor
    # generates its own reduction, which adds in another order: the tolerance rule against the correctly
    # rounded total (math.fsum), eager's float64 sum being PyTorch's own error.
    if backend == "aot_eager":
        assert_equal(got[0], expected[0], f"{backend}: returned total")
    else:
        exact = torch.tensor(math.fsum(eager[0].flatten().tolist()), dtype=torch.float64)
        assert_within_torch_error(got[0], exact, expected[0], f"{backend}: returned total")
    # A second call (new data, same shapes) reuses the compiled graph and keeps accumulating in place.
    got = step(h.flip(0), slot, label, *compiled, threshold)
    expected = _scoring_step(h.flip(0), slot, label, *eager, threshold)
    assert_equal(compiled[0], eager[0], f"{backend}: sums vs eager, second call", "(slot, class, neuron)")
    assert_equal(compiled[1], eager[1], f"{backend}: counts vs eager, second call", "(slot, class, neuron)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_matches_eager_cuda(ext):
    if not _ext.has_op("stats_update", torch.device("cuda")):
        pytest.skip("skillkern._C was built without its CUDA kernels")
    torch._dynamo.reset()
    h, slot, label, sums = (t.cuda() for t in _inputs("sums", seed=2)[:4])
    _, _, _, counts, threshold = (t.cuda() for t in _inputs("counts", seed=2))
    eager = (sums.clone(), counts.clone())
    compiled = (sums.clone(), counts.clone())
    _scoring_step(h, slot, label, *eager, threshold)
    torch.compile(_scoring_step, backend="aot_eager", fullgraph=True)(h, slot, label, *compiled, threshold)
    assert_equal(compiled[0], eager[0], "cuda aot_eager: sums vs eager", "(slot, class, neuron)")
    assert_equal(compiled[1], eager[1], "cuda aot_eager: counts vs eager", "(slot, class, neuron)")
