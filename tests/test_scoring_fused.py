"""The scorer's fused path (one ``ffn_stats`` call per layer replaces the up-projection + activation) against the
hook path, on the shared tiny random model of every row of the architecture table (pool ``slots``), and with
every pool on the three FFN shapes: BERT (nn.Linear, erf GELU), GPT-2 (Conv1D weights stored (in, out), tanh GELU)
and Llama (gated, SiLU, no bias).

What is compared, fused (``backend="triton"``) vs hooks (``backend="torch"``), pools cls / last / slots:

* thresholds: the fused kernel's h and PyTorch's differ by fp32 GEMM rounding only. With hidden size 32 and
  HF's init (weights ~N(0, 0.02)), |x . w| summed over the 32 terms is < 1, so either GEMM is within
  32 * 2^-24 * 1 ~ 2e-6 of the exact value, and so is the mean of such values: THR_TOL = 1e-5 leaves 5x room and
  is still 1000x smaller than the spread of the thresholds (~1e-2), so a wrong row or slot would fail it.
* counts: equal except where an evaluation activation lies within THR_TOL of its threshold (there either side
  is right); every differing cell must have at least as many such activations as it differs by.
* the model's outputs while the fused path runs: close to an unobserved forward (same bound, propagated).
* afterwards no patched ``forward`` and no hook is left; mean pooling falls back to the hooks.

Triton runs on CPU only under ``TRITON_INTERPRET=1`` (set before Python starts, as CI does); shapes are tiny.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from skillkern.models import ffn_layers
from skillkern.ops.activations import HAVE_TRITON
from skillkern.ops.dispatch import triton_interpreted
from skillkern.scoring import NonFiniteActivationError, ScoreSettings, Scorer
from tiny_models import VOCAB, WIDTH, shared_tiny_model

transformers = pytest.importorskip("transformers")

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not (HAVE_TRITON and (CUDA or triton_interpreted())),
    reason="triton not importable" if not HAVE_TRITON else
    "no CUDA GPU and TRITON_INTERPRET=1 was not set before Python started (the kernels run in the interpreter)")

DEVICE = "cuda" if CUDA else "cpu"
THR_TOL = 1e-5  # see the module docstring
MAX_LEN = 16
N_BASE, N_EVAL = 12, 10
SHAPES = ["bert", "gpt2", "llama"]  # the three FFN shapes: every pool
POOLS = [("cls", None), ("last", None)]  # and slots, on every row

pytestmark = [pytestmark, pytest.mark.usefixtures("one_thread")]


class WordTokenizer:
    """Enough of a tokenizer for the scorer: words hashed to ids, right padding done by the scorer."""

    pad_token_id = 0

    def __call__(self, texts, pairs=None, truncation=True, max_length=MAX_LEN):
        ids = [[3 + sum(map(ord, w)) % (VOCAB - 3) for w in t.split()][:max_length] for t in texts]
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}


def examples(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    words = [f"w{i}" for i in range(40)]
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 14, (1,), generator=g))
        text = " ".join(words[int(i)] for i in torch.randint(0, 40, (length,), generator=g))
        out.append({"text": text, "label": int(torch.randint(0, 2, (1,), generator=g))})
    return out


def tiny_model(model_type: str) -> nn.Module:
    return shared_tiny_model(model_type, device=DEVICE)


def settings(pool, slots, backend, **kw) -> ScoreSettings:
    return ScoreSettings(pool=pool, slots=slots, max_length=MAX_LEN, batch_size=6, pad_multiple=8, backend=backend,
                         **kw)


def leftovers(model: nn.Module) -> list[str]:
    """Modules with a patched forward or any hook left on them."""
    return [name or "<root>" for name, mod in model.named_modules()
            if "forward" in mod.__dict__ or mod._forward_pre_hooks or mod._forward_hooks
            or mod._forward_pre_hooks_with_kwargs or mod._forward_hooks_with_kwargs]


def eval_activations(model, pool, slots, which="neuron") -> tuple[torch.Tensor, torch.Tensor]:
    """(L, N, S, D) float64 tracked activations of the evaluation split (hook path) and the (N,) labels."""
    seen: dict[int, list] = {}
    scorer = Scorer(model, WordTokenizer(), 2, settings(pool, slots, "torch", which=which), progress=False)
    stats = scorer.new_stats()
    real_add = stats.add_rows

    def add_rows(layer, h, slot, label, **kw):
        seen.setdefault(layer, []).append(h.double().view(-1, scorer.settings.num_slots, h.shape[-1]).cpu())
        real_add(layer, h, slot, label, **kw)

    stats.add_rows = add_rows
    stats.threshold = torch.zeros(2, scorer.settings.num_slots, WIDTH, dtype=torch.float64, device=DEVICE)
    ev = examples(N_EVAL, seed=2)
    scorer.run_pass(stats, ev)
    acts = torch.stack([torch.cat(seen[layer]) for layer in sorted(seen)])
    # iter_batches groups by padded length: recover the label order the rows came in
    labels = torch.cat([b.labels.cpu() for b in _batches(ev, scorer.settings)])
    return acts, labels


def _batches(exs, s):
    from skillkern.scoring import iter_batches

    return list(iter_batches(WordTokenizer(), exs, s.batch_size, s.max_length, s.pad_multiple))


def test_fused_scorer_equals_hook_scorer_on_every_row(model_type):
    compare_paths(model_type, "slots", (0, 3, 1))


@pytest.mark.parametrize("model_type", SHAPES)
@pytest.mark.parametrize("pool,slots", POOLS, ids=[p for p, _ in POOLS])
def test_fused_scorer_equals_hook_scorer(model_type, pool, slots):
    compare_paths(model_type, pool, slots)


def test_fused_gate_neurons_of_gated_mlp():
    """which='gate' (act(W_gate x) of a gated MLP): the gate projection is fused, the up branch runs as usual."""
    compare_paths("llama", "last", None, which="gate")


def compare_paths(model_type, pool, slots, which="neuron"):
    model = tiny_model(model_type)
    base, ev = examples(N_BASE, seed=1), examples(N_EVAL, seed=2)
    ref_scorer = Scorer(model, WordTokenizer(), 2, settings(pool, slots, "torch", which=which), progress=False)
    ref = ref_scorer.score(base, ev)
    assert ref_scorer.path == "hooks"

    # plain forwards for the output comparison, batch by batch as the scorer runs them
    s = settings(pool, slots, "triton", which=which)
    with torch.inference_mode():
        plain = [model(**b.inputs).last_hidden_state for b in _batches(base, s) + _batches(ev, s)]
    outputs = []
    scorer = Scorer(model, WordTokenizer(), 2, s, progress=False,
                    forward=lambda m, b: outputs.append(m(**b.inputs).last_hidden_state))
    assert scorer.fused_path_reason() is None
    got = scorer.score(base, ev)
    assert scorer.path == "fused"
    assert not leftovers(model), f"left patched/hooked: {leftovers(model)}"

    assert len(outputs) == len(plain)
    for a, b in zip(outputs, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # h within THR_TOL, through 2 small layers

    assert torch.equal(got.baseline_class_count, ref.baseline_class_count)
    assert torch.equal(got.eval_class_count, ref.eval_class_count)
    torch.testing.assert_close(got.threshold, ref.threshold, rtol=0, atol=THR_TOL)
    torch.testing.assert_close(got.sums, ref.sums, rtol=0, atol=THR_TOL * N_BASE)

    # counts: differ only where an activation is within THR_TOL of the threshold
    acts, labels = eval_activations(model, pool, slots, which)             # (L, N, S, D), (N,)
    near = (acts - ref.threshold.cpu()[:, None]).abs() < THR_TOL            # (L, N, S, D)
    near_per_class = torch.stack([near[:, labels == c].sum(1) for c in range(2)], dim=2)  # (L, S, C, D)
    diff = (got.above.cpu() - ref.above.cpu()).abs()
    assert bool((diff <= near_per_class).all()), (
        f"{int((diff > near_per_class).sum())} count cells differ without an activation near the threshold")
    assert int(ref.above.sum()) > 0 and int(ref.above.sum()) < N_EVAL * acts.shape[0] * acts.shape[2] * WIDTH


def test_mean_pool_falls_back_to_hooks(caplog):
    model = tiny_model("bert")
    base, ev = examples(N_BASE, seed=1), examples(N_EVAL, seed=2)
    scorer = Scorer(model, WordTokenizer(), 2, settings("mean", None, "triton"), progress=False)
    assert "pool 'mean'" in scorer.fused_path_reason()
    with caplog.at_level(logging.INFO, logger="skillkern.scoring"):
        got = scorer.score(base, ev)
    assert scorer.path == "hooks" and "not using the fused FFN kernel" in caplog.text
    ref = Scorer(model, WordTokenizer(), 2, settings("mean", None, "torch"), progress=False).score(base, ev)
    torch.testing.assert_close(got.threshold, ref.threshold, rtol=1e-12, atol=1e-12)  # same h: float64 order only
    assert torch.equal(got.above, ref.above)
    assert not leftovers(model)


def test_auto_and_skip_never_fuse_on_cpu():
    model = tiny_model("bert")
    auto = Scorer(model, WordTokenizer(), 2, settings("cls", None, "auto"), progress=False)
    assert (auto.fused_path_reason() is None) == CUDA
    skip = Scorer(model, WordTokenizer(), 2, settings("cls", None, "triton"), progress=False, nonfinite="skip")
    assert "nonfinite='skip'" in skip.fused_path_reason()


def test_unsupported_activation_falls_back(caplog, monkeypatch):
    model = tiny_model("bert")
    monkeypatch.setattr(model.config, "hidden_act", "quick_gelu")
    scorer = Scorer(model, WordTokenizer(), 2, settings("cls", None, "triton"), progress=False)
    assert "quick_gelu" in scorer.fused_path_reason()
    with caplog.at_level(logging.WARNING, logger="skillkern.scoring"):
        scorer.score(examples(6, 1), examples(6, 2))
    assert scorer.path == "hooks" and "quick_gelu" in caplog.text
    # a config naming a supported activation the module does not compute is caught by the probe
    monkeypatch.setattr(model.config, "hidden_act", "relu")
    assert "does not compute 'relu'" in scorer.fused_path_reason()


def test_nonfinite_raises_on_fused_path_and_patches_are_undone():
    model = tiny_model("llama")
    layer = ffn_layers(model)[1]
    with torch.no_grad():
        saved = layer.up.weight[5].clone()
        layer.up.weight[5] = float("nan")
    try:
        scorer = Scorer(model, WordTokenizer(), 2, settings("cls", None, "triton"), progress=False)
        with pytest.raises(NonFiniteActivationError, match="layer 1"):
            scorer.score(examples(6, 1), examples(6, 2))
        assert scorer.path == "fused"
    finally:
        with torch.no_grad():
            layer.up.weight[5] = saved
    assert not leftovers(model)
