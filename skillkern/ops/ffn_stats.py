"""Fused FFN up-projection + activation + streaming statistics (DESIGN.md, op 2).

    plain:  h = act(x @ w1.T + b1)
    gated:  h = act(x @ w_gate.T) * (x @ w1.T + b1)        (Llama/Mistral/Qwen2 MLPs: w1 = W_up)

and, for the rows whose ``slot >= 0``, the statistics of :func:`~skillkern.ops.stats_update.stats_update`
(per-class float64 sums, or int64 counts of ``h > threshold``) or of
:func:`~skillkern.ops.stats_moments.stats_moments` (per-slot float64 sum, sum of squares and sum of |h|) added
into ``out`` in the same kernel.

Memory traffic of the unfused version (GEMM, then a statistics pass): the GEMM writes R*D activations, the
statistics pass reads the tracked rows back. The fused kernel computes the statistics in the GEMM epilogue
while the tile is in registers: no extra pass over memory, and tiles without a tracked row cost one
reduction. FLOPs: 2*R*H*D (twice that when gated).

The value compared with the threshold (and summed) is the fp32 accumulator rounded to ``x.dtype``, i.e.
exactly the ``h`` that is returned, so the statistics equal :func:`stats_update` applied to the returned
``h`` (counts exactly; sums and moments up to float64 rounding, since atomics add rows in no fixed order).

Registered as ``torch.ops.skillkern.ffn_stats`` (a ``torch.library.custom_op``, a FRAGMENT of the namespace
the compiled extension defines with ``TORCH_LIBRARY``; both import orders work) with a fake implementation,
so ``torch.compile`` treats it as one opaque node that mutates ``out``.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from .activations import (HAVE_TRITON, act_id, apply_act, canonical, check_up_projection, tl, to_out_dtype,
                          triton, triton_act)
from .stats_moments import check_moments_state, stats_moments_ext, stats_moments_reference
from .stats_update import (MODE_COUNTS, MODE_MOMENTS, MODE_NONE, MODE_SUMS, _stats_epilogue, check_stats_state,
                           run_into, stats_update_ext, stats_update_reference, thresholds_for_float32)

logger = logging.getLogger(__name__)

MODES = {"none": MODE_NONE, "sums": MODE_SUMS, "counts": MODE_COUNTS, "moments": MODE_MOMENTS}

if HAVE_TRITON:

    # Row and class counts change from call to call: not specialised, so one compiled variant serves them all.
    @triton.jit(do_not_specialize=["rows", "classes"])
    def _ffn_stats_kernel(x_ptr, w_ptr, g_ptr, b_ptr, h_ptr, slot_ptr, label_ptr, out_ptr, thr_ptr,
                          rows, hidden, width, classes,
                          stride_xr, stride_xh, stride_wd, stride_wh, stride_gd, stride_gh,
                          ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr,
                          UPCAST: tl.constexpr, IEEE: tl.constexpr, RNE_BF16: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
        """One BLOCK_M x BLOCK_N tile of h = act(x @ w.T + b) [* or gated], then the statistics epilogue.

        One function, about 60 lines, on purpose: the tile must stay in registers from the K loop through the
        epilogue, and the K loop's gated and upcast branches are constexpr switches that compile away; a Triton
        helper per branch would only move the same lines apart."""
        # Grouped launch order: GROUP_M row tiles walk the neuron tiles together, so a weight tile is
        # reused from L2 by GROUP_M programs instead of being fetched once per row tile.
        pid = tl.program_id(0).to(tl.int64)
        tiles_m = tl.cdiv(rows, BLOCK_M)
        tiles_n = tl.cdiv(width, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < rows
        mask_n = offs_n < width
        x_ptrs = x_ptr + offs_m[:, None] * stride_xr + offs_k[None, :] * stride_xh
        w_ptrs = w_ptr + offs_k[:, None] * stride_wh + offs_n[None, :] * stride_wd  # [BLOCK_K, BLOCK_N] of w.T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GATED:
            g_ptrs = g_ptr + offs_k[:, None] * stride_gh + offs_n[None, :] * stride_gd
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            mask_k = (k0 + offs_k) < hidden
            a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                # The interpreter's dot multiplies bfloat16 as raw integers; widening first is the same
                # math (products of 16-bit floats are exact in fp32, accumulation is fp32 either way).
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:  # fp32 inputs: true fp32 products like PyTorch's default matmul, not TF32
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            if GATED:
                c = tl.load(g_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                if UPCAST:
                    c = c.to(tl.float32)
                if IEEE:
                    acc_g = tl.dot(a, c, acc_g, input_precision="ieee")
                else:
                    acc_g = tl.dot(a, c, acc_g)
                g_ptrs += BLOCK_K * stride_gh
            x_ptrs += BLOCK_K * stride_xh
            w_ptrs += BLOCK_K * stride_wh

        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            h = triton_act(acc_g, ACT) * acc
        else:
            h = triton_act(acc, ACT)
        # Round once to the output dtype; the statistics below use this rounded value (widened back to
        # fp32, exactly), so what is compared and summed is bit for bit the h this kernel returns.
        h = to_out_dtype(h, h_ptr.dtype.element_ty, RNE_BF16)
        keep = mask_m[:, None] & mask_n[None, :]
        tl.store(h_ptr + offs_m[:, None] * width + offs_n[None, :], h, mask=keep)
        if MODE != 0:
            slot = tl.load(slot_ptr + offs_m, mask=mask_m, other=-1)
            label = tl.load(label_ptr + offs_m, mask=mask_m, other=0)
            _stats_epilogue(h.to(tl.float32), slot, label, offs_n, mask_m, mask_n, out_ptr, thr_ptr, classes,
                            width, MODE)

else:  # pragma: no cover - exercised only where triton is absent
    _ffn_stats_kernel = None


# ------------------------------------------------------------------------------------------------ host
def check_ffn_args(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w_gate: Optional[torch.Tensor],
                   slot: Optional[torch.Tensor], label: Optional[torch.Tensor], out: Optional[torch.Tensor],
                   threshold: Optional[torch.Tensor], act: str, mode: str, backend: str, ranges: bool = True) -> None:
    """Raise a ValueError naming the problem when the arguments of :func:`ffn_stats` do not fit.

    ``ranges=False`` skips the checks that read slot/label values (the rest is shapes, dtypes and devices).
    """
    if mode not in MODES:
        raise ValueError(f"ffn_stats: unknown mode {mode!r}; choose one of {tuple(MODES)}")
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"ffn_stats: unknown backend {backend!r}; choose one of {dispatch.BACKENDS}")
    rows, _, width = check_up_projection("ffn_stats", x, w1, b1, w_gate, act)
    if mode == "none":
        for name, t in (("out", out), ("threshold", threshold)):
            if t is not None:
                raise ValueError(f"ffn_stats: mode='none' computes no statistics but {name} was given; "
                                 "pass mode='sums' or mode='counts'")
        return
    if mode == "moments":
        for name, t in (("slot", slot), ("out", out)):
            if t is None:
                raise ValueError(f"ffn_stats: mode='moments' needs {name}")
        if threshold is not None:
            raise ValueError("ffn_stats: mode='moments' takes no threshold")
        if out.device != x.device:
            raise ValueError(f"ffn_stats: out is on {out.device} but x is on {x.device}")
        others = (("label", label),) if label is not None else ()
        check_moments_state(rows, width, slot, out, op="ffn_stats", what=f"x {tuple(x.shape)}", others=others,
                            ranges=ranges)
        return
    for name, t in (("slot", slot), ("label", label), ("out", out)):
        if t is None:
            raise ValueError(f"ffn_stats: mode={mode!r} needs {name}")
    if mode == "sums" and threshold is not None:
        raise ValueError("ffn_stats: mode='sums' takes no threshold (did you mean mode='counts'?)")
    if mode == "counts" and threshold is None:
        raise ValueError("ffn_stats: mode='counts' needs threshold (slots, neurons) float64")
    if out.device != x.device:
        raise ValueError(f"ffn_stats: out is on {out.device} but x is on {x.device}")
    check_stats_state(rows, width, slot, label, out, threshold, op="ffn_stats", what=f"x {tuple(x.shape)}",
                      ranges=ranges)


def _linear_act(x, w1, b1, w_gate, act):
    if w_gate is None:
        return apply_act(F.linear(x, w1, b1), act)
    return apply_act(F.linear(x, w_gate), act) * F.linear(x, w1, b1)


@dispatch.register("ffn_stats", "torch")
def ffn_stats_reference(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor] = None, *, act: str = "gelu",
                        w_gate: Optional[torch.Tensor] = None, slot: Optional[torch.Tensor] = None,
                        label: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                        threshold: Optional[torch.Tensor] = None, mode: str = "none") -> torch.Tensor:
    """PyTorch reference of :func:`ffn_stats` (the specification; no argument checks): F.linear + activation
    in ``x.dtype``, then :func:`stats_update_reference` (:func:`stats_moments_reference` for mode ``moments``)
    on the result. Returns h: (rows, neurons)."""
    h = _linear_act(x, w1, b1, w_gate, act)
    if mode == "moments" and x.shape[0]:
        stats_moments_reference(h, slot, out)
    elif mode != "none" and x.shape[0]:
        stats_update_reference(h, slot, label, out, threshold if mode == "counts" else None)
    return h


@dispatch.register("ffn_stats", "ext", ext_op="stats_update")
def ffn_stats_ext(x, w1, b1=None, *, act="gelu", w_gate=None, slot=None, label=None, out=None, threshold=None,
                  mode="none") -> torch.Tensor:
    """PyTorch's GEMM + activation, then the compiled statistics op (identical numbers to the reference)."""
    h = _linear_act(x, w1, b1, w_gate, act)
    if mode == "moments" and x.shape[0]:
        stats_moments_ext(h, slot, out)
    elif mode != "none" and x.shape[0]:
        stats_update_ext(h, slot, label, out, threshold if mode == "counts" else None)
    return h


def _launch_config(dtype: torch.dtype, gated: bool, interpreted: bool) -> dict:
    # tl.dot needs every block >= 16. Under the interpreter the cost is per program (numpy calls), so few
    # programs keep the tests fast, while the test shapes (37 x 45 -> 123) stay ragged in every tile
    # dimension, and 3 row tiles make a short last group of GROUP_M = 2.
    # On a GPU (every configuration compiled for sm_80 and sm_90 by the compile gate, skillkern/ops/aot.py;
    # registers and spills in benchmarks/results/kernel_resources.csv; not yet timed on a GPU): 64x64 tiles.
    # The statistics epilogue holds per element a float64 value (sums) or threshold and a 64-bit address, so it
    # needs about twice the registers of the GEMM alone: 128x64 tiles spill with Triton 3.6's ptxas (CUDA 12.8,
    # which holds 8-warp kernels near 128 registers a thread), and 64x64 with 4 warps spills a few bytes there (it
    # trades registers for the occupancy its shared memory allows); 64x64 with 8 warps spills with neither 3.6 nor
    # 3.9. fp32: exact fp32 products (no TF32) on the FMA units, whose operand layouts cost more registers: a
    # 16-wide reduction chunk.
    if interpreted:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=2)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)


@dispatch.register("ffn_stats", "triton")
def ffn_stats_triton(x, w1, b1=None, *, act="gelu", w_gate=None, slot=None, label=None, out=None, threshold=None,
                     mode="none") -> torch.Tensor:
    """Launch :func:`_ffn_stats_kernel` (no argument checks; see :func:`ffn_stats`). ``x``, ``w1``, ``w_gate``
    may have any strides (passed to the kernel); ``b1``, ``slot``, ``label``, ``threshold``, ``out``
    contiguous (the host boundary, :func:`ffn_stats_host`, does it)."""
    rows, hidden = x.shape
    width = w1.shape[0]
    h = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    if rows == 0 or width == 0:
        return h
    interpreted = dispatch.launch_target(x.device).interpreted
    cfg = _launch_config(x.dtype, w_gate is not None, interpreted)
    m = MODES[mode]
    gate = w_gate if w_gate is not None else w1  # dummy pointers below are never read (constexpr-off branches)
    bias = b1 if b1 is not None else h
    if m == MODE_NONE:
        slot = label = torch.empty(0, dtype=torch.int64, device=x.device)
        out = thr = h
        classes = 1
    elif m == MODE_MOMENTS:
        label = slot  # never read in the moments mode, nor thr
        thr = out
        classes = 1
    else:
        thr = thresholds_for_float32(threshold) if m == MODE_COUNTS else out
        classes = out.shape[1]
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(width, cfg["BLOCK_N"]),)
    with dispatch.device_guard(x.device):
        dispatch.launch(
            _ffn_stats_kernel, grid,
            x, w1, gate, bias, h, slot, label, out, thr, rows, hidden, width, classes,
            x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), gate.stride(0), gate.stride(1),
            ACT=act_id(act), GATED=w_gate is not None, HAS_BIAS=b1 is not None, MODE=m,
            UPCAST=interpreted and x.dtype != torch.float32, IEEE=x.dtype == torch.float32,
            RNE_BF16=interpreted and x.dtype == torch.bfloat16, **cfg)
    return h


def ffn_stats_host(x, w1, b1, w_gate, slot, label, out, threshold, act: str, mode: str,
                   backend: str) -> torch.Tensor:
    """Check the inputs, choose the backend, run. The body of the registered op ``skillkern::ffn_stats``.

    The host boundary: ``x`` and the weights keep their strides; the small vectors (bias, slot, label,
    threshold) are made contiguous; a non-contiguous ``out`` is updated through a contiguous copy."""
    check_ffn_args(x, w1, b1, w_gate, slot, label, out, threshold, act, mode, backend)
    impl = dispatch.implementation("ffn_stats", backend, x.device)
    b1 = b1.contiguous() if b1 is not None else None
    slot = slot.contiguous() if slot is not None else None
    label = label.contiguous() if label is not None else None
    threshold = threshold.contiguous() if threshold is not None else None

    def run(o):
        return impl.fn(x, w1, b1, act=act, w_gate=w_gate, slot=slot, label=label, out=o, threshold=threshold,
                       mode=mode)

    return run(out) if out is None else run_into(out, run)


@torch.library.custom_op("skillkern::ffn_stats", mutates_args=("out",))
def _ffn_stats_op(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w_gate: Optional[torch.Tensor],
                  slot: Optional[torch.Tensor], label: Optional[torch.Tensor], out: Optional[torch.Tensor],
                  threshold: Optional[torch.Tensor], act: str, stats_mode: str, backend: str) -> torch.Tensor:
    # (not named "mode": auto_functionalize, which torch.compile wraps mutating ops in, takes a "mode" itself)
    return ffn_stats_host(x, w1, b1, w_gate, slot, label, out, threshold, act, stats_mode, backend)


@_ffn_stats_op.register_fake
def _ffn_stats_fake(x, w1, b1, w_gate, slot, label, out, threshold, act, stats_mode, backend):
    # Shape and dtype only; the data-dependent checks (slot/label ranges) run in the real op.
    return x.new_empty((x.shape[0], w1.shape[0]))


def ffn_stats(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor] = None, *, act: str = "gelu",
              w_gate: Optional[torch.Tensor] = None, slot: Optional[torch.Tensor] = None,
              label: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
              threshold: Optional[torch.Tensor] = None, mode: str = "none", backend: str = "auto") -> torch.Tensor:
    """FFN up-projection + activation, with the scoring statistics of the tracked rows added to ``out``.

    Plain: ``h = act(x @ w1.T + b1)``; gated (``w_gate`` given): ``h = act(x @ w_gate.T) * (x @ w1.T + b1)``.
    The matmul accumulates in fp32 (fp32 inputs: true fp32 products, no TF32); h is rounded once to
    ``x.dtype``. Rows with ``slot >= 0`` add ``h`` to ``out[slot, label]`` (mode ``"sums"``, float64) or
    ``h > threshold[slot]`` (mode ``"counts"``, int64), exactly as :func:`stats_update` does on the returned h;
    or ``h``, ``h ** 2`` and ``|h|`` to ``out[slot, 0..2]`` (mode ``"moments"``, float64), as
    :func:`~skillkern.ops.stats_moments.stats_moments` does.

    Args:
        x: (rows, hidden) float32, float16 or bfloat16.
        w1: (neurons, hidden) up-projection in nn.Linear layout (``W_up`` of a gated MLP), dtype of x.
        b1: (neurons,) bias of the up branch, or None.
        act: ``gelu``, ``gelu_tanh``, ``relu``, ``silu`` or a transformers alias (``gelu_new``, ``swish``...).
        w_gate: (neurons, hidden) gate projection of a gated MLP, or None.
        slot: (rows,) int64 tracked slot per row, -1 for rows to skip (modes sums/counts/moments).
        label: (rows,) int64 class per row in ``[0, classes)`` (modes sums/counts; ignored by moments).
        out: (slots, classes, neurons) contiguous accumulator, float64 (sums) or int64 (counts), updated in place;
            mode moments: (slots, 3, neurons) float64 (sum, sum of squares, sum of |h| of each slot's rows).
        threshold: (slots, neurons) float64 (mode counts only).
        mode: ``"none"`` (just h), ``"sums"``, ``"counts"`` or ``"moments"`` (labels not needed).
        backend: ``"auto"``, ``"torch"``, ``"ext"`` (PyTorch's GEMM + the compiled statistics op) or
            ``"triton"`` (the fused kernel): see :mod:`skillkern.ops.dispatch`.

    Every tensor may be a non-contiguous view (``out`` too: the update is copied back into it).

    Returns:
        h: (rows, neurons) in ``x.dtype``.
    """
    # Shape/dtype/device checks before dispatch: a tensor on the wrong device (or on meta) would otherwise
    # route the call to another kernel. They are static, so torch.compile traces them without a graph break;
    # the value checks (slot and label ranges) run inside the op.
    check_ffn_args(x, w1, b1, w_gate, slot, label, out, threshold, act, mode, backend, ranges=False)
    return torch.ops.skillkern.ffn_stats(x, w1, b1, w_gate, slot, label, out, threshold, canonical(act), mode,
                                         backend)
