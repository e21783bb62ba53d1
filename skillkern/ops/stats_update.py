"""Streaming threshold statistics: the op every scoring pass runs once per layer and batch.

Given post-activation FFN rows ``h`` of one layer, the tracked slot of each row and its label, the op
adds, in place, either

* per-class sums (first pass, ``threshold is None``):   ``out[s, c, :] += h[r]`` (float64), or
* per-class counts above threshold (second pass):         ``out[s, c, :] += h[r] > threshold[s]`` (int64),

for every row ``r`` with ``slot[r] = s >= 0`` and ``label[r] = c``. Rows whose slot is -1 are skipped.
The comparison is done in float64 and is strict (ties count as "not above"), as METHOD.md section 4 says.

Memory: ``out`` is O(slots x classes x neurons), independent of the number of rows ever seen, and two
accumulators merge by addition. Naive traffic: reads R*D activations once; the state is read and written
once per row touched.

Rows are added in row order, so float64 sums are the same whether a dataset is fed in one call or in
many (any batch size), and the compiled op (``csrc/stats_update.cpp``) matches this reference exactly.

The Triton backend (GPU; on CPU only under ``TRITON_INTERPRET=1``) tiles (rows, neurons) and adds with
float64 / int64 atomics: counts are exact, sums equal the reference up to float64 rounding, because atomics
add the rows of one element in no fixed order. Its epilogue, :func:`_stats_epilogue`, is shared with the fused
FFN kernel (``ops/ffn_stats.py``), which runs it on a GEMM tile still in registers, and with the moments op
(``ops/stats_moments.py``: per-slot sum, sum of squares and sum of |h|, the epilogue's third mode).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from . import dispatch
from .activations import HAVE_TRITON, tl, triton

logger = logging.getLogger(__name__)

#: ``mode`` constexpr of :func:`_stats_epilogue` (MODE_MOMENTS: the op ``stats_moments``, ops/stats_moments.py)
MODE_NONE, MODE_SUMS, MODE_COUNTS, MODE_MOMENTS = 0, 1, 2, 3

if HAVE_TRITON:

    @triton.jit
    def _stats_epilogue(h, slot, label, offs_n, mask_m, mask_n, out_ptr, thr_ptr, classes, width,
                        MODE: tl.constexpr):
        """Add a tile of activations to the per-class statistics with atomics.

        h: [BLOCK_M, BLOCK_N] float32 (or float64) activations; slot, label: [BLOCK_M] int64 (slot -1 or a
        masked row: skipped; label unused in MODE 3); offs_n: [BLOCK_N] int64 neuron indices; mask_m / mask_n:
        valid rows / neurons. out: (slots, classes, width) contiguous, float64 sums (MODE 1) or int64 counts
        (MODE 2); or (slots, 3, width) float64 moments (MODE 3: sum, sum of squares, sum of |h| of each slot's
        rows, the squares of float32 values exact in float64); thr: (slots, width) contiguous thresholds (MODE 2
        only) in h's dtype: for float32 h, the float64 thresholds rounded toward -inf
        (:func:`thresholds_for_float32`), which makes ``h > thr`` in float32 exactly the reference's float64
        comparison without float64 tiles in registers. MODE 0 compiles to nothing.
        """
        if MODE == 3:
            tracked = mask_m & (slot >= 0)
            if tl.max(tracked.to(tl.int32), axis=0) > 0:  # (as below: skip tiles without a tracked row)
                safe_slot = tl.where(tracked, slot, 0)
                keep = tracked[:, None] & mask_n[None, :]
                # 3 moments per slot, one element atomic each; products and |h| in float64 after the exact
                # widening (the square of a float32 has at most 48 significant bits: exact in float64)
                h64 = h.to(tl.float64)
                dst = out_ptr + (safe_slot * 3)[:, None] * width + offs_n[None, :]
                tl.atomic_add(dst, h64, mask=keep, sem="relaxed")
                tl.atomic_add(dst + width, h64 * h64, mask=keep, sem="relaxed")
                tl.atomic_add(dst + 2 * width, tl.abs(h64), mask=keep, sem="relaxed")
        elif MODE != 0:
            tracked = mask_m & (slot >= 0)
            # Most tiles hold no tracked row when one token in 128 is tracked (cls pooling): skip them
            # with one reduction instead of issuing fully masked atomics.
            if tl.max(tracked.to(tl.int32), axis=0) > 0:
                safe_slot = tl.where(tracked, slot, 0)
                group = safe_slot * classes + tl.where(tracked, label, 0)
                keep = tracked[:, None] & mask_n[None, :]
                dst = out_ptr + group[:, None] * width + offs_n[None, :]
                if MODE == 1:
                    tl.atomic_add(dst, h.to(tl.float64), mask=keep, sem="relaxed")  # exact widening
                else:
                    thr = tl.load(thr_ptr + safe_slot[:, None] * width + offs_n[None, :], mask=keep, other=0.0)
                    above = keep & (h > thr)  # strict: ties and NaN are "not above"
                    # only the elements above threshold need an atomic (+1)
                    tl.atomic_add(dst, tl.full(h.shape, 1, tl.int64), mask=above, sem="relaxed")

    # Row and class counts change from call to call: not specialised, so one compiled variant serves them all.
    @triton.jit(do_not_specialize=["rows", "classes"])
    def _stats_update_kernel(h_ptr, slot_ptr, label_ptr, out_ptr, thr_ptr, rows, width, classes,
                             stride_hr, stride_hd,
                             MODE: tl.constexpr, H_F64: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One (BLOCK_M rows) x (BLOCK_N neurons) tile of h -> atomics into out (MODE 3: ``stats_moments``, whose
        rows have no label: ``label_ptr`` is not read)."""
        pid_m = tl.program_id(0).to(tl.int64)
        pid_n = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < rows
        mask_n = offs_n < width
        slot = tl.load(slot_ptr + offs_m, mask=mask_m, other=-1)
        if MODE == 3:
            label = slot
        else:
            label = tl.load(label_ptr + offs_m, mask=mask_m, other=0)
        # untracked rows are masked out of the load: their activations are never read
        keep = (mask_m & (slot >= 0))[:, None] & mask_n[None, :]
        h = tl.load(h_ptr + offs_m[:, None] * stride_hr + offs_n[None, :] * stride_hd, mask=keep, other=0.0)
        if H_F64:
            hx = h
        else:
            hx = h.to(tl.float32)  # exact for float16/bfloat16; thresholds come rounded for float32
        _stats_epilogue(hx, slot, label, offs_n, mask_m, mask_n, out_ptr, thr_ptr, classes, width, MODE)

else:  # pragma: no cover - exercised only where triton is absent
    _stats_epilogue = _stats_update_kernel = None


def thresholds_for_float32(threshold: torch.Tensor) -> torch.Tensor:
    """float64 thresholds -> float32 ones ``t32`` with ``h > t32  <=>  float64(h) > threshold`` for every float32
    (hence every float16/bfloat16) ``h``: round to nearest, then one float32 step down where that rounded up.

    Why it is exact: ``t32`` is the largest float32 <= threshold, so no float32 lies in ``(t32, threshold]``
    when the threshold is not a float32 itself, and ``t32 == threshold`` when it is. Holds for infinities
    (1e300 -> FLT_MAX, -1e300 -> -inf) and NaN (never above).
    """
    t32 = threshold.to(torch.float32)
    down = torch.nextafter(t32, torch.full_like(t32, -float("inf")))
    return torch.where(t32.to(torch.float64) > threshold, down, t32).contiguous()


def check_stats_args(h: torch.Tensor, slot: torch.Tensor, label: torch.Tensor, out: torch.Tensor,
                     threshold: Optional[torch.Tensor]) -> None:
    """Raise a ValueError naming the problem when the arguments of :func:`stats_update` do not fit."""
    if h.dim() != 2:
        raise ValueError(f"stats_update: h must be 2-D (rows, neurons), got shape {tuple(h.shape)}")
    if not h.is_floating_point():
        raise ValueError(f"stats_update: h must be floating point, got {h.dtype}")
    rows, width = h.shape
    check_stats_state(rows, width, slot, label, out, threshold, op="stats_update", what=f"h {tuple(h.shape)}",
                      others=(("h", h),))


def check_stats_state(rows: int, width: int, slot: torch.Tensor, label: torch.Tensor, out: torch.Tensor,
                      threshold: Optional[torch.Tensor], op: str = "stats_update", what: str = "",
                      others: tuple = (), ranges: bool = True) -> None:
    """Checks shared by :func:`stats_update` and the fused ops that compute the same statistics.

    ``rows`` x ``width`` is the shape of the activations (``what`` names them in messages); ``others`` are
    extra (name, tensor) pairs that must live on ``out``'s device. ``ranges``: also check the slot and
    label values (reads them: one host sync on a GPU, and not traceable by torch.compile).
    """
    what = what or f"({rows}, {width}) activations"
    for name, t in (("slot", slot), ("label", label)):
        if t.dim() != 1 or t.shape[0] != rows:
            raise ValueError(f"{op}: {name} must have shape ({rows},) to match {what}, got {tuple(t.shape)}")
        if t.dtype != torch.int64:
            raise ValueError(f"{op}: {name} must be int64, got {t.dtype}")
    if out.dim() != 3 or out.shape[2] != width:
        raise ValueError(f"{op}: out must have shape (slots, classes, {width}), got {tuple(out.shape)}")
    slots, classes, _ = out.shape
    if threshold is None:
        if out.dtype != torch.float64:
            raise ValueError(f"{op}: sums are accumulated in float64, got out of dtype {out.dtype}")
    else:
        if out.dtype != torch.int64:
            raise ValueError(f"{op}: counts are accumulated in int64, got out of dtype {out.dtype}")
        if tuple(threshold.shape) != (slots, width):
            raise ValueError(f"{op}: threshold must have shape ({slots}, {width}), got {tuple(threshold.shape)}")
        if threshold.dtype != torch.float64:
            raise ValueError(f"{op}: threshold must be float64, got {threshold.dtype}")
    tensors = (("slot", slot), ("label", label)) + tuple(others)
    if threshold is not None:
        tensors += (("threshold", threshold),)
    for name, t in tensors:
        if t.device != out.device:
            raise ValueError(f"{op}: {name} is on {t.device} but out is on {out.device}")
    if rows and ranges:
        tracked = slot >= 0
        if int(slot.max()) >= slots:
            raise ValueError(f"{op}: slot index {int(slot.max())} out of range for {slots} slots")
        if int(slot.min()) < -1:
            raise ValueError(f"{op}: slot index {int(slot.min())} is invalid (use -1 for untracked rows)")
        lab = label[tracked]
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= classes):
            bad = int(lab.min()) if int(lab.min()) < 0 else int(lab.max())
            raise ValueError(f"{op}: label {bad} out of range [0, {classes})")


@dispatch.register("stats_update", "torch")
def stats_update_reference(h: torch.Tensor, slot: torch.Tensor, label: torch.Tensor, out: torch.Tensor,
                           threshold: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PyTorch reference of :func:`stats_update` (the specification; no argument checks; ``out`` contiguous)."""
    classes, width = out.shape[1], out.shape[2]
    keep = slot >= 0
    if not bool(keep.all()):
        h, slot, label = h[keep], slot[keep], label[keep]
    group = slot * classes + label
    flat = out.view(-1, width)
    if threshold is None:
        flat.index_add_(0, group, h.to(torch.float64))
    else:
        flat.index_add_(0, group, (h.to(torch.float64) > threshold[slot]).to(torch.int64))
    return out


@dispatch.register("stats_update", "ext", ext_op="stats_update")
def stats_update_ext(h: torch.Tensor, slot: torch.Tensor, label: torch.Tensor, out: torch.Tensor,
                     threshold: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The compiled op of csrc/ (C++/OpenMP on CPU, CUDA where built): rows added in row order."""
    torch.ops.skillkern.stats_update(h, slot, label, out, threshold)
    return out


def _launch_config(interpreted: bool, moments: bool = False) -> dict:
    # Under the interpreter every program is a numpy call: small tiles keep tests quick. On a GPU one warp
    # group covers 32 rows x 128 neurons; rows are what atomics contend on, neurons are contiguous. No matrix
    # product here, so registers stay low (the compile gate's table: benchmarks/results/kernel_resources.csv).
    # The moments mode (ops/stats_moments.py) holds the same tile.
    if interpreted:
        return dict(BLOCK_M=16, BLOCK_N=32)
    return dict(BLOCK_M=32, BLOCK_N=128, num_warps=4)


@dispatch.register("stats_update", "triton")
def stats_update_triton(h: torch.Tensor, slot: torch.Tensor, label: torch.Tensor, out: torch.Tensor,
                        threshold: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch :func:`_stats_update_kernel` (no argument checks; see :func:`stats_update`). ``h`` may have any
    strides; ``slot``, ``label``, ``threshold`` contiguous and ``out`` contiguous (the host boundary does it)."""
    rows, width = h.shape
    if rows == 0 or width == 0:
        return out
    cfg = _launch_config(dispatch.launch_target(h.device).interpreted)
    mode = MODE_SUMS if threshold is None else MODE_COUNTS
    if threshold is None:
        thr = out  # dummy pointer, never read in MODE_SUMS
    else:
        thr = threshold if h.dtype == torch.float64 else thresholds_for_float32(threshold)
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(width, cfg["BLOCK_N"]))
    with dispatch.device_guard(h.device):
        dispatch.launch(_stats_update_kernel, grid, h, slot, label, out, thr, rows, width, out.shape[1],
                        h.stride(0), h.stride(1), MODE=mode, H_F64=h.dtype == torch.float64, **cfg)
    return out


def run_into(out: torch.Tensor, fn):
    """``fn(out)``, through a contiguous copy copied back when ``out`` is a non-contiguous view: the kernels
    accumulate into contiguous memory, callers may pass any view. Returns what ``fn`` returns."""
    if out.is_contiguous():
        return fn(out)
    tmp = out.contiguous()
    result = fn(tmp)
    out.copy_(tmp)
    return out if result is tmp else result


def stats_update(h: torch.Tensor, slot: torch.Tensor, label: torch.Tensor, out: torch.Tensor,
                 threshold: Optional[torch.Tensor] = None, backend: str = "auto", check: bool = True) -> torch.Tensor:
    """Accumulate per-class sums or per-class counts above threshold, in place.

    Args:
        h: (rows, neurons) post-activation rows of one layer, any float dtype.
        slot: (rows,) int64 tracked slot of each row, -1 for a row to skip.
        label: (rows,) int64 class of each row, in ``[0, classes)``.
        out: (slots, classes, neurons) accumulator: float64 sums when ``threshold`` is None, else int64 counts.
        threshold: (slots, neurons) float64 thresholds, or None for the sums pass.
        backend: ``"auto"``, ``"torch"``, ``"ext"`` or ``"triton"``: see :mod:`skillkern.ops.dispatch`.
        check: validate shapes, dtypes and index ranges first (one host sync for the range checks).

    Every tensor may be a non-contiguous view (``out`` too: the update is copied back into it).

    Returns:
        ``out``.
    """
    if check:
        check_stats_args(h, slot, label, out, threshold)
    if h.shape[0] == 0:
        return out
    impl = dispatch.implementation("stats_update", backend, out.device)
    # The host boundary: small index/threshold tensors are made contiguous here; h keeps its strides (the
    # kernels take them; the compiled op copies what it must).
    threshold = threshold.contiguous() if threshold is not None else None
    return run_into(out, lambda o: impl.fn(h, slot.contiguous(), label.contiguous(), o, threshold))
