"""Dense vs pruned model, end to end, beside the speed-up the removed FLOPs allow (METHOD.md 7, issue 5).

Models: the embedded all-MiniLM-L6-v2, a randomly initialised RoBERTa-base config and a Llama-style (gated MLP)
config. Pruning as ``skillkern prune`` does it: the top 75% of layers keep 2% of their neurons (which neurons does
not change the speed: a fixed random set here), the rest folded into the bias. Providers:

* ``pruned-sliced``: :func:`skillkern.prune.prune_model`, the weights sliced to the kept neurons (the fastest
  path on a CPU, and what ``skillkern prune`` saves);
* ``pruned-masked_ffn``: the dense model run through :func:`skillkern.prune.masked_ffn_model`, the Triton
  ``masked_ffn`` kernel on the dense weights (GPU; on a CPU it would time the index_select reference, which
  re-gathers the weights on every call, so it is only run there when asked for with ``--providers``).

FLOP limit: forward FLOPs of the dense model / of the pruned model, counting every matmul (projections, FFN,
attention scores and values) at the measured batch and sequence length. ``fraction_of_limit`` = measured
speed-up / limit (goal: >= 0.9).

Timing: _common.bench (triton.testing.do_bench on a GPU, its protocol on the CPU), two interleaved rounds of
``--repeats`` calls per provider so that drift in machine load hits every provider alike.

    python benchmarks/bench_pruned_model.py            # CPU: rows added to benchmarks/results/pruned_model_cpu.csv
    python benchmarks/bench_pruned_model.py --device cuda   # float16, both providers -> pruned_model_cuda.csv
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from skillkern.models import ffn_layers, load_model
from skillkern.prune import masked_ffn_model, parse_layers, prune_model

from _common import bench, device_name, quantiles, row, write_rows
from plot import plot

BENCH = "pruned_model"


def build(name: str, device: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModel

    if name == "minilm":
        return load_model("minilm", device=device, dtype=dtype)[0]
    torch.manual_seed(0)
    if name == "roberta-base":
        cfg = AutoConfig.for_model("roberta", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                   intermediate_size=3072, vocab_size=50265, max_position_embeddings=514)
    elif name == "llama-style":
        cfg = AutoConfig.for_model("llama", hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                                   num_key_value_heads=16, intermediate_size=2816, vocab_size=32000,
                                   max_position_embeddings=1024)
    else:
        raise ValueError(name)
    return AutoModel.from_config(cfg).eval().to(device=device, dtype=dtype)


def forward_flops(model, batch: int, seq: int, widths: list[int] | None = None) -> float:
    """Multiply-add FLOPs (2 per MAC) of one forward pass: linear layers + attention scores/values.
    ``widths``: the FFN widths per layer, if not the model's own (a pruned model's)."""
    cfg = model.config
    H = cfg.hidden_size
    tokens = batch * seq
    layers = ffn_layers(model)
    ffn = sum(widths) if widths is not None else sum(layer.width for layer in layers)
    gated = layers[0].gated
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = H // cfg.num_attention_heads
    attn_proj = 2 * H * H + 2 * H * kv * head_dim          # q, o + k, v
    per_token_fixed = len(layers) * (attn_proj + 2 * seq * H)  # + scores and values
    per_token_ffn = ffn * H * (3 if gated else 2)
    return 2.0 * tokens * (per_token_fixed + per_token_ffn)


def pruning_plan(model, keep: float, layers: str) -> tuple[dict, torch.Tensor]:
    """Kept neurons per pruned layer (a fixed random 'keep' fraction) and zero fill values."""
    L = len(ffn_layers(model))
    chosen = parse_layers(layers, L)
    g = torch.Generator().manual_seed(0)
    width = ffn_layers(model)[0].width
    k = int(keep * width + 1e-9)
    keep_idx = {i: torch.randperm(width, generator=g)[:k] for i in chosen}
    return keep_idx, torch.zeros(L, width, dtype=torch.float64)


#: ops whose time scales with the FLOPs the limit counts: the projections, FFN and attention products
MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
              "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_cudnn_attention")


def matmul_time_share(fn, repeats: int) -> float:
    """Share of the self time (CPU, or CUDA kernels on a GPU) that ``fn`` spends in matrix-product ops, by the
    torch profiler. The rest (LayerNorm, activations, softmax outside fused attention, adds, copies, dispatch)
    does not shrink with the removed FLOPs, which is why a small model cannot reach the FLOP limit."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    with profile(activities=acts) as prof:
        for _ in range(repeats):
            fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events)
    mm = sum(getattr(e, attr) for e in events if e.key in MATMUL_OPS)
    return mm / total if total else float("nan")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 / float16 / bfloat16 (default: float16 on CUDA, "
                   "float32 on CPU)")
    p.add_argument("--providers", default=None, help="comma list of sliced, masked_ffn (default: both on CUDA, "
                   "sliced on CPU)")
    p.add_argument("--models", default="minilm,roberta-base,llama-style")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--seqs", default="32,128")
    p.add_argument("--keep", type=float, default=0.02)
    p.add_argument("--layers", default="top:0.75")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--max-tokens", type=int, default=2048, help="skip batch*seq above this on CPU (time budget)")
    p.add_argument("--breakdown", action="store_true", help="also profile the dense model's share of time in "
                   "matrix products (metric matmul_time_share; the profiler's own overhead inflates the rest)")
    p.add_argument("--out", default=None, help="CSV the rows are added to (default "
                   "benchmarks/results/pruned_model_<cpu|cuda>.csv)")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    providers = (args.providers or ("sliced,masked_ffn" if cuda else "sliced")).split(",")
    bad = [x for x in providers if x not in ("sliced", "masked_ffn")]
    if bad:
        p.error(f"unknown providers {bad}: use sliced, masked_ffn")
    dev = device_name(args.device)
    dname = str(dtype).replace("torch.", "")
    rows = []
    for name in args.models.split(","):
        dense = build(name, args.device, dtype)
        keep_idx, fill = pruning_plan(dense, args.keep, args.layers)
        sliced = prune_model(copy.deepcopy(dense), keep_idx, fill) if "sliced" in providers else None
        for b in map(int, args.batches.split(",")):
            for t in map(int, args.seqs.split(",")):
                if not cuda and b * t > args.max_tokens:
                    continue
                ids = torch.randint(5, 1000, (b, t), device=args.device)
                mask = torch.ones_like(ids)
                shape = f"{name}:batch={b}:seq={t}:keep={args.keep}:layers={args.layers}"

                def fwd(model):
                    return lambda: model(input_ids=ids, attention_mask=mask)

                def timed(model, **kw):
                    return bench(fwd(model), device=args.device, repeats=args.repeats, **kw)

                def timed_masked(**kw):
                    with masked_ffn_model(dense, keep_idx, fill):
                        return timed(dense, **kw)

                runs = {"sliced": lambda **kw: timed(sliced, **kw), "masked_ffn": timed_masked}
                with torch.inference_mode():
                    td = timed(dense)
                    tp = {prov: runs[prov]() for prov in providers}
                    # interleave a second round (warm already) so drift in machine load hits every provider alike
                    td += timed(dense, warmup_ms=0)
                    for prov in providers:
                        tp[prov] += runs[prov](warmup_ms=0)
                widths = [len(keep_idx[i]) if i in keep_idx else layer.width
                          for i, layer in enumerate(ffn_layers(dense))]
                limit = forward_flops(dense, b, t) / forward_flops(dense, b, t, widths)
                med_dense = quantiles(td)[0]
                rows += [row(BENCH, "forward", "dense", shape, "time", td, "s", dev, dname),
                         row(BENCH, "forward", "flop-limit", shape, "speedup_vs_dense", [limit], "x", dev, dname)]
                if args.breakdown:
                    with torch.inference_mode():
                        share = matmul_time_share(fwd(dense), args.repeats)
                    rows.append(row(BENCH, "forward", "dense", shape, "matmul_time_share", [share], "fraction", dev,
                                    dname))
                    print(f"{shape}: {share:.0%} of the dense time (profiled) in matrix products", flush=True)
                for prov, times in tp.items():
                    speed = [med_dense / q for q in times]  # spread of the pruned timings against the dense median
                    rows += [row(BENCH, "forward", f"pruned-{prov}", shape, "time", times, "s", dev, dname),
                             row(BENCH, "forward", f"pruned-{prov}", shape, "speedup_vs_dense", speed, "x", dev,
                                 dname),
                             row(BENCH, "forward", f"pruned-{prov}", shape, "fraction_of_limit",
                                 [s / limit for s in speed], "fraction", dev, dname)]
                    med = quantiles(speed)[0]
                    print(f"{shape} {prov}: dense {med_dense * 1e3:.2f} ms, pruned "
                          f"{quantiles(times)[0] * 1e3:.2f} ms, speed-up {med:.2f}x of limit {limit:.2f}x "
                          f"({med / limit:.0%})", flush=True)
    out = args.out or (Path(__file__).parent / "results" / f"pruned_model_{'cuda' if cuda else 'cpu'}.csv")
    write_rows(out, rows)
    print(f"wrote {out} and {plot(Path(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
