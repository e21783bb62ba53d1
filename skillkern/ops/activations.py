"""Activations shared by the fused kernels: names, PyTorch references, and a Triton device function.

Names follow transformers' ACT2FN keys where they mean the same function: ``gelu`` (erf form), ``gelu_tanh``
(tanh approximation; HF's ``gelu_new``, ``gelu_fast`` and ``gelu_pytorch_tanh`` are the same formula),
``relu``, ``silu`` (``swish``). The fused kernels take the activation as an integer constexpr so that
unused branches compile away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")

#: transformers ACT2FN key -> our name (only keys whose formula is exactly the same)
HF_ALIASES = {
    "gelu": "gelu", "gelu_python": "gelu",
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu", "swish": "silu",
}


def act_id(name: str) -> int:
    """The integer the Triton kernels use for activation ``name``."""
    try:
        return ACTIVATIONS.index(canonical(name))
    except ValueError:
        raise ValueError(f"unsupported activation {name!r}; fused kernels support {ACTIVATIONS} "
                         f"(and the transformers aliases {sorted(HF_ALIASES)})") from None


def canonical(name: str) -> str:
    """Map a transformers activation name to ours; raises ValueError for an unsupported one."""
    if name in ACTIVATIONS:
        return name
    if name in HF_ALIASES:
        return HF_ALIASES[name]
    raise ValueError(f"unsupported activation {name!r}; fused kernels support {ACTIVATIONS} "
                     f"(and the transformers aliases {sorted(HF_ALIASES)})")


#: input dtypes the fused FFN kernels take (their accumulators are float32)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_up_projection(op: str, x: torch.Tensor, w1: torch.Tensor, b1, w_gate, act: str,
                        **others) -> tuple[int, int, int]:
    """Shared argument checks of the fused FFN ops: ``x`` (rows, hidden), ``w1``/``w_gate`` (neurons, hidden),
    ``b1`` (neurons,), and ``others`` (named tensors or None) in the dtype and on the device of ``x``.

    Raises a ValueError that starts with ``op`` and names the argument; returns (rows, hidden, neurons)."""
    canonical(act)  # ValueError naming the supported activations
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (rows, hidden), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    rows, hidden = x.shape
    if w1.dim() != 2 or w1.shape[1] != hidden:
        raise ValueError(f"{op}: w1 must have shape (neurons, {hidden}) (nn.Linear layout) to match x "
                         f"{tuple(x.shape)}, got {tuple(w1.shape)}")
    width = w1.shape[0]
    if w_gate is not None and tuple(w_gate.shape) != tuple(w1.shape):
        raise ValueError(f"{op}: w_gate must have the shape of w1 {tuple(w1.shape)}, got {tuple(w_gate.shape)}")
    if b1 is not None and tuple(b1.shape) != (width,):
        raise ValueError(f"{op}: b1 must have shape ({width},) to match w1 {tuple(w1.shape)}, "
                         f"got {tuple(b1.shape)}")
    for name, t in {"w1": w1, "w_gate": w_gate, "b1": b1, **others}.items():
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise ValueError(f"{op}: {name} is {t.dtype} but x is {x.dtype}; cast them to one dtype")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    return rows, hidden, width


def apply_act(x: torch.Tensor, name: str) -> torch.Tensor:
    """PyTorch reference of the activation ``name`` (any shape)."""
    name = canonical(name)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    return F.silu(x)


try:  # Triton is optional: the PyTorch references work without it.
    import triton
    import triton.language as tl

    @triton.jit
    def triton_act(x, ACT: tl.constexpr):
        """Activation ``ACT`` (index into ACTIVATIONS) of a float32 tile."""
        if ACT == 0:
            return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
        elif ACT == 1:
            # tanh(t) = 2 * sigmoid(2t) - 1: no tanh in the interpreter-safe core language
            t = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            return 0.5 * x * (2.0 * tl.sigmoid(2.0 * t))
        elif ACT == 2:
            return tl.maximum(x, 0.0)
        else:
            return x * tl.sigmoid(x)

    @triton.jit
    def _round_bf16(x):
        """Round fp32 to the nearest bfloat16 (ties to even), returned as fp32 that truncates exactly.

        Only for the interpreter, whose fp32 -> bf16 cast truncates; a GPU's cast already rounds to nearest.
        """
        u = x.to(tl.uint32, bitcast=True)
        u = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
        return tl.where(x != x, x, u.to(tl.float32, bitcast=True))  # NaN stays NaN

    @triton.jit
    def to_out_dtype(x, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
        """Cast an fp32 tile to ``dtype`` rounding to nearest, as a GPU does. ``RNE_BF16`` (set under the
        interpreter for bfloat16 outputs) rounds first, so the CPU tests check the GPU's arithmetic."""
        if RNE_BF16:
            x = _round_bf16(x)
        return x.to(dtype)

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = None
    triton_act = to_out_dtype = None
    HAVE_TRITON = False
