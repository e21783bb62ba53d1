"""The only place that knows backends: which implementations each op has, where they can run, and ``auto``.

Every op registers its implementations here, one per backend:

==========  ==========================================================================================
backend     what runs
==========  ==========================================================================================
``torch``   the PyTorch reference (the specification): any device, always available
``ext``     the compiled op of ``csrc/`` (``skillkern._C``): CPU (C++/OpenMP), and CUDA where the
            extension was built with nvcc; for ``ffn_stats`` the GEMM is PyTorch's and the statistics
            are the compiled ``stats_update``
``triton``  the Triton kernels: CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1`` (the
            interpreter, for tests), set before skillkern is imported
==========  ==========================================================================================

**The auto policy** (one rule for every op): on a CUDA device, ``triton`` then ``ext`` then ``torch``; on any
other device, ``ext`` then ``torch``; the first one the op has and can run there is taken. ``auto`` never
takes the interpreter. Every backend computes the same numbers up to float rounding (counts exactly); where
bit-identical float64 sums matter on a GPU (resuming a job), ask for ``ext`` explicitly: it adds rows in
row order, Triton's atomics do not.

An explicit backend that cannot run raises :class:`BackendUnavailable` with the reason. :func:`recording`
collects which (op, backend) pairs really ran, so that outputs can name them.

For the compile gate (:mod:`skillkern.ops.aot`), :func:`capturing` makes every Triton launch that the host
code would issue a recorded :class:`Launch` instead, with the host code believing it drives a GPU of a given
SM count: the gate then compiles exactly the configurations the launchers choose.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from .. import _ext
from .activations import HAVE_TRITON, triton

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "ext", "triton")
#: the auto policy: preference order per device type (anything else: the "cpu" row)
AUTO_ORDER = {"cuda": ("triton", "ext", "torch"), "cpu": ("ext", "torch")}

if HAVE_TRITON:  # (imported once, in activations.py: Triton is optional, the PyTorch references work without it)

    @triton.jit
    def _probe():
        pass

else:  # pragma: no cover - exercised only where triton is absent
    _probe = None


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the op on this device (the message says why)."""


def _interpreted() -> bool:
    if not HAVE_TRITON:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - other triton layouts
        return False
    # The probe was decorated at import, as the kernels were: it sees the same setting they saw.
    return isinstance(_probe, InterpretedFunction)


_INTERPRETED = _interpreted()


def triton_interpreted() -> bool:
    """True when Triton kernels are built for the interpreter (``TRITON_INTERPRET=1`` when skillkern was
    imported): they then run on CPU tensors, as numpy, and never on a GPU."""
    return _INTERPRETED


# --------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Impl:
    """One implementation of an op. ``ext_op``: the compiled op it needs (for backend ``ext``)."""

    op: str
    backend: str
    fn: Callable
    ext_op: Optional[str] = None


_REGISTRY: dict[tuple[str, str], Impl] = {}


def register(op: str, backend: str, *, ext_op: Optional[str] = None) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``op`` on ``backend`` (``ext`` implementations name the compiled op)."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"cannot register backend {backend!r}; concrete backends are {BACKENDS[1:]}")
    if backend == "ext" and ext_op is None:
        raise ValueError(f"{op}: an 'ext' implementation must name the compiled op it calls (ext_op=...)")

    def deco(fn: Callable) -> Callable:
        _REGISTRY[(op, backend)] = Impl(op, backend, fn, ext_op)
        return fn

    return deco


def ops() -> list[str]:
    """The registered op names."""
    return sorted({op for op, _ in _REGISTRY})


def backends_of(op: str) -> list[str]:
    """The concrete backends ``op`` has, in BACKENDS order."""
    return [b for b in BACKENDS[1:] if (op, b) in _REGISTRY]


_state = threading.local()  # recording / capture blocks of this thread


def _local(name: str):
    # Thread-local state (recording, capture) is host bookkeeping: invisible to torch.compile's tracer, so
    # that the ops stay traceable in one graph.
    if torch.compiler.is_compiling():
        return None
    return getattr(_state, name, None)


def _capture_active() -> bool:
    return _local("capture") is not None


def unavailable(op: str, backend: str, device: torch.device | str) -> Optional[str]:
    """None when ``op`` can run on ``backend`` for tensors on ``device``, else the reason it cannot."""
    device = torch.device(device)
    impl = _REGISTRY.get((op, backend))
    if impl is None:
        return f"{op} has no {backend!r} implementation (it has {backends_of(op)})"
    if backend == "ext":
        if not _ext.available():
            return _ext.unavailable_reason()
        if not _ext.has_op(impl.ext_op, device):
            return f"the compiled extension has no {impl.ext_op} kernel for {device.type} (built without it)"
    if backend == "triton":
        if not HAVE_TRITON:
            return "triton is not importable (pip install triton)"
        if device.type == "cuda":
            if triton_interpreted():
                return "TRITON_INTERPRET=1 was set when skillkern was imported: kernels run on CPU tensors only"
        elif not (triton_interpreted() or (_capture_active() and device.type == "meta")):
            return (f"Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 before importing "
                    "skillkern to run them on the CPU in the (slow) interpreter")
    return None


def resolve(op: str, backend: str, device: torch.device | str) -> str:
    """The concrete backend that runs ``op`` for tensors on ``device``.

    ``auto`` follows :data:`AUTO_ORDER`; an explicit backend is returned as is, or raises
    :class:`BackendUnavailable` naming why it cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {BACKENDS}")
    device = torch.device(device)
    if backend == "auto":
        for cand in AUTO_ORDER.get(device.type, AUTO_ORDER["cpu"]):
            if (op, cand) not in _REGISTRY:
                continue
            if cand == "triton" and triton_interpreted():
                continue  # never the interpreter under auto
            if unavailable(op, cand, device) is None:
                return cand
        return "torch"
    reason = unavailable(op, backend, device)
    if reason is not None:
        raise BackendUnavailable(f"{op}: backend={backend!r} cannot run on {device}: {reason}")
    return backend


def implementation(op: str, backend: str, device: torch.device | str) -> Impl:
    """The :class:`Impl` that :func:`resolve` picks; records the choice when :func:`recording` is active."""
    chosen = resolve(op, backend, device)
    ran = _local("ran")
    if ran is not None:
        ran.setdefault(op, set()).add(chosen)
    return _REGISTRY[(op, chosen)]


def table(device: torch.device | str) -> list[dict]:
    """For docs and logs: every (op, backend) with its availability on ``device`` and what auto takes."""
    rows = []
    for op in ops():
        auto = resolve(op, "auto", device)
        for b in backends_of(op):
            reason = unavailable(op, b, device)
            rows.append(dict(op=op, backend=b, available=reason is None, reason=reason or "", auto=b == auto))
    return rows


# ------------------------------------------------------------------------------------------- recording


@contextlib.contextmanager
def recording() -> Iterator[dict[str, set]]:
    """Collect ``{op: {backend, ...}}`` for every op call dispatched inside the block (this thread)."""
    before = getattr(_state, "ran", None)
    ran: dict[str, set] = {}
    _state.ran = ran
    try:
        yield ran
    finally:
        if before is not None:  # nested: the outer block sees these calls too
            for op, used in ran.items():
                before.setdefault(op, set()).update(used)
        _state.ran = before


def describe(ran: dict[str, set]) -> dict[str, str]:
    """``{op: backend}`` for outputs (several backends of one op, e.g. fused and hook layers: joined by '+')."""
    return {op: "+".join(sorted(used)) for op, used in sorted(ran.items())}


# --------------------------------------------------------------------------------------- launching
def device_guard(device: torch.device | str):
    """Make ``device`` current for a launch on a CUDA tensor (a no-op context elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda" and not _capture_active():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@dataclass
class LaunchTarget:
    """What the host code sizes its launches for: the interpreter, or a GPU with ``sms`` multiprocessors."""

    interpreted: bool
    sms: int


def launch_target(device: torch.device | str) -> LaunchTarget:
    """The target the launchers size tiles and grids for (the captured GPU inside :func:`capturing`)."""
    cap = _local("capture")
    if cap is not None:
        return LaunchTarget(False, cap.sms)
    device = torch.device(device)
    if device.type == "cuda":
        return LaunchTarget(False, torch.cuda.get_device_properties(device).multi_processor_count)
    return LaunchTarget(True, 4)  # the interpreter: any small number


@dataclass
class Launch:
    """One Triton launch the host code issued: the kernel, its grid, arguments and keyword arguments."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict


@dataclass
class _Capture:
    sms: int
    launches: list = field(default_factory=list)


def launch_options(kwargs: dict) -> dict:
    """The keyword arguments a launch really passes: ``kwargs`` with FMA contraction pinned on (Triton 3.10
    turns the default off, and the compiled code, and the compile gate's table, must not change with the Triton
    version; the interpreter ignores the option)."""
    return {"enable_fp_fusion": True, **kwargs}


def launch(kernel, grid: tuple, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, the one launch point of every Triton kernel of skillkern.

    Returns what Triton returns (on a GPU, the compiled kernel, whose ``n_regs`` / ``n_spills`` the GPU tests
    compare with the compile gate's table); None when capturing."""
    kwargs = launch_options(kwargs)
    cap = _local("capture")
    if cap is not None:
        cap.launches.append(Launch(kernel, tuple(grid), args, dict(kwargs)))
        return None
    return kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def capturing(sms: int) -> Iterator[list]:
    """Record launches instead of running them, with the host code sizing them for a GPU of ``sms`` SMs.

    Call the ops' Triton launchers with ``meta`` tensors inside the block; the yielded list fills with
    :class:`Launch` records. Needs compiled (not interpreted) kernels, i.e. TRITON_INTERPRET unset.
    """
    if triton_interpreted():
        raise RuntimeError("capturing launches needs the compiled kernels; unset TRITON_INTERPRET")
    before = getattr(_state, "capture", None)
    cap = _Capture(sms)
    _state.capture = cap
    try:
        yield cap.launches
    finally:
        _state.capture = before
