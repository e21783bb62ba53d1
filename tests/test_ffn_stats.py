"""ffn_stats: the fused Triton kernel against the PyTorch reference; the registered op; argument checks.

Tolerances (the shared checks of ``kernel_checks.py``): the activations ``h`` obey the tolerance rule
(flash-attention's, STYLE.md: off a float64 reference by at most twice what PyTorch itself is off in the same
precision, plus one ulp at the largest magnitude). The statistics are checked two ways:

* against the reference fed with the SAME h the kernel returned: counts exactly, sums to float64 rounding
  (atomics add rows in no fixed order); this isolates the epilogue from GEMM rounding;
* against the end-to-end reference (PyTorch's GEMM, its own h): counts may differ only where an activation
  lies within that float rounding of its threshold, and every differing cell must have such an element.

Triton runs on CPU only under ``TRITON_INTERPRET=1`` (set before Python starts); the interpreter is slow, so
shapes here are tiny and awkward. ``@pytest.mark.gpu`` tests repeat the comparisons at BERT-base shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kernel_checks import (CUDA, DEVICE, TRITON_OK, as_float64, assert_counts_within_rounding, assert_equal,
                           assert_sums_close, assert_within_torch_error, column_major, every_other, ffn_weights,
                           random_state, requires_triton, slots_and_labels, thresholds_with_ties)
from skillkern import _ext
from skillkern.ops.activations import ACTIVATIONS, HAVE_TRITON
from skillkern.ops.ffn_stats import ffn_stats, ffn_stats_reference
from skillkern.ops.dispatch import triton_interpreted
from skillkern.ops.stats_moments import stats_moments_reference
from skillkern.ops.stats_update import stats_update_reference

torch.set_num_threads(1)  # the interpreter's numpy calls are tiny; threads only add overhead


# ------------------------------------------------------------------------------------------------ helpers
def make_problem(rows, hidden, width, dtype, *, gated, bias, slots=2, classes=3, seed=0, device=DEVICE):
    """The shared makers: x and weights with pre-activations ~N(0, 1), slots with about a third of the rows
    untracked, labels. Returns (dict(x, w1, b1, w_gate), slot, label)."""
    weights = ffn_weights(rows, hidden, width, dtype=dtype, device=device, gated=gated, bias=bias, seed=seed)
    slot, label = slots_and_labels(rows, slots, classes, untracked=0.35, seed=seed + 1, device=device)
    return weights, slot, label


def check_h(h, weights, act, what):
    """The tolerance rule on h against the float64 reference; returns (reference, PyTorch's h, allowed error)."""
    x = weights["x"]
    assert h.shape == (x.shape[0], weights["w1"].shape[0]), f"{what}: {h.dtype} {h.shape}"
    ref = ffn_stats_reference(*(as_float64(weights[k]) for k in ("x", "w1", "b1")), act=act,
                              w_gate=as_float64(weights["w_gate"]))
    h_pt = ffn_stats_reference(weights["x"], weights["w1"], weights["b1"], act=act, w_gate=weights["w_gate"])
    allowed = assert_within_torch_error(h, ref, h_pt, what, names="(row, neuron)")
    return ref, h_pt, allowed


def run_case(rows, hidden, width, dtype, act, gated, bias, seed=0, slots=2, classes=3, all_untracked=False,
             device=DEVICE):
    """The whole comparison for one configuration: h, sums and counts (fused kernel vs reference)."""
    weights, slot, label = make_problem(rows, hidden, width, dtype, gated=gated, bias=bias, slots=slots,
                                        classes=classes, seed=seed, device=device)
    if all_untracked:
        slot[:] = -1
    what = f"{dtype} R={rows} H={hidden} D={width} act={act} gated={gated} bias={bias}"
    start_sums = random_state(slots, classes, width, counts=False, seed=seed + 2, device=device)
    start_counts = random_state(slots, classes, width, counts=True, seed=seed + 3, device=device)

    # sums
    out = start_sums.clone()
    h = ffn_stats(**weights, act=act, slot=slot, label=label, out=out, mode="sums", backend="triton")
    ref, h_pt, allowed = check_h(h, weights, act, f"h, {what}")
    same_h = stats_update_reference(h, slot, label, start_sums.clone())
    abssum = stats_update_reference(h.abs(), slot, label, torch.zeros_like(start_sums)) + start_sums.abs()
    assert_sums_close(out, same_h, abssum, rows + 1, f"sums vs reference on the kernel's h, {what}")
    if all_untracked:
        assert_equal(out, start_sums, f"{what}: sums changed although every slot is -1")

    # counts
    center = ref.mean(0) if rows else None
    thr = thresholds_with_ties(h_pt, slot, slots, center=center, spread=0.1, row_step=1, neuron_step=3, seed=seed)
    out = start_counts.clone()
    h2 = ffn_stats(**weights, act=act, slot=slot, label=label, out=out, threshold=thr, mode="counts",
                   backend="triton")
    assert_equal(h2, h, f"{what}: h differs between mode='sums' and mode='counts'", "(row, neuron)")
    exact = stats_update_reference(h, slot, label, start_counts.clone(), thr)
    assert_equal(out, exact, f"counts vs reference on the kernel's h, {what}", "(slot, class, neuron)")
    expected = start_counts.clone()
    stats_update_reference(h_pt, slot, label, expected, thr)  # = ffn_stats_reference(..., mode="counts")
    assert_counts_within_rounding(out, expected, ref, thr, slot, label, allowed,
                                  f"counts vs end-to-end reference, {what}")

    # mode none: the same h, nothing accumulated
    h3 = ffn_stats(**weights, act=act, mode="none", backend="triton")
    assert_equal(h3, h, f"{what}: h differs between mode='none' and mode='sums'", "(row, neuron)")
    return h


# --------------------------------------------------------------------------------------- kernel vs reference
# Every activation, gated and plain, in fp32 and bf16, at the awkward shape 37 x 45 -> 123 (ragged in every
# tile dimension); bias on for half of them (alternating so both settings meet every activation).
CASES = [(act, gated, dtype, (i + int(gated)) % 2 == 0)
         for i, act in enumerate(ACTIVATIONS) for gated in (False, True) for dtype in (torch.float32, torch.bfloat16)]
SEEDS = {case: i for i, case in enumerate(CASES)}


@requires_triton
@pytest.mark.parametrize("act,gated,dtype,bias", CASES,
                         ids=[f"{a}-{'gated' if g else 'plain'}-{str(d)[6:]}-{'bias' if b else 'nobias'}"
                              for a, g, d, b in CASES])
def test_kernel_matches_reference(act, gated, dtype, bias):
    run_case(37, 45, 123, dtype, act, gated, bias, seed=SEEDS[(act, gated, dtype, bias)])


@requires_triton
@pytest.mark.parametrize("rows,hidden,width", [(1, 16, 123), (37, 16, 1), (1, 45, 1), (37, 45, 123)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_awkward_shapes(rows, hidden, width, dtype):
    run_case(rows, hidden, width, dtype, "gelu_tanh", gated=width == 1, bias=rows == 1, seed=rows + width)


@requires_triton
@pytest.mark.parametrize("gated", (False, True))
def test_every_slot_untracked(gated):
    run_case(37, 45, 123, torch.float32, "silu", gated, bias=True, all_untracked=True)


@requires_triton
def test_strided_inputs_and_aliases():
    """Transposed/strided x and weights (the kernel takes strides) and a transformers activation alias."""
    weights, slot, label = make_problem(37, 45, 123, torch.float32, gated=True, bias=True)
    strided = dict(x=column_major(weights["x"]), w1=column_major(weights["w1"]), w_gate=every_other(weights["w_gate"]),
                   b1=weights["b1"])
    out = torch.zeros(2, 3, 123, dtype=torch.float64, device=DEVICE)
    h = ffn_stats(**strided, act="swish", slot=slot, label=label, out=out, mode="sums", backend="triton")
    check_h(h, weights, "silu", "strided inputs")
    exp = stats_update_reference(h, slot, label, torch.zeros_like(out))
    assert_sums_close(out, exp, stats_update_reference(h.abs(), slot, label, torch.zeros_like(out)), 37,
                      "strided inputs")


@requires_triton
def test_zero_rows():
    weights, slot, label = make_problem(0, 45, 123, torch.float32, gated=False, bias=True)
    out = torch.ones(2, 3, 123, dtype=torch.float64, device=DEVICE)
    h = ffn_stats(**weights, slot=slot, label=label, out=out, mode="sums", backend="triton")
    assert h.shape == (0, 123) and bool((out == 1).all())


def check_moments(rows, hidden, width, dtype, act, gated, bias, seed=0, slots=2, device=DEVICE):
    """mode='moments' of the fused kernel: h as in mode 'none', the moments of the tracked rows of that h within
    float64 rounding of the reference (atomics), added to a random starting state."""
    weights, slot, _ = make_problem(rows, hidden, width, dtype, gated=gated, bias=bias, slots=slots, seed=seed,
                                    device=device)
    what = f"moments, {dtype} R={rows} H={hidden} D={width} act={act} gated={gated} bias={bias}"
    g = torch.Generator().manual_seed(seed)
    start = torch.rand(slots, 3, width, generator=g, dtype=torch.float64).to(device)
    out = start.clone()
    h = ffn_stats(**weights, act=act, slot=slot, out=out, mode="moments", backend="triton")
    assert_equal(h, ffn_stats(**weights, act=act, mode="none", backend="triton"), f"{what}: h", "(row, neuron)")
    check_h(h, weights, act, f"h, {what}")
    exp = stats_moments_reference(h, slot, start.clone())
    mag = stats_moments_reference(h.abs(), slot, start.clone())
    mag[:, 0] = mag[:, 2]
    assert_sums_close(out, exp, mag, rows + 1, what, "(slot, moment, neuron)")


@requires_triton
@pytest.mark.parametrize("rows,hidden,width,dtype,act,gated,bias", [
    (37, 45, 123, torch.float32, "gelu", False, True), (37, 45, 123, torch.bfloat16, "silu", True, False),
    (1, 16, 123, torch.float16, "relu", False, False), (37, 16, 1, torch.float32, "gelu_tanh", True, True)])
def test_moments_mode(rows, hidden, width, dtype, act, gated, bias):
    check_moments(rows, hidden, width, dtype, act, gated, bias, seed=rows + width)


def test_torch_backend_is_the_reference():
    weights, slot, label = make_problem(9, 20, 31, torch.float32, gated=True, bias=True, device="cpu")
    for backend in ("torch", "auto") + (("ext",) if _ext.has_op("stats_update", "cpu") else ()):
        out, exp = torch.zeros(2, 3, 31, dtype=torch.float64), torch.zeros(2, 3, 31, dtype=torch.float64)
        h = ffn_stats(**weights, act="silu", slot=slot, label=label, out=out, mode="sums", backend=backend)
        h_ref = ffn_stats_reference(**weights, act="silu", slot=slot, label=label, out=exp, mode="sums")
        assert_equal(h, h_ref, f"h of backend={backend} vs the reference", "(row, neuron)")
        assert_equal(out, exp, f"sums of backend={backend} vs the reference", "(slot, class, neuron)")
        out, exp = torch.zeros(2, 3, 31, dtype=torch.float64), torch.zeros(2, 3, 31, dtype=torch.float64)
        ffn_stats(**weights, act="silu", slot=slot, out=out, mode="moments", backend=backend)
        ffn_stats_reference(**weights, act="silu", slot=slot, out=exp, mode="moments")
        assert int((exp != 0).sum()) > 0 and torch.equal(out, exp), f"moments of backend={backend}"


# ----------------------------------------------------------------------------------------- registered op
BACKENDS_HERE = ("torch",) + (("triton",) if TRITON_OK else ())


def _op_args(mode, backend, gated, device=DEVICE):
    weights, slot, label = make_problem(5, 16, 7, torch.float32, gated=gated, bias=not gated, device=device)
    out = thr = None
    if mode == "sums":
        out = torch.zeros(2, 3, 7, dtype=torch.float64, device=device)
    elif mode == "counts":
        out = torch.zeros(2, 3, 7, dtype=torch.int64, device=device)
        thr = torch.randn(2, 7, dtype=torch.float64).to(device) * 0.3
    if mode == "none":
        slot = label = None
    return (weights["x"], weights["w1"], weights["b1"], weights["w_gate"], slot, label, out, thr, "gelu", mode,
            backend)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("mode,gated", [("none", False), ("sums", True), ("counts", False)])
def test_opcheck(mode, gated, backend):
    # all of opcheck's tests, test_aot_dispatch_dynamic included, run here (the interpreter runs real tensors)
    device = DEVICE if backend == "triton" else "cpu"
    torch.library.opcheck(torch.ops.skillkern.ffn_stats.default, _op_args(mode, backend, gated, device))


class _ScoredFFN(torch.nn.Module):
    """A small gated MLP up-projection that scores its rows while running."""

    def __init__(self, hidden, width, backend):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.up = torch.nn.Parameter(torch.randn(width, hidden, generator=g) / hidden ** 0.5, requires_grad=False)
        self.gate = torch.nn.Parameter(torch.randn(width, hidden, generator=g) / hidden ** 0.5, requires_grad=False)
        self.backend = backend

    def forward(self, x, slot, label, out, threshold):
        h = ffn_stats(x, self.up, act="silu", w_gate=self.gate, slot=slot, label=label, out=out,
                      threshold=threshold, mode="counts", backend=self.backend)
        return (h * 2).sum(-1)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("compile_backend", ("eager", "aot_eager"))
def test_torch_compile(backend, compile_backend):
    device = DEVICE if backend == "triton" else "cpu"
    torch._dynamo.reset()
    model = _ScoredFFN(16, 7, backend).to(device)
    x = torch.randn(6, 16).to(device)
    slot = torch.tensor([0, -1, 1, 0, -1, 1], device=device)
    label = torch.tensor([1, 0, 2, 0, 1, 1], device=device)
    thr = torch.zeros(2, 7, dtype=torch.float64, device=device)
    out_eager = torch.zeros(2, 3, 7, dtype=torch.int64, device=device)
    out_comp = out_eager.clone()
    compiled = torch.compile(model, backend=compile_backend, fullgraph=True)
    y_comp = compiled(x, slot, label, out_comp, thr)
    y_eager = model(x, slot, label, out_eager, thr)
    assert torch.equal(y_comp, y_eager), "compiled output differs"
    assert torch.equal(out_comp, out_eager) and int(out_eager.sum()) > 0, "compiled counts differ (or none counted)"


@pytest.mark.skipif(not _ext.available(), reason="compiled extension unavailable: the import-order check needs it")
def test_op_and_extension_share_the_namespace():
    # skillkern._C defines the namespace with TORCH_LIBRARY; the Python op is a FRAGMENT of it. Both import
    # orders must work: two fresh interpreters, run side by side.
    ext, op = "import skillkern._C", "import skillkern.ops.ffn_stats"
    show = "import torch; print(torch.ops.skillkern.stats_update.default, torch.ops.skillkern.ffn_stats.default)"
    env = {k: v for k, v in os.environ.items() if k != "SKILLKERN_NO_EXT"}
    procs = {order: subprocess.Popen([sys.executable, "-c", "; ".join(first + [show])], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for order, first in (("extension first", [ext, op]), ("op first", [op, ext]))}
    for order, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{order}: {stderr[-2000:]}"
        assert "skillkern.ffn_stats" in stdout, f"{order}: {stdout}"


# ---------------------------------------------------------------------------------------------- bad inputs
def _valid():
    weights, slot, label = make_problem(6, 16, 5, torch.float32, gated=False, bias=True, device="cpu")
    slot[0] = 1
    return dict(**weights, slot=slot, label=label, out=torch.zeros(2, 3, 5, dtype=torch.int64),
                threshold=torch.zeros(2, 5, dtype=torch.float64), mode="counts")


BAD = {
    "x 1-D": (lambda a: a.update(x=a["x"][0]), r"x must be 2-D"),
    "x float64": (lambda a: a.update(x=a["x"].double()), r"x must be float32, float16 or bfloat16, got torch.float64"),
    "w1 hidden": (lambda a: a.update(w1=a["w1"][:, :8]), r"w1 must have shape \(neurons, 16\)"),
    "w1 dtype": (lambda a: a.update(w1=a["w1"].half()), r"w1 is torch.float16 but x is torch.float32"),
    "w_gate shape": (lambda a: a.update(w_gate=a["w1"][:4]), r"w_gate must have the shape of w1 \(5, 16\)"),
    "b1 shape": (lambda a: a.update(b1=a["b1"][:4]), r"b1 must have shape \(5,\)"),
    "unknown activation": (lambda a: a.update(act="mish"), r"unsupported activation 'mish'"),
    "unknown mode": (lambda a: a.update(mode="mean"), r"unknown mode 'mean'"),
    "unknown backend": (lambda a: a.update(backend="cuda"), r"unknown backend 'cuda'"),
    "counts without threshold": (lambda a: a.update(threshold=None), r"mode='counts' needs threshold"),
    "sums with threshold": (lambda a: a.update(mode="sums", out=a["out"].double()), r"mode='sums' takes no threshold"),
    "none with out": (lambda a: a.update(mode="none", threshold=None), r"mode='none' computes no statistics but out"),
    "counts without slot": (lambda a: a.update(slot=None), r"mode='counts' needs slot"),
    "counts without out": (lambda a: a.update(out=None), r"mode='counts' needs out"),
    "slot rows": (lambda a: a.update(slot=a["slot"][:-1]), r"slot must have shape \(6,\) to match x \(6, 16\)"),
    "label int32": (lambda a: a.update(label=a["label"].int()), r"label must be int64"),
    "label above range": (lambda a: a["label"].__setitem__(0, 3), r"label 3 out of range \[0, 3\)"),
    "slot above range": (lambda a: a["slot"].__setitem__(0, 2), r"slot index 2 out of range for 2 slots"),
    "out width": (lambda a: a.update(out=torch.zeros(2, 3, 4, dtype=torch.int64)), r"out must have shape"),
    "counts in float64": (lambda a: a.update(out=a["out"].double()), r"counts are accumulated in int64"),
    "threshold float32": (lambda a: a.update(threshold=a["threshold"].float()), r"threshold must be float64"),
    "threshold shape": (lambda a: a.update(threshold=a["threshold"][:1]), r"threshold must have shape \(2, 5\)"),
    "w1 on meta": (lambda a: a.update(w1=a["w1"].to("meta")), r"w1 is on meta but x is on cpu"),
    "moments with threshold": (lambda a: a.update(mode="moments", out=torch.zeros(2, 3, 5, dtype=torch.float64)),
                               r"mode='moments' takes no threshold"),
    "moments without out": (lambda a: a.update(mode="moments", out=None, threshold=None),
                            r"mode='moments' needs out"),
    "moments out shape": (lambda a: a.update(mode="moments", out=torch.zeros(2, 2, 5, dtype=torch.float64),
                                             threshold=None), r"out must have shape \(slots, 3, 5\)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_value_error(case):
    args = _valid()
    mutate, message = BAD[case]
    mutate(args)
    with pytest.raises(ValueError, match=message):
        ffn_stats(**args)


def test_triton_backend_on_cpu_without_interpreter():
    if not HAVE_TRITON or triton_interpreted():
        pytest.skip("needs triton compiled for a GPU (TRITON_INTERPRET unset)")
    args = _valid()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ffn_stats(**args, backend="triton")


# -------------------------------------------------------------------------------------------- GPU shapes
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or not HAVE_TRITON, reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("gated,act,bias", [(False, "gelu", True), (True, "silu", False)])
def test_gpu_bert_base_shapes(dtype, gated, act, bias):
    # 32 sequences x 128 tokens of BERT-base (H=768, D=3072); about two thirds of the rows tracked here (more
    # than cls pooling's one in 128) so that the statistics see plenty of rows.
    run_case(4096, 768, 3072, dtype, act, gated, bias, seed=5, slots=4, classes=3, device="cuda")
    check_moments(4096, 768, 3072, dtype, act, gated, bias, seed=6, slots=4, device="cuda")
