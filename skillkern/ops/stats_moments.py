"""Streaming moments: per slot and neuron, the sum, the sum of squares and the sum of absolute values.

Given post-activation FFN rows ``h`` of one layer and the tracked slot of each row, the op adds, in place,

    out[s, 0, :] += h[r],    out[s, 1, :] += h[r] ** 2,    out[s, 2, :] += |h[r]|        (float64)

for every row ``r`` with ``slot[r] = s >= 0``; rows whose slot is -1 are skipped. ``h`` is widened to float64
first (exact for every float dtype), so the square of a float32/16/bfloat16 value is exact too and only the
additions round. These are the statistics of the structured-pruning criteria (mean, sample variance, L2 norm
and mean magnitude of every neuron: :class:`skillkern.stats.NeuronMoments`); they need no labels.

Memory: ``out`` is O(slots x 3 x neurons), whatever the number of rows, and two accumulators merge by addition
(batches, resumed jobs, processes).

Backends, as ``stats_update`` (``ops/stats_update.py``): ``torch`` (this reference: ``index_add_``, rows in row
order), ``ext`` (``torch.ops.skillkern.stats_moments`` of ``csrc/``, rows in row order: bit-identical to the
reference on the CPU, and on CUDA to the CPU op) and ``triton`` (``stats_update``'s kernel in its moments mode:
float64 atomics, so the sums equal the reference up to float64 rounding). The fused FFN kernel computes the same
statistics in its epilogue (``ffn_stats(..., mode="moments")``).
"""

from __future__ import annotations

import logging

import torch

from . import dispatch
from .activations import triton
from .stats_update import MODE_MOMENTS, _launch_config, _stats_update_kernel, run_into

logger = logging.getLogger(__name__)

#: the moment axis of the accumulator: ``out[:, MOMENTS.index("sumsq")]`` holds the sums of squares
MOMENTS = ("sum", "sumsq", "sumabs")


def check_moments_state(rows: int, width: int, slot: torch.Tensor, out: torch.Tensor, op: str = "stats_moments",
                        what: str = "", others: tuple = (), ranges: bool = True) -> None:
    """Raise a ValueError naming the problem when ``slot`` and ``out`` do not fit ``rows`` x ``width``
    activations (``what`` names them in messages); ``others``: (name, tensor) pairs that must live on ``out``'s
    device. ``ranges``: also check the slot values (one host sync on a GPU; not traceable by torch.compile).
    Shared with ``ffn_stats(mode="moments")``."""
    what = what or f"({rows}, {width}) activations"
    if slot.dim() != 1 or slot.shape[0] != rows:
        raise ValueError(f"{op}: slot must have shape ({rows},) to match {what}, got {tuple(slot.shape)}")
    if slot.dtype != torch.int64:
        raise ValueError(f"{op}: slot must be int64, got {slot.dtype}")
    if out.dim() != 3 or out.shape[1] != len(MOMENTS) or out.shape[2] != width:
        raise ValueError(f"{op}: out must have shape (slots, 3, {width}), got {tuple(out.shape)}")
    if out.dtype != torch.float64:
        raise ValueError(f"{op}: moments are accumulated in float64, got out of dtype {out.dtype}")
    for name, t in (("slot", slot),) + tuple(others):
        if t.device != out.device:
            raise ValueError(f"{op}: {name} is on {t.device} but out is on {out.device}")
    if rows and ranges:
        slots = out.shape[0]
        if int(slot.max()) >= slots:
            raise ValueError(f"{op}: slot index {int(slot.max())} out of range for {slots} slots")
        if int(slot.min()) < -1:
            raise ValueError(f"{op}: slot index {int(slot.min())} is invalid (use -1 for untracked rows)")


def check_moments_args(h: torch.Tensor, slot: torch.Tensor, out: torch.Tensor) -> None:
    """Raise a ValueError naming the problem when the arguments of :func:`stats_moments` do not fit."""
    if h.dim() != 2:
        raise ValueError(f"stats_moments: h must be 2-D (rows, neurons), got shape {tuple(h.shape)}")
    if not h.is_floating_point():
        raise ValueError(f"stats_moments: h must be floating point, got {h.dtype}")
    check_moments_state(h.shape[0], h.shape[1], slot, out, what=f"h {tuple(h.shape)}", others=(("h", h),))


@dispatch.register("stats_moments", "torch")
def stats_moments_reference(h: torch.Tensor, slot: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of :func:`stats_moments` (the specification; no argument checks; ``out`` contiguous):
    three ``index_add_`` of the float64 rows, their squares and their magnitudes."""
    width = out.shape[2]
    keep = slot >= 0
    if not bool(keep.all()):
        h, slot = h[keep], slot[keep]
    h64 = h.to(torch.float64)
    flat = out.view(-1, width)                                   # (slots * 3, D): row 3 s + k is moment k of s
    base = slot * len(MOMENTS)
    flat.index_add_(0, base, h64)
    flat.index_add_(0, base + 1, h64 * h64)
    flat.index_add_(0, base + 2, h64.abs())
    return out


@dispatch.register("stats_moments", "ext", ext_op="stats_moments")
def stats_moments_ext(h: torch.Tensor, slot: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The compiled op of csrc/ (C++/OpenMP on CPU, CUDA where built): rows added in row order."""
    torch.ops.skillkern.stats_moments(h, slot, out)
    return out


@dispatch.register("stats_moments", "triton")
def stats_moments_triton(h: torch.Tensor, slot: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Launch ``stats_update``'s kernel in its moments mode (no argument checks; see :func:`stats_moments`).
    ``h`` may have any strides; ``slot`` and ``out`` contiguous (the host boundary does it)."""
    rows, width = h.shape
    if rows == 0 or width == 0:
        return out
    cfg = _launch_config(dispatch.launch_target(h.device).interpreted, moments=True)
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(width, cfg["BLOCK_N"]))
    with dispatch.device_guard(h.device):
        # label_ptr and thr_ptr are never read in the moments mode: slot and out stand in for them
        dispatch.launch(_stats_update_kernel, grid, h, slot, slot, out, out, rows, width, 1,
                        h.stride(0), h.stride(1), MODE=MODE_MOMENTS, H_F64=h.dtype == torch.float64, **cfg)
    return out


def stats_moments(h: torch.Tensor, slot: torch.Tensor, out: torch.Tensor, backend: str = "auto",
                  check: bool = True) -> torch.Tensor:
    """Accumulate per-slot float64 moments of the tracked rows, in place.

    Args:
        h: (rows, neurons) post-activation rows of one layer, any float dtype.
        slot: (rows,) int64 tracked slot of each row, -1 for a row to skip.
        out: (slots, 3, neurons) float64 accumulator: ``out[s, 0]`` sums of h, ``out[s, 1]`` sums of h ** 2,
            ``out[s, 2]`` sums of |h| (:data:`MOMENTS`).
        backend: ``"auto"``, ``"torch"``, ``"ext"`` or ``"triton"``: see :mod:`skillkern.ops.dispatch`.
        check: validate shapes, dtypes and index ranges first (one host sync for the range checks).

    Every tensor may be a non-contiguous view (``out`` too: the update is copied back into it).

    Returns:
        ``out``.
    """
    if check:
        check_moments_args(h, slot, out)
    if h.shape[0] == 0:
        return out
    impl = dispatch.implementation("stats_moments", backend, out.device)
    return run_into(out, lambda o: impl.fn(h, slot.contiguous(), o))
