"""Optional compiled extension ``skillkern._C`` (built from csrc/ by setup.py).

Importing skillkern never fails because the extension is missing: the reason is logged once and every op
falls back to its PyTorch reference. ``backend="ext"`` raises with that reason instead.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

_loaded = False
_reason = ""


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
    if not _loaded:
        logger.info("compiled extension unavailable, using PyTorch references: %s", _reason)
    return _loaded


def available() -> bool:
    """True when the compiled extension is importable (its ops are registered in ``torch.ops.skillkern``)."""
    return _load()


def unavailable_reason() -> str:
    """Why the extension is not available ('' when it is)."""
    _load()
    return _reason


def has_op(name: str, device: torch.device) -> bool:
    """True when ``torch.ops.skillkern.<name>`` has a kernel for ``device``'s type."""
    if not _load():
        return False
    try:
        op = getattr(torch.ops.skillkern, name)
    except (AttributeError, RuntimeError):
        return False
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return dispatch_key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), dispatch_key)
