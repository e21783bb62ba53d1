"""masked_ffn: the Triton kernels (fused and two-pass schedules) against the PyTorch reference.

Tolerance: the tolerance rule of ``kernel_checks.py`` (flash-attention's): against a float64 reference, the
kernel's error may be at most twice the largest error PyTorch makes on the same inputs in the same precision,
plus one ulp of the largest output:

    |y_kernel - ref64| <= 2 * max|y_torch_lowp - ref64| + eps(dtype) * max|ref64|

The Triton tests run under ``TRITON_INTERPRET=1`` on CPU (tiny shapes: the interpreter is slow) or on a GPU;
without either they skip with the reason. GPU-only tests (realistic shapes) are marked ``gpu``.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import (DEVICE as DEV, as_float64, assert_equal, assert_within_torch_error, column_major,
                           every_other, ffn_weights, requires_triton)
from skillkern.ops.activations import ACTIVATIONS, apply_act
from skillkern.ops.masked_ffn import masked_ffn, masked_ffn_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCHEDULES = ("fused", "two_pass")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _one_thread():
    # The interpreter's numpy work and the small references gain nothing from threads on a 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_ffn(rows, hidden, width, out, dtype, *, gated=False, bias=True, seed=0, device=DEV):
    """The shared maker's FFN (outputs O(1)) as a tuple: (x, w1, b1, w2, b2, w_gate)."""
    w = ffn_weights(rows, hidden, width, out, dtype=dtype, device=device, gated=gated, bias=bias, seed=seed)
    return w["x"], w["w1"], w["b1"], w["w2"], w["b2"], w["w_gate"]


def random_keep(width, kept, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randperm(width, generator=g)[:kept].to(device)


def check_y(y, x, w1, b1, w2, b2, keep, wg, act, row_set=None, what=""):
    """The tolerance rule on y against masked_ffn_reference in float64, PyTorch's error measured in x's dtype."""
    f64 = as_float64
    ref64 = masked_ffn_reference(f64(x), f64(w1), f64(b1), f64(w2), f64(b2), keep, act=act, w_gate=f64(wg),
                                 row_set=row_set)
    lowp = masked_ffn_reference(x, w1, b1, w2, b2, keep, act=act, w_gate=wg, row_set=row_set)
    assert_within_torch_error(y, ref64, lowp, what, names="(row, output)")


# ------------------------------------------------------------------------------------------------ kernel vs reference
# (rows, hidden, neurons, kept, out): a single row, odd widths, one neuron, one kept neuron, all kept, keep=None
SHAPES = [
    (1, 16, 1, 1, 7),
    (37, 45, 123, 17, 33),
    (1, 45, 123, 1, 5),
    (37, 16, 123, 123, 19),
    (37, 45, 123, None, 11),
]


@requires_triton
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_matches_reference(case, dtype, schedule):
    rows, hidden, width, kept, out = SHAPES[case]
    # activation, gating and biases vary with the case so every combination appears across the grid cheaply
    act = ACTIVATIONS[case % len(ACTIVATIONS)]
    gated = bool(case % 2)
    bias = (case + DTYPES.index(dtype)) % 3 != 0
    x, w1, b1, w2, b2, wg = make_ffn(rows, hidden, width, out, dtype, gated=gated, bias=bias, seed=case)
    keep = None if kept is None else random_keep(width, kept, seed=case)
    y = masked_ffn(x, w1, b1, w2, b2, keep, act=act, w_gate=wg, backend="triton", schedule=schedule)
    check_y(y, x, w1, b1, w2, b2, keep, wg, act,
                              what=f"{SHAPES[case]} {dtype} {act} gated={gated} bias={bias} {schedule}")


@requires_triton
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("act", ACTIVATIONS + ("gelu_new",))
def test_every_activation(act, gated):
    x, w1, b1, w2, b2, wg = make_ffn(21, 45, 70, 17, torch.float16, gated=gated, seed=3)
    keep = random_keep(70, 33, seed=3)
    for schedule in SCHEDULES:
        y = masked_ffn(x, w1, b1, w2, b2, keep, act=act, w_gate=wg, backend="triton", schedule=schedule)
        check_y(y, x, w1, b1, w2, b2, keep, wg, act, what=f"{act} gated={gated} {schedule}")


@requires_triton
def test_strided_weights_and_leading_dims():
    """W2 stored transposed (the fast layout: pass w2t.t()), x a non-contiguous view with batch dimensions."""
    x, w1, b1, w2, b2, wg = make_ffn(2 * 9, 40, 50, 23, torch.float32, gated=True, seed=4)
    w2_colmajor = column_major(w2)
    assert w2_colmajor.stride() == (1, 23)
    xb = every_other(x).reshape(2, 9, 40)  # strided view
    assert xb.stride() == (720, 80, 2)
    keep = random_keep(50, 20, seed=4)
    for schedule in SCHEDULES:
        y = masked_ffn(xb, w1, b1, w2_colmajor, b2, keep, act="silu", w_gate=wg, backend="triton", schedule=schedule)
        assert y.shape == (2, 9, 23)
        check_y(y.reshape(18, 23), xb.reshape(18, 40), w1, b1, w2, b2, keep, wg, "silu",
                                  what=f"strided {schedule}")


# ------------------------------------------------------------------------------------------------ index sets
def _sets(width, sizes, kmax, seed=0):
    """A (sets, kmax) table padded with -1; the pads of set 1 are scattered, not trailing."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.full((len(sizes), kmax), -1, dtype=torch.int64)
    for s, n in enumerate(sizes):
        keep[s, :n] = torch.randperm(width, generator=g)[:n]
    keep[1] = keep[1][torch.randperm(kmax, generator=g)]
    return keep.to(DEV)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_sets_equal_per_set_ffn(backend, dtype):
    """Rows of four index sets (one all padding, one used by no row) in one call == one FFN per set."""
    rows, hidden, width, out = 45, 32, 90, 21
    x, w1, b1, w2, b2, wg = make_ffn(rows, hidden, width, out, dtype, seed=5)
    keep = _sets(width, [30, 12, 0, 5], kmax=33, seed=5)
    g = torch.Generator().manual_seed(6)
    row_set = torch.randint(0, 3, (rows,), generator=g).to(DEV)  # set 3 unused, set 2 empty
    schedules = SCHEDULES if backend == "triton" else ("auto",)
    for schedule in schedules:
        y = masked_ffn(x, w1, b1, w2, b2, keep, act="gelu_tanh", row_set=row_set, backend=backend,
                       schedule=schedule)
        for s in range(keep.shape[0]):
            sel = (row_set == s).nonzero().squeeze(1)
            idx = keep[s][keep[s] >= 0]
            alone = masked_ffn_reference(x[sel], w1, b1, w2, b2, idx, act="gelu_tanh")
            if backend == "torch":
                assert_equal(y[sel], alone, f"set {s}", "(row, output)")
            else:
                check_y(y[sel], x[sel], w1, b1, w2, b2, idx, None, "gelu_tanh",
                                          what=f"set {s} {schedule}")
        assert_equal(y[row_set == 2], b2.expand(int((row_set == 2).sum()), out), f"empty set != b2 ({schedule})")


# ------------------------------------------------------------------------------------------------ special K
def _dense(x, w1, b1, w2, b2, wg, act):
    if wg is None:
        return F.linear(apply_act(F.linear(x, w1, b1), act), w2, b2)
    return F.linear(apply_act(F.linear(x, wg), act) * F.linear(x, w1, b1), w2, b2)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_all_kept_equals_dense(backend, gated):
    x, w1, b1, w2, b2, wg = make_ffn(19, 24, 40, 13, torch.float32, gated=gated, seed=7)
    dense = _dense(x, w1, b1, w2, b2, wg, "gelu")
    dense64 = _dense(*(as_float64(t) for t in (x, w1, b1, w2, b2, wg)), "gelu")
    for keep in (None, torch.arange(40, device=DEV), random_keep(40, 40, seed=7)):
        y = masked_ffn(x, w1, b1, w2, b2, keep, w_gate=wg, backend=backend)
        if backend == "torch" and (keep is None or torch.equal(keep, torch.arange(40, device=DEV))):
            assert_equal(y, dense, "all kept, torch")  # the same weights in the same order: bit for bit
        else:
            check_y(y, x, w1, b1, w2, b2, keep, wg, "gelu", what=f"all kept {backend}")
            assert_within_torch_error(y, dense64, dense, f"all kept {backend} vs the dense FFN", "(row, output)")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_keep_gives_b2(backend, dtype):
    x, w1, b1, w2, b2, _ = make_ffn(5, 16, 20, 9, dtype, seed=8)
    empty = torch.empty(0, dtype=torch.int64, device=DEV)
    y = masked_ffn(x, w1, b1, w2, b2, empty, backend=backend)
    assert y.dtype == dtype and torch.equal(y, b2.expand(5, 9))
    y = masked_ffn(x, w1, b1, w2, None, empty, backend=backend)
    assert torch.equal(y, torch.zeros(5, 9, dtype=dtype, device=DEV))
    y = masked_ffn(x[:0], w1, b1, w2, b2, empty, backend=backend)
    assert y.shape == (0, 9)


# ------------------------------------------------------------------------------------------------ errors
def _bad_cases():
    x, w1, b1, w2, b2, wg = make_ffn(4, 8, 10, 6, torch.float32, device="cpu")
    keep = torch.tensor([0, 3, 7])
    base = dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2, keep=keep)
    table = torch.tensor([[0, 1, -1], [2, -1, -1]])
    return [
        (dict(w1=torch.randn(10, 9)), r"w1 must have shape \(neurons, 8\).*x \(4, 8\).*got \(10, 9\)"),
        (dict(w2=torch.randn(6, 11)), r"w2 must have shape \(out, 10\).*w1 \(10, 8\).*got \(6, 11\)"),
        (dict(b1=torch.randn(9)), r"b1 must have shape \(10,\).*got \(9,\)"),
        (dict(b2=torch.randn(5)), r"b2 must have shape \(6,\).*got \(5,\)"),
        (dict(w_gate=torch.randn(10, 7)), r"w_gate must have the shape of w1 \(10, 8\), got \(10, 7\)"),
        (dict(keep=torch.tensor([0, 10])), r"keep\[1\] = 10 is out of range.*\[0, 10\)"),
        (dict(keep=torch.tensor([-1, 2])), r"keep\[0\] = -1 is out of range.*\[0, 10\)"),
        (dict(keep=torch.tensor([4, 2, 4])), r"lists neuron 4 twice"),
        (dict(keep=torch.tensor([0, 1], dtype=torch.int32)), r"keep must be int64, got torch.int32"),
        (dict(w2=w2.double()), r"w2 is torch.float64 but x is torch.float32"),
        (dict(x=x.double(), w1=w1.double(), b1=b1.double(), w2=w2.double(), b2=b2.double()),
         r"x must be float32, float16 or bfloat16, got torch.float64"),
        (dict(act="tanh"), r"unsupported activation 'tanh'"),
        (dict(backend="cuda"), r"unknown backend 'cuda'"),
        (dict(schedule="fast"), r"unknown schedule 'fast'"),
        (dict(keep=table), r"keep must be 1-D \(kept,\) without row_set.*\(2, 3\)"),
        (dict(row_set=torch.tensor([0, 1, 0, 1])), r"row_set needs keep as a \(sets, kept\) table.*shape \(3,\)"),
        (dict(keep=table, row_set=torch.tensor([0, 1, 2, 0])), r"row_set value 2 \(row 2\) is out of range \[0, 2\)"),
        (dict(keep=table, row_set=torch.tensor([0, 1])), r"row_set must have shape \(4,\) to match x \(4, 8\)"),
        (dict(keep=torch.tensor([[0, 1, 1], [2, -1, -1]]), row_set=torch.tensor([0, 1, 0, 1])),
         r"keep\[0\] lists neuron 1 twice"),
        (dict(keep=torch.tensor([[0, -2, 1], [2, -1, -1]]), row_set=torch.tensor([0, 1, 0, 1])),
         r"keep\[0, 1\] = -2 is out of range.*or -1 \(padding\)"),
    ], base


@pytest.mark.parametrize("index", range(len(_bad_cases()[0])))
def test_bad_inputs_name_the_problem(index):
    cases, base = _bad_cases()
    change, pattern = cases[index]
    args = dict(base, **change)
    kw = {k: args.pop(k) for k in ("act", "backend", "schedule", "row_set", "w_gate") if k in args}
    with pytest.raises(ValueError, match=pattern) as info:
        masked_ffn(**args, **kw)
    assert re.search(r"^masked_ffn: |unsupported activation", str(info.value))


def test_check_false_skips_value_checks_only():
    x, w1, b1, w2, b2, _ = make_ffn(4, 8, 10, 6, torch.float32, device="cpu")
    dup = torch.tensor([4, 2, 4])
    y = masked_ffn(x, w1, b1, w2, b2, dup, backend="torch", check=False)  # duplicates counted twice, as index_select
    assert_equal(y, masked_ffn_reference(x, w1, b1, w2, b2, dup), "unchecked torch backend vs the reference")
    with pytest.raises(ValueError, match="w2 must have shape"):
        masked_ffn(x, w1, b1, w2[:, :9], b2, dup, check=False)


# ------------------------------------------------------------------------------------------------ torch.library
def _op_samples(backend):
    x, w1, b1, w2, b2, wg = make_ffn(18, 16, 40, 17, torch.float32, gated=True, seed=9)
    keep = random_keep(40, 21, seed=9)
    table = _sets(40, [9, 20], kmax=20, seed=9)
    row_set = (torch.arange(18, device=DEV) % 2)
    return [
        (x, w1, b1, w2, b2, keep, None, None, "gelu", backend, "auto", True),
        (x, w1, None, w2, b2, table, wg, row_set, "silu", backend, "two_pass", True),
        (x, w1, b1, w2, None, None, None, None, "relu", backend, "fused", False),
    ]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_opcheck(backend):
    for args in _op_samples(backend):
        torch.library.opcheck(torch.ops.skillkern.masked_ffn.default, args)


def test_torch_compile_over_a_module():
    class Pruned(torch.nn.Module):
        def __init__(self, w1, b1, w2, b2, keep):
            super().__init__()
            self.w1, self.b1 = torch.nn.Parameter(w1, requires_grad=False), torch.nn.Parameter(b1, requires_grad=False)
            self.w2, self.b2 = torch.nn.Parameter(w2, requires_grad=False), torch.nn.Parameter(b2, requires_grad=False)
            self.register_buffer("keep", keep)

        def forward(self, x):
            return x + masked_ffn(torch.tanh(x), self.w1, self.b1, self.w2, self.b2, self.keep, act="gelu_new")

    x, w1, b1, w2, b2, _ = make_ffn(2 * 7, 16, 30, 16, torch.float32, seed=10, device="cpu")
    mod = Pruned(w1, b1, w2, b2, random_keep(30, 11, seed=10, device="cpu"))
    eager = mod(x.reshape(2, 7, 16))
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_equal(compiled(x.reshape(2, 7, 16)), eager, "compiled vs eager")
        other = torch.randn(3, 5, 16)  # new shapes: no recompilation error, same answer as eager
        assert_equal(compiled(other), mod(other), "compiled vs eager, new shapes")


# ------------------------------------------------------------------------------------------------ GPU compilation
# ------------------------------------------------------------------------------- GPU arithmetic under the interpreter
@requires_triton
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_bf16_rounds_to_nearest_like_a_gpu(schedule):
    """The interpreter casts fp32 -> bf16 by truncation where a GPU rounds to nearest; the kernels round first
    (``to_out_dtype``), so the CPU tests see the GPU's numbers. One-hot rows and one kept neuron make every
    product exact, so the kernel must equal PyTorch's bf16 path bit for bit (its casts round to nearest); with
    truncation about half of the intermediate values (and outputs) come out one bf16 step low."""
    g = torch.Generator().manual_seed(3)
    hidden, width, out = 32, 40, 48
    x = torch.eye(hidden)[torch.randint(0, hidden, (64,), generator=g)].to(torch.bfloat16).to(DEV)
    w1 = (torch.randn(width, hidden, generator=g) * 3).to(torch.bfloat16).to(DEV)
    b1 = (torch.randn(width, generator=g) * 3).to(torch.bfloat16).to(DEV)
    w2 = torch.randn(out, width, generator=g).to(torch.bfloat16).to(DEV)
    b2 = torch.randn(out, generator=g).to(torch.bfloat16).to(DEV)
    for k in range(4):
        keep = torch.tensor([7 * k + 1], device=DEV)
        want = masked_ffn_reference(x, w1, b1, w2, b2, keep, act="relu")
        got = masked_ffn(x, w1, b1, w2, b2, keep, act="relu", backend="triton", schedule=schedule)
        assert_equal(got, want, f"neuron {int(keep)}: bf16 outputs vs PyTorch's round-to-nearest", "(row, output)")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 64, 4096])
@pytest.mark.parametrize("frac", [0.02, 0.10, 0.50])
def test_gpu_bert_base(rows, frac, dtype):
    hidden, width = 768, 3072
    x, w1, b1, w2, b2, _ = make_ffn(rows, hidden, width, hidden, dtype, seed=11, device="cuda")
    keep = random_keep(width, int(frac * width), seed=11, device="cuda").sort().values
    w2_fast = column_major(w2)
    for schedule in ("auto", "fused", "two_pass"):
        for w in (w2, w2_fast):
            y = masked_ffn(x, w1, b1, w, b2, keep, backend="triton", schedule=schedule)
            check_y(y, x, w1, b1, w2, b2, keep, None, "gelu",
                                      what=f"rows={rows} keep={frac} {schedule} stride={w.stride()}")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("rows", [1, 64, 4096])
def test_gpu_llama_gated_with_sets(rows):
    hidden, width = 4096, 11008
    x, w1, _, w2, _, wg = make_ffn(rows, hidden, width, hidden, torch.bfloat16, gated=True, bias=False, seed=12,
                                   device="cuda")
    keep = _sets(width, [220, 1100, 5504], kmax=5504, seed=12)
    row_set = torch.randint(0, 3, (rows,), device="cuda")
    y = masked_ffn(x, w1, None, column_major(w2), None, keep, act="silu", w_gate=wg, row_set=row_set,
                   backend="triton")
    check_y(y, x, w1, None, w2, None, keep, wg, "silu", row_set=row_set, what=f"llama rows={rows}")
