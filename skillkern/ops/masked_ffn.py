"""Masked / pruned FFN: the FFN restricted to a kept-neuron index set K, without slicing the weights.

    plain:  y = W2[:, K] @ act(W1[K] x + b1[K]) + b2
    gated:  y = W2[:, K] @ (act(Wg[K] x) * (W1[K] x + b1[K])) + b2        (Llama MLPs: w1 = W_up, w_gate = W_gate)

``b2`` is the output bias the caller has already folded (METHOD.md section 7: ``b2' = b2 + W2[:, pruned] @
fill[pruned]``, ``fill`` the values the pruned neurons are frozen at). With a (G, Kmax) table of index sets and a
per-row ``row_set``, one batch runs several tasks' pruned models from one copy of the weights.

Memory traffic (R rows, K kept neurons, H in, H_out out, e bytes per element)
------------------------------------------------------------------------------
* naive (``masked_ffn_reference``: index_select, then two GEMMs): the gathers read and write K*(H+H_out)
  weights (2x the weight traffic of the model that was sliced ahead of time), GEMM 1 writes R*K, the
  activation reads and writes R*K, GEMM 2 reads R*K; four to five launches.
* the mask-multiply formulation (full FFN, intermediate times a 0/1 mask): reads all D*(H+H_out) weights and
  does all 2*R*D*(H+H_out) FLOPs whatever K is: no speed-up at all.
* ``schedule="fused"`` (this file's main kernel): every weight element of K is read once per row tile,
  gathered in place; the (rows x K-chunk) intermediate lives in registers and never reaches memory. The
  price is the reduction over K: each program adds its (BLOCK_M x H_out) partial output into an fp32 buffer
  with atomics, R*H_out*4 bytes per K chunk, i.e. R*H_out*4*ceil(K/BLOCK_K) bytes of L2 atomics.
* ``schedule="two_pass"``: a gathered up-projection kernel writes the intermediate (R x K, in x.dtype), a
  gathered down-projection kernel reads it back: 2*R*K*e bytes, no atomics, deterministic, one more launch.

Why both, and which one "auto" takes
------------------------------------
Keeping the intermediate on chip costs, per row, H_out*4 bytes of partial output per K chunk, against
2*K*e bytes for writing and reading the intermediate once: the fused form moves fewer bytes only when
``4*H_out*ceil(K/BLOCK_K) < 2*K*e``, i.e. never for BLOCK_K < H_out. Output tiling instead (each program
owns a BLOCK_N slice of y and loops over K) avoids the atomics but recomputes the up-projection
H_out/BLOCK_N times, doubling or worse the FLOPs where FLOPs matter (large R). So fusion pays where the
op is bound by reading the weights and by launch latency -- few rows, the decoding/serving case -- and
loses where it is bound by FLOPs. ``schedule="auto"`` takes the fused kernel while its atomic traffic,
8*R*H_out*ceil(K/BLOCK_K) bytes (read + write), is below the two-pass cost, 2*R*K*e bytes plus the price
of one more launch (``LAUNCH_BYTES``, about 5 us of H100 bandwidth), and the two-pass kernels otherwise.
In fp16 on a 132-SM GPU that is fused up to R = 512 / 128 / 16 rows for BERT-base at 2% / 10% / 50% kept,
and up to R = 32 / 4 / 1 for Llama-7B. Both the model and the tile sizes wait for tuning on a GPU
(benchmarks/bench_masked_ffn.py times both schedules separately).

Layout: W1 and W_gate are gathered by rows (contiguous in nn.Linear layout). W2 is gathered by columns; in
nn.Linear layout (H_out, D), row-major, each kept column is a strided read of one element per 32-byte
sector, which at 2% keep costs up to 16x the bytes of the sliced weights on a GPU. Store W2 transposed
once, ``w2t = W2.t().contiguous()`` of shape (D, H_out), and pass ``w2t.t()``: the kernels take strides, so
that view makes each kept neuron's output weights one contiguous row.

Numerics: products accumulate in fp32 (fp32 inputs: true fp32 products, no TF32); the intermediate is
rounded once to x.dtype before the second product, like PyTorch's low-precision path (which rounds it
twice: after the GEMM and after the activation). The fused schedule sums K chunks with fp32 atomics, in no
fixed order: results can differ run to run in the last fp32 bits (then rounded to x.dtype).

Index sets: ``keep`` must hold indices in [0, D) without duplicates (a duplicate would count a neuron twice:
well defined, but never a pruned FFN, so it is rejected). ``-1`` entries pad the rows of a (G, Kmax) table
and are skipped wherever they are. Rows of different sets: the host sorts rows by set (``argsort``, no host
synchronisation) and every row tile holds rows of one set only; the grid has ceil(R/BLOCK_M) + G row tiles
(an upper bound on the tiles of the sorted layout) and the unused ones return at once. Outputs are written
back to the original row positions, so nothing is permuted in memory.

Registered as ``torch.ops.skillkern.masked_ffn`` (a ``torch.library.custom_op``, a FRAGMENT of the namespace
the compiled extension defines with ``TORCH_LIBRARY``) with a fake implementation, so ``torch.compile``
sees one opaque node; the data-dependent checks run inside the op. Inference only: no autograd formula.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from .activations import (HAVE_TRITON, act_id, apply_act, canonical, check_up_projection, tl, to_out_dtype,
                          triton, triton_act)

logger = logging.getLogger(__name__)

SCHEDULES = ("auto", "fused", "two_pass")
#: the second launch of the two-pass schedule priced in bytes of HBM traffic: about 5 us at H100 bandwidth,
#: launch latency plus draining one kernel and filling the next. Used by schedule="auto"; not yet measured.
LAUNCH_BYTES = 16 << 20

if HAVE_TRITON:

    @triton.jit
    def _row_tile(pid_m, R, rows_ptr, set_rows_ptr, set_tiles_ptr, G, HAS_SETS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
        """Rows (int64 [BLOCK_M]), their mask, and the index set g of row tile ``pid_m`` (g == G: unused tile)."""
        offs = tl.arange(0, BLOCK_M)
        if HAS_SETS:
            # Rows are sorted by set (rows_ptr); set g owns tiles [set_tiles[g], set_tiles[g+1]) and sorted
            # positions [set_rows[g], set_rows[g+1]). g = number of sets whose tiles all come before pid_m.
            offs_g = tl.arange(0, BLOCK_G)
            in_g = offs_g < G
            tile_end = tl.load(set_tiles_ptr + 1 + offs_g, mask=in_g, other=0)
            g = tl.sum(((tile_end <= pid_m) & in_g).to(tl.int64), axis=0)
            gs = tl.minimum(g, G - 1)  # in-bounds loads for an unused tile; its rows are masked below
            start = tl.load(set_rows_ptr + gs) + (pid_m - tl.load(set_tiles_ptr + gs)) * BLOCK_M
            end = tl.where(g < G, tl.load(set_rows_ptr + gs + 1), start)  # scalar select: no rows if unused
            pos = start + offs
            row_mask = pos < end
            rows = tl.load(rows_ptr + pos, mask=row_mask, other=0)
        else:
            g = pid_m * 0
            rows = pid_m * BLOCK_M + offs
            row_mask = rows < R
        return rows, row_mask, g

    @triton.jit
    def _kept(keep_ptr, offs_k, K):
        """Neuron indices of the K positions ``offs_k`` and their mask (past K, or a -1 pad: masked, index 0)."""
        idx = tl.load(keep_ptr + offs_k, mask=offs_k < K, other=-1)
        ok = idx >= 0
        return tl.where(ok, idx, 0), ok

    @triton.jit
    def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """acc + a @ b in fp32."""
        if UPCAST:
            # The interpreter's dot multiplies 16-bit floats as raw integers; widening first is the same math
            # (products of 16-bit floats are exact in fp32, the accumulation is fp32 either way).
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:  # fp32 inputs: true fp32 products like PyTorch's default matmul, not TF32
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _hidden_chunk(x_ptr, w1_ptr, b1_ptr, wg_ptr, rows, row_mask, kidx, k_mask, H,
                      stride_xr, stride_xh, stride_w1d, stride_w1h, stride_wgd, stride_wgh,
                      ACT: tl.constexpr, GATED: tl.constexpr, HAS_B1: tl.constexpr, UPCAST: tl.constexpr,
                      IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
        """The fp32 (BLOCK_M x BLOCK_K) intermediate act(x W1[kidx]^T + b1[kidx]) (or the gated form)."""
        offs_h = tl.arange(0, BLOCK_H)
        x_ptrs = x_ptr + rows[:, None] * stride_xr + offs_h[None, :] * stride_xh
        # [BLOCK_H, BLOCK_K] tile of W1[K]^T: each kept neuron's row of W1 is contiguous along H
        w_ptrs = w1_ptr + kidx[None, :] * stride_w1d + offs_h[:, None] * stride_w1h
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        if GATED:
            g_ptrs = wg_ptr + kidx[None, :] * stride_wgd + offs_h[:, None] * stride_wgh
            acc_g = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            mask_h = (h0 + offs_h) < H
            a = tl.load(x_ptrs, mask=row_mask[:, None] & mask_h[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_h[:, None] & k_mask[None, :], other=0.0)
            acc = _mma(a, w, acc, UPCAST, IEEE)
            if GATED:
                wg = tl.load(g_ptrs, mask=mask_h[:, None] & k_mask[None, :], other=0.0)
                acc_g = _mma(a, wg, acc_g, UPCAST, IEEE)
                g_ptrs += BLOCK_H * stride_wgh
            x_ptrs += BLOCK_H * stride_xh
            w_ptrs += BLOCK_H * stride_w1h
        if HAS_B1:
            acc += tl.load(b1_ptr + kidx, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        # Masked neurons have acc == 0 and every activation maps 0 to 0; their W2 rows are masked anyway.
        if GATED:
            return triton_act(acc_g, ACT) * acc
        else:
            return triton_act(acc, ACT)

    # Row counts, kept counts and set counts change from call to call: not specialised, so one compiled
    # variant serves them all (and the compile gate's table stays small).
    @triton.jit(do_not_specialize=["R", "K", "G", "stride_keep"])
    def _masked_ffn_kernel(x_ptr, w1_ptr, b1_ptr, wg_ptr, w2_ptr, keep_ptr, rows_ptr, set_rows_ptr, set_tiles_ptr,
                           out_ptr, R, H, H_out, K, G,
                           stride_xr, stride_xh, stride_w1d, stride_w1h, stride_wgd, stride_wgh,
                           stride_w2n, stride_w2d, stride_keep,
                           ACT: tl.constexpr, GATED: tl.constexpr, HAS_B1: tl.constexpr,
                           HAS_SETS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, RNE_BF16: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
        """Fused split-K program (row tile, K chunk): intermediate in registers, partial y added to fp32 out."""
        pid_m = tl.program_id(0).to(tl.int64)
        pid_k = tl.program_id(1).to(tl.int64)
        rows, row_mask, g = _row_tile(pid_m, R, rows_ptr, set_rows_ptr, set_tiles_ptr, G, HAS_SETS,
                                      BLOCK_M, BLOCK_G)
        if g >= G:  # unused row tile of the per-set layout
            return
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        kidx, k_mask = _kept(keep_ptr + g * stride_keep, offs_k, K)
        hid = _hidden_chunk(x_ptr, w1_ptr, b1_ptr, wg_ptr, rows, row_mask, kidx, k_mask, H,
                            stride_xr, stride_xh, stride_w1d, stride_w1h, stride_wgd, stride_wgh,
                            ACT, GATED, HAS_B1, UPCAST, IEEE, BLOCK_M, BLOCK_K, BLOCK_H)
        # Round the intermediate once to the weights' dtype (PyTorch's low-precision path rounds it too) so
        # the second product runs on tensor cores.
        hid = to_out_dtype(hid, w2_ptr.dtype.element_ty, RNE_BF16)
        offs_n = tl.arange(0, BLOCK_N)
        # [BLOCK_K, BLOCK_N] tile of W2[:, K]^T: contiguous along N when W2 is stored transposed (see docstring)
        w2_ptrs = w2_ptr + kidx[:, None] * stride_w2d + offs_n[None, :] * stride_w2n
        o_ptrs = out_ptr + rows[:, None] * H_out + offs_n[None, :]
        for n0 in range(0, H_out, BLOCK_N):
            mask_n = (n0 + offs_n) < H_out
            w2 = tl.load(w2_ptrs, mask=k_mask[:, None] & mask_n[None, :], other=0.0)
            part = _mma(hid, w2, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, IEEE)
            # The K chunks of one output meet here: no ordering is needed, only atomicity.
            tl.atomic_add(o_ptrs, part, mask=row_mask[:, None] & mask_n[None, :], sem="relaxed")
            w2_ptrs += BLOCK_N * stride_w2n
            o_ptrs += BLOCK_N

    # Row counts, kept counts and set counts change from call to call: not specialised, so one compiled
    # variant serves them all (and the compile gate's table stays small).
    @triton.jit(do_not_specialize=["R", "K", "G", "stride_keep"])
    def _masked_up_kernel(x_ptr, w1_ptr, b1_ptr, wg_ptr, keep_ptr, rows_ptr, set_rows_ptr, set_tiles_ptr, h_ptr,
                          R, H, K, G,
                          stride_xr, stride_xh, stride_w1d, stride_w1h, stride_wgd, stride_wgh, stride_keep, stride_hr,
                          ACT: tl.constexpr, GATED: tl.constexpr, HAS_B1: tl.constexpr,
                          HAS_SETS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, RNE_BF16: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_G: tl.constexpr):
        """Two-pass, stage 1: program (row tile, K chunk) writes its intermediate tile to h (R x K)."""
        pid_m = tl.program_id(0).to(tl.int64)
        pid_k = tl.program_id(1).to(tl.int64)
        rows, row_mask, g = _row_tile(pid_m, R, rows_ptr, set_rows_ptr, set_tiles_ptr, G, HAS_SETS,
                                      BLOCK_M, BLOCK_G)
        if g >= G:
            return
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        kidx, k_mask = _kept(keep_ptr + g * stride_keep, offs_k, K)
        hid = _hidden_chunk(x_ptr, w1_ptr, b1_ptr, wg_ptr, rows, row_mask, kidx, k_mask, H,
                            stride_xr, stride_xh, stride_w1d, stride_w1h, stride_wgd, stride_wgh,
                            ACT, GATED, HAS_B1, UPCAST, IEEE, BLOCK_M, BLOCK_K, BLOCK_H)
        # The padding columns [K, stride_hr) get act(0) = 0: whole-row masks let the stores vectorise.
        tl.store(h_ptr + rows[:, None] * stride_hr + offs_k[None, :],
                 to_out_dtype(hid, h_ptr.dtype.element_ty, RNE_BF16),
                 mask=row_mask[:, None] & (offs_k < stride_hr)[None, :])

    # Row counts, kept counts and set counts change from call to call: not specialised, so one compiled
    # variant serves them all (and the compile gate's table stays small).
    @triton.jit(do_not_specialize=["R", "K", "G", "stride_keep"])
    def _masked_down_kernel(h_ptr, w2_ptr, b2_ptr, keep_ptr, rows_ptr, set_rows_ptr, set_tiles_ptr, y_ptr,
                            R, H_out, K, G, stride_w2n, stride_w2d, stride_keep, stride_hr,
                            HAS_B2: tl.constexpr, HAS_SETS: tl.constexpr,
                            UPCAST: tl.constexpr, IEEE: tl.constexpr, RNE_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
        """Two-pass, stage 2: program (row tile, output tile) computes y = h @ W2[:, K]^T + b2, plain stores."""
        pid_m = tl.program_id(0).to(tl.int64)
        pid_n = tl.program_id(1).to(tl.int64)
        rows, row_mask, g = _row_tile(pid_m, R, rows_ptr, set_rows_ptr, set_tiles_ptr, G, HAS_SETS,
                                      BLOCK_M, BLOCK_G)
        if g >= G:
            return
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < H_out
        offs_kb = tl.arange(0, BLOCK_K)
        keep_row = keep_ptr + g * stride_keep
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = (k0 + offs_kb).to(tl.int64)
            kidx, k_mask = _kept(keep_row, offs_k, K)
            a = tl.load(h_ptr + rows[:, None] * stride_hr + offs_k[None, :],  # padding columns hold zeros
                        mask=row_mask[:, None] & (offs_k < stride_hr)[None, :], other=0.0)
            w2 = tl.load(w2_ptr + kidx[:, None] * stride_w2d + offs_n[None, :] * stride_w2n,
                         mask=k_mask[:, None] & mask_n[None, :], other=0.0)
            acc = _mma(a, w2, acc, UPCAST, IEEE)
        if HAS_B2:
            acc += tl.load(b2_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * H_out + offs_n[None, :], to_out_dtype(acc, y_ptr.dtype.element_ty, RNE_BF16),
                 mask=row_mask[:, None] & mask_n[None, :])

else:  # pragma: no cover - exercised only where triton is absent
    _masked_ffn_kernel = _masked_up_kernel = _masked_down_kernel = None


# ------------------------------------------------------------------------------------------------ host
def check_masked_ffn_args(x, w1, b1, w2, b2, keep, w_gate, row_set, act: str, backend: str, schedule: str,
                          values: bool = True) -> None:
    """Raise a ValueError naming the problem when the arguments of :func:`masked_ffn` do not fit.

    ``values``: also check index ranges and duplicates (reads ``keep`` and ``row_set``: one host sync)."""
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"masked_ffn: unknown backend {backend!r}; choose one of {dispatch.BACKENDS}")
    if schedule not in SCHEDULES:
        raise ValueError(f"masked_ffn: unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    rows, hidden, width = check_up_projection("masked_ffn", x, w1, b1, w_gate, act, w2=w2, b2=b2)
    if w2.dim() != 2 or w2.shape[1] != width:
        raise ValueError(f"masked_ffn: w2 must have shape (out, {width}) (nn.Linear layout) to match w1 "
                         f"{tuple(w1.shape)}, got {tuple(w2.shape)}")
    if b2 is not None and tuple(b2.shape) != (w2.shape[0],):
        raise ValueError(f"masked_ffn: b2 must have shape ({w2.shape[0]},) to match w2 {tuple(w2.shape)}, "
                         f"got {tuple(b2.shape)}")
    for name, t in (("keep", keep), ("row_set", row_set)):
        if t is None:
            continue
        if t.dtype != torch.int64:
            raise ValueError(f"masked_ffn: {name} must be int64, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"masked_ffn: {name} is on {t.device} but x is on {x.device}")
    if row_set is None:
        if keep is not None and keep.dim() != 1:
            raise ValueError(f"masked_ffn: keep must be 1-D (kept,) without row_set, got shape {tuple(keep.shape)}; "
                             "a (sets, kept) table needs row_set (rows,) naming each row's set")
    else:
        if keep is None or keep.dim() != 2:
            got = "None" if keep is None else f"shape {tuple(keep.shape)}"
            raise ValueError(f"masked_ffn: row_set needs keep as a (sets, kept) table padded with -1, got keep {got}")
        if tuple(row_set.shape) != (rows,):
            raise ValueError(f"masked_ffn: row_set must have shape ({rows},) to match x {tuple(x.shape)}, "
                             f"got {tuple(row_set.shape)}")
    if not values:
        return
    if keep is not None and keep.numel():
        low = -1 if keep.dim() == 2 else 0
        lo, hi = int(keep.min()), int(keep.max())
        if lo < low or hi >= width:
            bad = lo if lo < low else hi
            where = tuple((keep == bad).nonzero()[0].tolist())
            allowed = f"[0, {width})" + (" or -1 (padding)" if low == -1 else "")
            raise ValueError(f"masked_ffn: keep{list(where)} = {bad} is out of range; neuron indices must be in "
                             f"{allowed} for w1 {tuple(w1.shape)}")
        srt = keep.reshape(-1, keep.shape[-1]).sort(dim=-1).values
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if bool(dup.any()):
            s, j = dup.nonzero()[0].tolist()
            which = f"keep[{s}]" if keep.dim() == 2 else "keep"
            raise ValueError(f"masked_ffn: {which} lists neuron {int(srt[s, j])} twice; index sets must not hold "
                             "duplicates (a neuron would be counted twice)")
    if row_set is not None and rows:
        sets = keep.shape[0]
        lo, hi = int(row_set.min()), int(row_set.max())
        if lo < 0 or hi >= sets:
            bad = lo if lo < 0 else hi
            raise ValueError(f"masked_ffn: row_set value {bad} (row {int((row_set == bad).nonzero()[0])}) is out "
                             f"of range [0, {sets}) for keep of shape {tuple(keep.shape)}")


def _sliced_ffn(x, w1, b1, w2, b2, idx, act, w_gate):
    """The FFN with weights sliced to ``idx`` (None: all neurons), by index_select then F.linear."""
    if idx is not None:
        w1 = w1.index_select(0, idx)
        b1 = b1.index_select(0, idx) if b1 is not None else None
        w_gate = w_gate.index_select(0, idx) if w_gate is not None else None
        # W2 stored transposed (a column-major (out, neurons) view): gather whole rows of the stored tensor,
        # several times faster than a column gather on CPU; same values either way.
        w2 = w2.t().index_select(0, idx).t() if w2.stride(0) == 1 and w2.shape[0] > 1 else w2.index_select(1, idx)
    if w_gate is None:
        hid = apply_act(F.linear(x, w1, b1), act)
    else:
        hid = apply_act(F.linear(x, w_gate), act) * F.linear(x, w1, b1)
    return F.linear(hid, w2, b2)


def masked_ffn_reference(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                         b2: Optional[torch.Tensor], keep: Optional[torch.Tensor] = None, *, act: str = "gelu",
                         w_gate: Optional[torch.Tensor] = None,
                         row_set: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PyTorch reference of :func:`masked_ffn` (the specification; no argument checks): index_select the
    weights, then F.linear in ``x.dtype``; with ``row_set``, one such FFN per index set over its rows.
    Returns y: (rows, out)."""
    act = canonical(act)
    if row_set is None:
        return _sliced_ffn(x, w1, b1, w2, b2, keep, act, w_gate)
    y = x.new_empty((x.shape[0], w2.shape[0]))
    for g in range(keep.shape[0]):
        sel = (row_set == g).nonzero().squeeze(1)
        if sel.numel():
            idx = keep[g][keep[g] >= 0]
            y[sel] = _sliced_ffn(x.index_select(0, sel), w1, b1, w2, b2, idx, act, w_gate)
    return y


def _pick_schedule(rows: int, kept: int, out: int, esize: int, block_k: int) -> str:
    """'fused' while its atomic traffic is below the two-pass cost (see the module docstring)."""
    fused = 8 * rows * out * triton.cdiv(kept, block_k)
    two_pass = 2 * rows * kept * esize + LAUNCH_BYTES
    return "fused" if fused <= two_pass else "two_pass"


#: the largest BLOCK_M x BLOCK_K intermediate tile one program holds in registers, by (fp32 inputs, gated): the
#: second product reads it as an operand beside the W2 tile and the fp32 partial output; larger tiles spill on
#: sm_80 (measured by the compile gate, benchmarks/results/kernel_resources.csv). fp32 runs its products on the
#: FMA units (no TF32), whose operand layouts cost more registers than tensor-core fragments.
_TILE_BUDGET = {(False, False): 2048, (False, True): 1024, (True, False): 512, (True, True): 512}


def _configs(rows: int, kept: int, out: int, dtype: torch.dtype, gated: bool, target: dispatch.LaunchTarget) -> dict:
    """Tile sizes for the fused kernel and the two two-pass kernels, chosen so that no configuration spills
    registers on sm_80 or sm_90 (the compile gate checks every one). Not autotuned yet (no GPU timing here).

    * ``BLOCK_M`` (rows): 16 / 32 / 64 by the row count, 128 for the FLOP-bound two-pass kernels at >= 1024 rows.
    * ``BLOCK_K`` (kept neurons per program): the largest of 64 / 32 / 16 that fits :data:`_TILE_BUDGET` and
      still gives two programs per SM (with few rows, parallelism comes from splitting K).
    * ``BLOCK_H`` (the reduction chunk of the up-projection): 64 for 16-bit inputs (tensor cores), 16 for fp32
      (FMA products hold whole operand rows per thread).
    * ``BLOCK_N`` (output columns): 64, or 32 for fp32 and when rows are too few to fill the GPU.
    * ``num_warps`` / ``num_stages``: 4 / 3, and 8 / 2 for the fused kernel's fp32 tiles of 64 rows: with 4 warps
      (Triton 3.6's ptxas) or 3 stages (3.9's) ptxas trades a few spilled bytes for the occupancy the shared
      memory allows; 8 warps and 2 stages spill with neither.
    """
    fp32 = dtype == torch.float32
    if target.interpreted:
        # tl.dot needs every block >= 16; the interpreter runs each program as numpy work, so small tiles and
        # few programs keep the tests fast while still cutting every dimension into ragged chunks.
        bm = 16 if rows <= 16 else 32
        base = dict(BLOCK_M=bm, BLOCK_K=32, BLOCK_H=32, BLOCK_N=32)
        return dict(fused=base, up=dict(base, BLOCK_N=None), down=dict(base, BLOCK_H=None))
    bm = 16 if rows <= 16 else 32 if rows <= 32 else 64
    tiles_m = triton.cdiv(rows, bm)
    want = 2 * target.sms
    budget = _TILE_BUDGET[(fp32, gated)]
    fitting = [c for c in (64, 32, 16) if bm * c <= budget] or [16]
    bk = next((c for c in fitting if tiles_m * triton.cdiv(kept, c) >= want), fitting[-1])
    bh = 16 if fp32 else 64
    bn = 32 if fp32 else 64
    warps, stages = (8, 2) if fp32 and bm == 64 else (4, 3)
    fused = dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_H=bh, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    if rows >= 1024 and not fp32:  # FLOP-bound: tensor-core sized tiles (two accumulators when gated)
        up = dict(BLOCK_M=128, BLOCK_K=64 if gated else 128, BLOCK_H=32, num_warps=8, num_stages=3)
        down = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)
    else:
        up = dict(BLOCK_M=bm, BLOCK_K=max(bk, 32) if bm * 32 <= budget else bk, BLOCK_H=bh, num_warps=4,
                  num_stages=3)
        # the down kernel's programs are tiles_m * out/BLOCK_N: narrower output tiles when rows are few
        bn_down = 64 if not fp32 and tiles_m * triton.cdiv(out, 64) >= want else 32
        down = dict(BLOCK_M=bm, BLOCK_N=bn_down, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(fused=fused, up=up, down=down)


class _RowSets:
    """The rows of one call grouped by index set, as the kernels read them, built on the device with no host sync.

    Attributes:
        count: G, the number of index sets (1 without ``row_set``).
        keep: the (K,) or (G, Kmax) index table (``keep=None``, every neuron: an explicit 0..D-1 list, so the
            kernels have one code path).
        rows: the rows sorted by set; ``first``: the first sorted position of each set (G + 1,).
        extra_tiles: row tiles added to the grid (each set starts a new tile: at most G more).
    Without ``row_set`` the pointers are placeholders of constexpr-off branches, never read.
    """

    def __init__(self, keep: Optional[torch.Tensor], row_set: Optional[torch.Tensor], kept: int, device):
        self._dummy = torch.empty(1, dtype=torch.int64, device=device)
        self._counts = None
        if row_set is None:
            self.count, self.extra_tiles = 1, 0
            self.keep = keep if keep is not None else torch.arange(kept, device=device)
            self.rows = self.first = self._dummy
            return
        self.count = self.extra_tiles = keep.shape[0]
        self.keep = keep
        self.rows = torch.argsort(row_set, stable=True)
        self._counts = torch.zeros(self.count, dtype=torch.int64, device=device)
        self._counts.index_add_(0, row_set, torch.ones_like(row_set))  # bincount without a data-dependent size
        self.first = torch.zeros(self.count + 1, dtype=torch.int64, device=device)
        torch.cumsum(self._counts, 0, out=self.first[1:])

    def tiles(self, block_m: int) -> torch.Tensor:
        """(G + 1,) the first row tile of each set when each set's rows are laid out in whole tiles of
        ``block_m`` rows."""
        if self._counts is None:
            return self._dummy
        tiles = torch.zeros(self.count + 1, dtype=torch.int64, device=self._counts.device)
        torch.cumsum((self._counts + block_m - 1) // block_m, 0, out=tiles[1:])
        return tiles


@dispatch.register("masked_ffn", "triton")
def masked_ffn_triton(x, w1, b1, w2, b2, keep, *, act: str = "gelu", w_gate=None, row_set=None,
                      schedule: str = "auto") -> torch.Tensor:
    """Launch the Triton kernels (no argument checks; see :func:`masked_ffn`). Returns (rows, out) in x.dtype.

    ``x``, ``w1``, ``w_gate``, ``w2`` may have any strides (passed to the kernels); ``b1``, ``b2``, ``keep``,
    ``row_set`` contiguous (the host boundary, :func:`masked_ffn_host`, does it)."""
    rows, hidden = x.shape
    out = w2.shape[0]
    kept = w1.shape[0] if keep is None else keep.shape[-1]
    dev = x.device
    if rows == 0 or out == 0 or kept == 0:
        y = torch.zeros((rows, out), dtype=x.dtype, device=dev)
        return y.add_(b2) if b2 is not None else y
    target = dispatch.launch_target(dev)
    interpreted = target.interpreted
    cfg = _configs(rows, kept, out, x.dtype, w_gate is not None, target)
    if schedule == "auto":
        schedule = _pick_schedule(rows, kept, out, x.element_size(), cfg["fused"]["BLOCK_K"])
    sets = _RowSets(keep, row_set, kept, dev)
    block_g = triton.next_power_of_2(sets.count)
    gate = w_gate if w_gate is not None else w1
    common = dict(ACT=act_id(act), GATED=w_gate is not None, HAS_B1=b1 is not None,
                  HAS_SETS=row_set is not None, UPCAST=interpreted and x.dtype != torch.float32,
                  IEEE=x.dtype == torch.float32 or interpreted,
                  RNE_BF16=interpreted and x.dtype == torch.bfloat16, BLOCK_G=block_g)
    bias1 = b1 if b1 is not None else x
    stride_keep = keep.stride(0) if (keep is not None and keep.dim() == 2) else 0
    x_strides = (x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), gate.stride(0), gate.stride(1))

    with dispatch.device_guard(dev):
        if schedule == "fused":
            c = cfg["fused"]
            acc = torch.zeros((rows, out), dtype=torch.float32, device=dev)
            if b2 is not None:
                acc.add_(b2)
            grid = (triton.cdiv(rows, c["BLOCK_M"]) + sets.extra_tiles, triton.cdiv(kept, c["BLOCK_K"]))
            dispatch.launch(
                _masked_ffn_kernel, grid,
                x, w1, bias1, gate, w2, sets.keep, sets.rows, sets.first, sets.tiles(c["BLOCK_M"]), acc,
                rows, hidden, out, kept, sets.count, *x_strides, w2.stride(0), w2.stride(1), stride_keep,
                **common, **c)
            return acc.to(x.dtype)
        cu, cd = cfg["up"], cfg["down"]
        # Rows padded to 64 elements: the row stride is then divisible by 16, which lets Triton vectorise.
        hid = torch.empty((rows, triton.cdiv(kept, 64) * 64), dtype=x.dtype, device=dev)
        grid = (triton.cdiv(rows, cu["BLOCK_M"]) + sets.extra_tiles, triton.cdiv(kept, cu["BLOCK_K"]))
        dispatch.launch(
            _masked_up_kernel, grid,
            x, w1, bias1, gate, sets.keep, sets.rows, sets.first, sets.tiles(cu["BLOCK_M"]), hid,
            rows, hidden, kept, sets.count, *x_strides, stride_keep, hid.stride(0), **common, **cu)
        y = torch.empty((rows, out), dtype=x.dtype, device=dev)
        grid = (triton.cdiv(rows, cd["BLOCK_M"]) + sets.extra_tiles, triton.cdiv(out, cd["BLOCK_N"]))
        dispatch.launch(
            _masked_down_kernel, grid,
            hid, w2, b2 if b2 is not None else x, sets.keep, sets.rows, sets.first, sets.tiles(cd["BLOCK_M"]), y,
            rows, out, kept, sets.count, w2.stride(0), w2.stride(1), stride_keep, hid.stride(0),
            HAS_B2=b2 is not None, HAS_SETS=row_set is not None,
            UPCAST=common["UPCAST"], IEEE=common["IEEE"], RNE_BF16=common["RNE_BF16"], BLOCK_G=block_g, **cd)
        return y


@dispatch.register("masked_ffn", "torch")
def _masked_ffn_torch(x, w1, b1, w2, b2, keep, *, act: str = "gelu", w_gate=None, row_set=None,
                      schedule: str = "auto") -> torch.Tensor:
    return masked_ffn_reference(x, w1, b1, w2, b2, keep, act=act, w_gate=w_gate, row_set=row_set)


def masked_ffn_host(x, w1, b1, w2, b2, keep, w_gate, row_set, act: str, backend: str, schedule: str,
                    check: bool) -> torch.Tensor:
    """Check the inputs, choose the backend, run. The body of the registered op ``skillkern::masked_ffn``.

    The host boundary: ``x`` and the weights keep their strides; biases and index tables are made
    contiguous (the kernels read them as dense vectors)."""
    check_masked_ffn_args(x, w1, b1, w2, b2, keep, w_gate, row_set, act, backend, schedule, values=check)
    impl = dispatch.implementation("masked_ffn", backend, x.device)
    b1, b2, keep, row_set = (t.contiguous() if t is not None else None for t in (b1, b2, keep, row_set))
    return impl.fn(x, w1, b1, w2, b2, keep, act=act, w_gate=w_gate, row_set=row_set, schedule=schedule)


@torch.library.custom_op("skillkern::masked_ffn", mutates_args=())
def _masked_ffn_op(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                   b2: Optional[torch.Tensor], keep: Optional[torch.Tensor], w_gate: Optional[torch.Tensor],
                   row_set: Optional[torch.Tensor], act: str, backend: str, schedule: str,
                   check: bool) -> torch.Tensor:
    return masked_ffn_host(x, w1, b1, w2, b2, keep, w_gate, row_set, act, backend, schedule, check)


@_masked_ffn_op.register_fake
def _masked_ffn_fake(x, w1, b1, w2, b2, keep, w_gate, row_set, act, backend, schedule, check):
    # Shape and dtype only; the data-dependent checks (index ranges, duplicates) run in the real op.
    return x.new_empty((x.shape[0], w2.shape[0]))


def masked_ffn(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
               b2: Optional[torch.Tensor], keep: Optional[torch.Tensor] = None, *, act: str = "gelu",
               w_gate: Optional[torch.Tensor] = None, row_set: Optional[torch.Tensor] = None,
               backend: str = "auto", schedule: str = "auto", check: bool = True) -> torch.Tensor:
    """The FFN restricted to kept neurons, without slicing the weights.

    ``y = W2[:, K] @ act(W1[K] x + b1[K]) + b2``; gated (``w_gate`` given):
    ``y = W2[:, K] @ (act(Wg[K] x) * (W1[K] x + b1[K])) + b2``.

    Args:
        x: (..., hidden) float32, float16 or bfloat16; leading dimensions are flattened into rows.
        w1: (neurons, hidden) up-projection in nn.Linear layout (``W_up`` of a gated MLP), dtype of x.
        b1: (neurons,) or None.
        w2: (out, neurons) down-projection in nn.Linear layout. Any strides: ``w2t.t()`` of a contiguous
            (neurons, out) tensor makes the kept columns contiguous on a GPU (see the module docstring).
        b2: (out,) the already folded output bias, or None.
        keep: (kept,) int64 neuron indices in [0, neurons), no duplicates, any order; None keeps all. Or, with
            ``row_set``, a (sets, max_kept) int64 table of index sets padded with -1.
        act: ``gelu``, ``gelu_tanh``, ``relu``, ``silu`` or a transformers alias (``gelu_new``, ``swish``...).
        w_gate: (neurons, hidden) gate projection of a gated MLP, or None.
        row_set: x.shape[:-1] int64: the index set (row of ``keep``) each row uses, or None.
        backend: ``"auto"``, ``"torch"`` (index_select + F.linear) or ``"triton"``: see
            :mod:`skillkern.ops.dispatch` (there is no compiled ``ext`` implementation of this op).
        schedule: Triton only: ``"fused"`` (intermediate on chip, split-K), ``"two_pass"`` or ``"auto"``
            (chosen from the traffic model in the module docstring).
        check: check index ranges and duplicates (one host sync); shapes, dtypes and devices are always checked.

    Returns:
        y: (..., out) in ``x.dtype``. With an empty ``keep``, y = b2 broadcast (zeros without b2).
    """
    if x.dim() == 0:
        raise ValueError("masked_ffn: x must have at least one dimension (..., hidden), got a scalar")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if row_set is not None:
        if tuple(row_set.shape) != tuple(lead):
            raise ValueError(f"masked_ffn: row_set must have shape {tuple(lead)} to match x {tuple(x.shape)}, "
                             f"got {tuple(row_set.shape)}")
        row_set = row_set.reshape(-1)
    y = torch.ops.skillkern.masked_ffn(x2, w1, b1, w2, b2, keep, w_gate, row_set, canonical(act), backend,
                                       schedule, check)
    return y.reshape(*lead, w2.shape[0])
