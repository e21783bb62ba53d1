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
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .. import _ext

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "ext")


def check_stats_args(h: torch.Tensor, slot: torch.Tensor, label: torch.Tensor, out: torch.Tensor,
                     threshold: Optional[torch.Tensor]) -> None:
    """Raise a ValueError naming the problem when the arguments of :func:`stats_update` do not fit."""
    if h.dim() != 2:
        raise ValueError(f"stats_update: h must be 2-D (rows, neurons), got shape {tuple(h.shape)}")
    if not h.is_floating_point():
        raise ValueError(f"stats_update: h must be floating point, got {h.dtype}")
    rows, width = h.shape
    for name, t in (("slot", slot), ("label", label)):
        if t.dim() != 1 or t.shape[0] != rows:
            raise ValueError(f"stats_update: {name} must have shape ({rows},) to match h {tuple(h.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.dtype != torch.int64:
            raise ValueError(f"stats_update: {name} must be int64, got {t.dtype}")
    if out.dim() != 3 or out.shape[2] != width:
        raise ValueError(f"stats_update: out must have shape (slots, classes, {width}), got {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError("stats_update: out must be contiguous")
    slots, classes, _ = out.shape
    if threshold is None:
        if out.dtype != torch.float64:
            raise ValueError(f"stats_update: sums are accumulated in float64, got out of dtype {out.dtype}")
    else:
        if out.dtype != torch.int64:
            raise ValueError(f"stats_update: counts are accumulated in int64, got out of dtype {out.dtype}")
        if tuple(threshold.shape) != (slots, width):
            raise ValueError(f"stats_update: threshold must have shape ({slots}, {width}), got {tuple(threshold.shape)}")
        if threshold.dtype != torch.float64:
            raise ValueError(f"stats_update: threshold must be float64, got {threshold.dtype}")
    for name, t in (("slot", slot), ("label", label), ("h", h)) + ((("threshold", threshold),) if threshold is not None else ()):
        if t.device != out.device:
            raise ValueError(f"stats_update: {name} is on {t.device} but out is on {out.device}")
    if rows:
        tracked = slot >= 0
        if int(slot.max()) >= slots:
            raise ValueError(f"stats_update: slot index {int(slot.max())} out of range for {slots} slots")
        if int(slot.min()) < -1:
            raise ValueError(f"stats_update: slot index {int(slot.min())} is invalid (use -1 for untracked rows)")
        lab = label[tracked]
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= classes):
            bad = int(lab.min()) if int(lab.min()) < 0 else int(lab.max())
            raise ValueError(f"stats_update: label {bad} out of range [0, {classes})")


def stats_update_reference(h: torch.Tensor, slot: torch.Tensor, label: torch.Tensor, out: torch.Tensor,
                           threshold: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PyTorch reference of :func:`stats_update` (the specification; no argument checks)."""
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


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``auto`` to a concrete backend for tensors on ``device``; validate explicit choices."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "ext" if _ext.has_op("stats_update", device) else "torch"
    if backend == "ext" and not _ext.has_op("stats_update", device):
        raise RuntimeError(f"backend='ext' asked for, but the compiled op is not available on {device}: "
                           f"{_ext.unavailable_reason()}")
    return backend


def stats_update(h: torch.Tensor, slot: torch.Tensor, label: torch.Tensor, out: torch.Tensor,
                 threshold: Optional[torch.Tensor] = None, backend: str = "auto", check: bool = True) -> torch.Tensor:
    """Accumulate per-class sums or per-class counts above threshold, in place.

    Args:
        h: (rows, neurons) post-activation rows of one layer, any float dtype.
        slot: (rows,) int64 tracked slot of each row, -1 for a row to skip.
        label: (rows,) int64 class of each row, in ``[0, classes)``.
        out: (slots, classes, neurons) accumulator: float64 sums when ``threshold`` is None, else int64 counts.
        threshold: (slots, neurons) float64 thresholds, or None for the sums pass.
        backend: ``"auto"`` (compiled op when built, else PyTorch), ``"torch"`` or ``"ext"``.
        check: validate shapes, dtypes and index ranges first (one host sync for the range checks).

    Returns:
        ``out``.
    """
    if check:
        check_stats_args(h, slot, label, out, threshold)
    if h.shape[0] == 0:
        return out
    if resolve_backend(backend, out.device) == "ext":
        torch.ops.skillkern.stats_update(h.contiguous(), slot.contiguous(), label.contiguous(), out, threshold)
        return out
    return stats_update_reference(h, slot, label, out, threshold)
