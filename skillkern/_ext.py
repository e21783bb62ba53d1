"""Optional compiled extension ``skillkern._C`` (built from csrc/ by setup.py).

Importing skillkern never fails because the extension is missing: the reason is logged once and every op
falls back to its PyTorch reference. ``backend="ext"`` raises with that reason instead.

Loading also registers the fake (meta) implementations of the compiled ops with ``torch.library``, so that
``torch.compile`` and FakeTensor can trace through them (``tests/test_library.py`` runs ``opcheck``).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

logger = logging.getLogger(__name__)

_loaded = False
_reason = ""
# The ops skillkern._C defines (csrc/module.cpp), and which dispatch keys have a kernel for each, read once at
# load: has_op then only looks in this dict, which torch.compile (Dynamo) can trace, unlike the dispatcher query.
_COMPILED_OPS = ("stats_update", "stats_moments")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_kernels: dict = {}


def _load() -> bool:
    global _loaded, _reason
    if _loaded or _reason:
        return _loaded
    if os.environ.get("SKILLKERN_NO_EXT") == "1":
        _reason = "SKILLKERN_NO_EXT=1 is set"
    else:
        try:
            from . import _C  # noqa: F401  registers torch.ops.skillkern.*
            _loaded = True
        except Exception as err:  # ImportError, or an ABI mismatch surfacing as OSError
            _reason = f"skillkern._C could not be imported ({type(err).__name__}: {err}); " \
                      "reinstall with `pip install --no-build-isolation -e .` to build it"
    if _loaded:
        for name in _COMPILED_OPS:
            for key in _DISPATCH_KEYS.values():
                _kernels[(name, key)] = _has_kernel(name, key)
        _register_fakes()
    else:
        logger.info("compiled extension unavailable, using PyTorch references: %s", _reason)
    return _loaded


def _has_kernel(name: str, dispatch_key: str) -> bool:
    try:
        getattr(torch.ops.skillkern, name)
    except (AttributeError, RuntimeError):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"skillkern::{name}", dispatch_key)


def _stats_update_fake(h: torch.Tensor, slot: torch.Tensor, label: torch.Tensor, out: torch.Tensor,
                       threshold: Optional[torch.Tensor]) -> None:
    """Fake of ``skillkern::stats_update``: it mutates ``out`` and returns nothing, so only the checks remain.

    The same shape/dtype checks as csrc/stats_update.cpp (metadata only: index ranges need the data).
    """
    torch._check(h.dim() == 2, lambda: f"stats_update: h must be 2-D (rows, neurons), got shape {tuple(h.shape)}")
    torch._check(h.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                 lambda: f"stats_update: h must be float32, float64, float16 or bfloat16, got {h.dtype}")
    for name, t in (("slot", slot), ("label", label)):
        torch._check(t.dim() == 1 and t.shape[0] == h.shape[0],
                     lambda: f"stats_update: {name} must have shape ({h.shape[0]},) to match h, got {tuple(t.shape)}")
        torch._check(t.dtype == torch.int64, lambda: f"stats_update: {name} must be int64, got {t.dtype}")
    torch._check(out.dim() == 3 and out.shape[2] == h.shape[1],
                 lambda: f"stats_update: out must have shape (slots, classes, {h.shape[1]}), got {tuple(out.shape)}")
    torch._check(out.is_contiguous(), lambda: "stats_update: out must be contiguous (it is updated in place)")
    want = torch.float64 if threshold is None else torch.int64
    torch._check(out.dtype == want, lambda: f"stats_update: out must be {want} for this pass, got {out.dtype}")
    if threshold is not None:
        torch._check(threshold.dim() == 2 and threshold.shape[0] == out.shape[0] and threshold.shape[1] == h.shape[1],
                     lambda: f"stats_update: threshold must have shape ({out.shape[0]}, {h.shape[1]}), "
                             f"got {tuple(threshold.shape)}")
        torch._check(threshold.dtype == torch.float64,
                     lambda: f"stats_update: threshold must be float64, got {threshold.dtype}")
    return None


def _stats_moments_fake(h: torch.Tensor, slot: torch.Tensor, out: torch.Tensor) -> None:
    """Fake of ``skillkern::stats_moments``: the metadata checks of csrc/stats_update.cpp; it mutates ``out``."""
    torch._check(h.dim() == 2, lambda: f"stats_moments: h must be 2-D (rows, neurons), got shape {tuple(h.shape)}")
    torch._check(h.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                 lambda: f"stats_moments: h must be float32, float64, float16 or bfloat16, got {h.dtype}")
    torch._check(slot.dim() == 1 and slot.shape[0] == h.shape[0],
                 lambda: f"stats_moments: slot must have shape ({h.shape[0]},) to match h, got {tuple(slot.shape)}")
    torch._check(slot.dtype == torch.int64, lambda: f"stats_moments: slot must be int64, got {slot.dtype}")
    torch._check(out.dim() == 3 and out.shape[1] == 3 and out.shape[2] == h.shape[1],
                 lambda: f"stats_moments: out must have shape (slots, 3, {h.shape[1]}), got {tuple(out.shape)}")
    torch._check(out.dtype == torch.float64, lambda: f"stats_moments: out must be torch.float64, got {out.dtype}")
    torch._check(out.is_contiguous(), lambda: "stats_moments: out must be contiguous (it is updated in place)")
    return None


def _register_fakes() -> None:
    # Once per process (_load runs its body once). A failure here costs torch.compile support, not the op.
    for name, fake in (("stats_update", _stats_update_fake), ("stats_moments", _stats_moments_fake)):
        if not _kernels.get((name, "CPU")) and not _kernels.get((name, "CUDA")):
            continue  # an extension built before the op existed
        try:
            torch.library.register_fake(f"skillkern::{name}", fake)
        except Exception as err:  # e.g. a torch without register_fake (added in 2.4)
            logger.warning("could not register the fake of skillkern::%s (%s: %s); torch.compile will not trace "
                           "through it", name, type(err).__name__, err)


def available() -> bool:
    """True when the compiled extension is importable (its ops are registered in ``torch.ops.skillkern``)."""
    return _load()


def unavailable_reason() -> str:
    """Why the extension is not available ('' when it is)."""
    _load()
    return _reason


def has_op(name: str, device: torch.device) -> bool:
    """True when ``torch.ops.skillkern.<name>`` has a kernel for ``device``'s type (traceable by torch.compile)."""
    if not _load():
        return False
    dispatch_key = _DISPATCH_KEYS.get(torch.device(device).type)
    if dispatch_key is None:
        return False
    found = _kernels.get((name, dispatch_key))
    if found is None:  # an op not in _COMPILED_OPS: ask the dispatcher (once; not traceable by Dynamo)
        found = _kernels[(name, dispatch_key)] = _has_kernel(name, dispatch_key)
    return found
