"""Dense vs pruned model, end to end, beside the speed-up the removed FLOPs allow (METHOD.md 7, issue 5).

Models: the embedded all-MiniLM-L6-v2, a randomly initialised RoBERTa-base config and a Llama-style (gated MLP)
config. Pruning as ``skillkern prune`` does it: the top 75% of layers keep 2% of their neurons (which neurons does
not change the speed: a fixed random set here), the rest folded into the bias, weights sliced (on CPU the sliced
dense weights are the fastest path; the masked_ffn kernel is for GPUs).

FLOP limit: forward FLOPs of the dense model / of the pruned model, counting every matmul (projections, FFN,
attention scores and values) at the measured batch and sequence length. ``fraction_of_limit`` = measured
speed-up / limit (goal: >= 0.9).

    python benchmarks/bench_pruned_model.py            # CPU results -> benchmarks/results/pruned_model_cpu.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from _common import device_name, row, time_it, write_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skillkern.models import ffn_layers, load_model  # noqa: E402
from skillkern.prune import parse_layers, prune_model  # noqa: E402

BENCH = "pruned_model"


def build(name: str, device: str):
    from transformers import AutoConfig, AutoModel

    if name == "minilm":
        return load_model("minilm", device=device)[0]
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
    return AutoModel.from_config(cfg).eval().to(device)


def forward_flops(model, batch: int, seq: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of one forward pass: linear layers + attention scores/values."""
    cfg = model.config
    H = cfg.hidden_size
    tokens = batch * seq
    layers = ffn_layers(model)
    ffn = sum(layer.width for layer in layers)
    gated = layers[0].gated
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = H // cfg.num_attention_heads
    attn_proj = 2 * H * H + 2 * H * kv * head_dim          # q, o + k, v
    per_token_fixed = len(layers) * (attn_proj + 2 * seq * H)  # + scores and values
    per_token_ffn = ffn * H * (3 if gated else 2)
    return 2.0 * tokens * (per_token_fixed + per_token_ffn)


def pruned_copy(model, keep: float, layers: str):
    import copy

    m = copy.deepcopy(model)
    L = len(ffn_layers(m))
    chosen = parse_layers(layers, L)
    g = torch.Generator().manual_seed(0)
    width = ffn_layers(m)[0].width
    k = int(keep * width + 1e-9)
    keep_idx = {i: torch.randperm(width, generator=g)[:k] for i in chosen}
    baseline = torch.zeros(L, width, dtype=torch.float64)
    return prune_model(m, keep_idx, baseline)


def plot(csv_path: Path) -> Path:
    """Measured speed-up beside the FLOP limit, one panel per model, one bar pair per (batch, seq)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in csv.DictReader(open(csv_path)) if r["metric"] == "speedup_vs_dense"]
    models = sorted({r["shape"].split(":")[0] for r in rows}, key=lambda m: [r["shape"] for r in rows].index(
        next(r["shape"] for r in rows if r["shape"].startswith(m + ":"))))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        shapes = [r["shape"] for r in rows if r["shape"].startswith(m + ":") and r["provider"] == "flop-limit"]
        labels = [":".join(x.split(":")[1:3]).replace("batch=", "b").replace("seq=", "t") for x in shapes]
        meas = [next(r for r in rows if r["shape"] == x and r["provider"] == "pruned-sliced") for x in shapes]
        lim = [float(next(r for r in rows if r["shape"] == x and r["provider"] == "flop-limit")["median"])
               for x in shapes]
        xs = range(len(shapes))
        med = [float(r["median"]) for r in meas]
        err = [[v - float(r["p20"]) for v, r in zip(med, meas)], [float(r["p80"]) - v for v, r in zip(med, meas)]]
        ax.bar([x - 0.2 for x in xs], med, 0.4, yerr=err, capsize=3, label="measured (pruned, sliced weights)")
        ax.bar([x + 0.2 for x in xs], lim, 0.4, color="lightgrey", label="FLOP limit")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(m, fontsize=10)
        ax.axhline(1, color="k", lw=0.6)
    axes[0][0].set_ylabel("speed-up over dense")
    axes[0][0].legend(fontsize=7, loc="lower right")
    dev = rows[0]["device"] if rows else ""
    fig.suptitle(f"2% of neurons kept in the top 75% of layers, end to end; {dev}", fontsize=10)
    fig.tight_layout()
    out = csv_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="minilm,roberta-base,llama-style")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--seqs", default="32,128")
    p.add_argument("--keep", type=float, default=0.02)
    p.add_argument("--layers", default="top:0.75")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--max-tokens", type=int, default=2048, help="skip batch*seq above this on CPU (time budget)")
    p.add_argument("--out", default=None)
    p.add_argument("--plot-only", default=None, help="redraw the PNG of this CSV")
    args = p.parse_args()
    if args.plot_only:
        print(f"wrote {plot(Path(args.plot_only))}")
        return 0
    dev = device_name(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    rows = []
    for name in args.models.split(","):
        dense = build(name, args.device)
        pruned = pruned_copy(dense, args.keep, args.layers)
        for b in map(int, args.batches.split(",")):
            for t in map(int, args.seqs.split(",")):
                if args.device == "cpu" and b * t > args.max_tokens:
                    continue
                ids = torch.randint(5, 1000, (b, t), device=args.device)
                mask = torch.ones_like(ids)
                shape = f"{name}:batch={b}:seq={t}:keep={args.keep}:layers={args.layers}"
                with torch.inference_mode():
                    td = time_it(lambda: dense(input_ids=ids, attention_mask=mask), args.repeats, sync=sync)
                    tp = time_it(lambda: pruned(input_ids=ids, attention_mask=mask), args.repeats, sync=sync)
                    # interleave a second round so drift in machine load hits both
                    td += time_it(lambda: dense(input_ids=ids, attention_mask=mask), args.repeats, 0, sync)
                    tp += time_it(lambda: pruned(input_ids=ids, attention_mask=mask), args.repeats, 0, sync)
                limit = forward_flops(dense, b, t) / forward_flops(pruned, b, t)
                med_dense = sorted(td)[len(td) // 2]
                speed = [med_dense / q for q in tp]  # spread of the pruned timings against the dense median
                rows += [row(BENCH, "forward", "dense", shape, "time", td, "s", dev),
                         row(BENCH, "forward", "pruned-sliced", shape, "time", tp, "s", dev),
                         row(BENCH, "forward", "pruned-sliced", shape, "speedup_vs_dense", speed, "x", dev),
                         row(BENCH, "forward", "flop-limit", shape, "speedup_vs_dense", [limit], "x", dev),
                         row(BENCH, "forward", "pruned-sliced", shape, "fraction_of_limit",
                             [s / limit for s in speed], "x", dev)]
                med = sorted(speed)[len(speed) // 2]
                print(f"{shape}: dense {sorted(td)[len(td) // 2] * 1e3:.1f} ms, pruned "
                      f"{sorted(tp)[len(tp) // 2] * 1e3:.1f} ms, speed-up {med:.2f}x of limit {limit:.2f}x "
                      f"({med / limit:.0%})", flush=True)
    out = args.out or (Path(__file__).parent / "results" /
                       f"pruned_model_{'gpu' if args.device.startswith('cuda') else 'cpu'}.csv")
    write_rows(out, rows)
    print(f"wrote {out} and {plot(Path(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
