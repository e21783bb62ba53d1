"""Pruning criteria (skillkern.prune: skill, flap, wanda, magnitude, random; FLAP's adaptive widths).

Each criterion's ranking is checked against a brute-force computation on a tiny model of each FFN shape (BERT:
nn.Linear; GPT-2: Conv1D, whose weight is stored (in, out); Llama: gated, the neuron is down_proj's input): the
activations of every real position stored in float64, the W2 columns read from the module weights directly.
Then ``prune_run`` end to end on a tuned, scored toy run: every criterion keeps the same count per layer, folds
the pruned neurons at the moments' mean, records its statistics, and reuses a moments file of the same run only.
"""

from __future__ import annotations

import json

import pytest
import torch

from skillkern.models import edit_neurons
from skillkern.prune import CRITERIA, criterion_scores, flap_adaptive_counts, select_neurons
from test_scoring_moments import examples, moments_of, stored_activations
from tiny_models import WIDTH, save_minilm_bert, tiny_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = ["bert", "gpt2", "llama"]


def w2_columns(model, model_type: str) -> list[torch.Tensor]:
    """Each layer's W2 as (hidden, D) float64, read from the module weights by their names (not the table)."""
    if model_type == "bert":
        return [b.output.dense.weight.detach().double() for b in model.encoder.layer]
    if model_type == "gpt2":
        return [b.mlp.c_proj.weight.detach().double().t() for b in model.h]  # Conv1D stores (D, hidden)
    return [b.mlp.down_proj.weight.detach().double() for b in model.layers]


def brute_scores(acts: list[torch.Tensor], w2: list[torch.Tensor], criterion: str) -> torch.Tensor:
    rows = []
    for a, w in zip(acts, w2):
        col = w.norm(dim=0)
        if criterion == "flap":
            rows.append(a.var(dim=0) * col ** 2)
        elif criterion == "wanda":
            rows.append(a.norm(dim=0) * col)
        else:
            rows.append(a.abs().mean(dim=0))
    return torch.stack(rows)


def top(values: torch.Tensor, k: int) -> list[int]:
    return sorted(range(values.numel()), key=lambda j: (-float(values[j]), j))[:k]


@pytest.fixture(scope="module", params=SHAPES)
def case(request):
    model = tiny_model(request.param, layers=3)
    with torch.no_grad():  # biases away from zero, so that means, magnitudes and variances all differ
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    rows = examples(12, seed=9)
    return dict(model_type=request.param, model=model, moments=moments_of(model, rows, "torch"),
                acts=stored_activations(model, rows), w2=w2_columns(model, request.param))


@pytest.mark.parametrize("criterion", ["flap", "wanda", "magnitude"])
def test_ranking_equals_brute_force(case, criterion):
    want = brute_scores(case["acts"], case["w2"], criterion)
    got = criterion_scores(case["model"], criterion, case["moments"])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-15)
    counts = {0: 4, 2: 11}
    picked = select_neurons(case["model"], criterion, counts, moments=case["moments"])
    for layer, k in counts.items():
        assert picked[layer].tolist() == top(want[layer], k), (case["model_type"], criterion, layer)
    assert sorted(picked) == [0, 2]


def test_flap_adaptive_widths_equal_brute_force(case):
    scores = brute_scores(case["acts"], case["w2"], "flap")
    counts = {0: 5, 1: 5, 2: 5}
    pairs = []
    for layer in counts:
        s = scores[layer]
        z = (s - s.mean()) / s.std()
        best = top(s, 1)[0]
        pairs += [(float("inf") if j == best else float(z[j]), layer, j) for j in range(WIDTH)]
    kept = sorted(pairs, key=lambda t: (-t[0], t[1], t[2]))[:15]
    want = {layer: sorted(j for _, l, j in kept if l == layer) for layer in counts}
    got = select_neurons(case["model"], "flap", counts, moments=case["moments"], flap_adaptive=True)
    assert {layer: sorted(v.tolist()) for layer, v in got.items()} == want
    assert sum(len(v) for v in got.values()) == 15 and all(len(v) >= 1 for v in got.values())


def test_flap_adaptive_counts_rules():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 10.0, 10.0, 10.0], [0.0, 0.0, 0.0, 100.0]])
    got = flap_adaptive_counts(scores, {0: 2, 1: 2, 2: 2})
    # each layer's best is reserved; the other 3 by standardised score: layer 0's 3 (z 0.39), then two of layer 1's
    # constant scores (z 0, above layer 0's 2 at -0.39 and layer 2's zeros at -0.5)
    assert got == {0: 2, 1: 3, 2: 1}
    with pytest.raises(ValueError, match="cannot give each of 3 layers one"):
        flap_adaptive_counts(scores, {0: 1, 1: 1, 2: 0})


def test_random_and_skill_criteria():
    model = tiny_model("bert", layers=3)
    counts = {1: 6, 2: 6}
    a = select_neurons(model, "random", counts, seed=3)
    assert {k: v.tolist() for k, v in a.items()} == {k: v.tolist() for k, v in
                                                     select_neurons(model, "random", counts, seed=3).items()}
    b = select_neurons(model, "random", counts, seed=4)
    assert any(a[k].tolist() != b[k].tolist() for k in counts)
    for v in a.values():
        assert len(set(v.tolist())) == 6 and v.tolist() == sorted(v.tolist()) and 0 <= int(v.min()) < WIDTH
    skill = [torch.arange(WIDTH).flip(0)] * 3
    assert select_neurons(model, "skill", counts, skill=skill)[2].tolist() == list(range(WIDTH - 1, WIDTH - 7, -1))
    with pytest.raises(ValueError, match="needs the moments"):
        select_neurons(model, "wanda", counts)
    with pytest.raises(ValueError, match="flap_adaptive needs criterion 'flap'"):
        select_neurons(model, "wanda", counts, flap_adaptive=True)
    with pytest.raises(ValueError, match="unknown criterion"):
        select_neurons(model, "obd", counts)


def test_keep_massive_puts_the_massive_neurons_first(case):
    """keep_massive: each layer's massive neurons (norm over 16x the layer median, largest first, at most the kept
    count), then the criterion's own order without them, at the same count: checked against a brute force on
    stored activations with two planted massive neurons in layer 1 and one in layer 2."""
    moments = case["moments"].clone()
    planted = {1: [5, 17], 2: [9]}
    for layer, idx in planted.items():
        for n, j in enumerate(idx):
            moments.moments[layer, :, 1, j] *= (400.0 + 100 * n) ** 2  # sum of squares: the norm x 400, x 500
    norms = moments.l2_norm()
    want_massive = {}
    for layer in range(3):
        med = float(norms[layer].median())
        big = [j for j in range(WIDTH) if float(norms[layer, j]) > 16 * med]
        want_massive[layer] = sorted(big, key=lambda j: (-float(norms[layer, j]), j))
    assert set(want_massive[1]) >= set(planted[1]) and set(want_massive[2]) >= set(planted[2])
    skill = [torch.arange(WIDTH).flip(0)] * 3
    counts = {1: 6, 2: 6}
    for criterion in ("skill", "random", "wanda"):
        plain = select_neurons(case["model"], criterion, counts, moments=moments, skill=skill, seed=2)
        got = select_neurons(case["model"], criterion, counts, moments=moments, skill=skill, seed=2, keep_massive=True)
        for layer, k in counts.items():
            first = want_massive[layer][:k]
            rest = [j for j in plain[layer].tolist() if j not in first][: k - len(first)]
            assert got[layer].tolist() == first + rest, (case["model_type"], criterion, layer)
    one = select_neurons(case["model"], "skill", {1: 1}, moments=moments, skill=skill, keep_massive=True)
    assert one[1].tolist() == want_massive[1][:1]  # fewer kept than massive: the largest
    with pytest.raises(ValueError, match="keep_massive needs the moments"):
        select_neurons(case["model"], "skill", counts, skill=skill, keep_massive=True)


def test_moments_of_another_model_are_refused(case):
    other = tiny_model("bert", layers=2)
    with pytest.raises(ValueError, match="do not fit the model"):
        criterion_scores(other, "flap", case["moments"])


# ------------------------------------------------------------------------------------------- prune_run
@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """A tuned and scored run on a tiny random BERT with the MiniLM tokenizer and a toy task (as test_cli_errors)."""
    from skillkern.data import load_task
    from skillkern.runs import score_run, tune_run
    from skillkern.tune import TuneSettings
    from test_cli_errors import _rows, _task

    w = tmp_path_factory.mktemp("criteria")
    save_minilm_bert(w / "model")
    _task(w / "data", "toy", ["negative", "positive"], {"train": _rows(40, 0), "dev": _rows(16, 1),
                                                         "test": _rows(16, 2)})
    settings = TuneSettings(prompt_len=4, epochs=1, lr=1e-2, batch_size=8, max_length=16, seed=0)
    tune_run(str(w / "model"), load_task(w / "data" / "toy"), settings, w / "run", progress=False)
    score_run(w / "run", progress=False)
    return w


@pytest.mark.parametrize("criterion", CRITERIA)
def test_prune_run_every_criterion(scored_run, criterion, tmp_path):
    """Same kept count per layer, the fill folded is the moments' mean (prompt thresholds for skill), the
    criterion and its statistics are recorded, and the folded model equals the dense one with the pruned neurons
    clamped at that fill."""
    from skillkern.prune import prune_run
    from skillkern.runs import load_run, prompt_thresholds
    from skillkern.stats import NeuronMoments

    out = tmp_path / criterion
    r = prune_run(scored_run / "run", out, keep=0.1, layers="all", criterion=criterion, progress=False)
    assert r["criterion"] == criterion and r["widths"] == [3, 3] and r["kept_per_layer"] == 3
    assert r["fill"] == ("prompt" if criterion == "skill" else "tokens")
    record = json.loads((out / "model" / "config.json").read_text())["skillkern_pruning"]
    assert record["criterion"] == criterion and record["statistics"] == r["statistics"]
    if criterion == "skill":
        fill = prompt_thresholds(scored_run / "run")
        assert "predictivity" in r["statistics"] and not (out / "moments.safetensors").exists()
    else:
        moments, settings = NeuronMoments.load(out / "moments.safetensors")
        fill = moments.mean()
        assert settings["rows"] == 40 and settings["positions"] == "tokens"
        assert r["statistics"]["moments"]["positions_count"] == moments.positions() > 40 * 4  # prompt + tokens
    pm, _, _ = load_run(scored_run / "run")
    kept = {int(k): v for k, v in record["kept"].items()}

    def clamp(layer, h):
        h = h.clone()
        pruned = torch.ones(WIDTH, dtype=torch.bool)
        pruned[kept[layer]] = False
        h[..., pruned] = fill[layer, pruned].to(h.dtype)
        return h

    pruned, _, _ = load_run(out)
    ids = torch.tensor([[1005, 2006, 3007], [4008, 5009, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad(), edit_neurons(pm.backbone, clamp):
        want = pm(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        got = pruned(input_ids=ids, attention_mask=mask)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_moments_file_is_reused_and_checked(scored_run, tmp_path):
    from skillkern.prune import prune_run
    from skillkern.stats import NeuronMoments, StatsFileError

    first = prune_run(scored_run / "run", tmp_path / "a", keep=0.2, layers="all", criterion="wanda", progress=False)
    again = prune_run(scored_run / "run", tmp_path / "b", keep=0.2, layers="all", criterion="flap",
                      flap_adaptive=True, moments=tmp_path / "a" / "moments.safetensors", progress=False)
    assert again["statistics"]["moments"]["file"] == str(tmp_path / "a" / "moments.safetensors")
    assert sum(again["widths"]) == sum(first["widths"]) == 2 * 7 and again["flap_adaptive"]
    a, _ = NeuronMoments.load(tmp_path / "a" / "moments.safetensors")
    b, _ = NeuronMoments.load(tmp_path / "b" / "moments.safetensors")
    assert torch.equal(a.moments, b.moments)
    with pytest.raises(StatsFileError, match="belongs to positions='tokens', not 'slots'"):
        prune_run(scored_run / "run", tmp_path / "c", keep=0.2, layers="all", criterion="flap", positions="slots",
                  moments=tmp_path / "a" / "moments.safetensors", progress=False)
    slots = prune_run(scored_run / "run", tmp_path / "d", keep=0.2, layers="all", criterion="magnitude",
                      positions="slots", progress=False)
    assert slots["statistics"]["moments"]["positions_count"] == 40 * 4  # the 4 prompt slots of 40 rows


def test_prune_run_keep_massive(scored_run, tmp_path):
    """--keep-massive: the moments are read (here from an earlier prune's file, with the skill criterion and the
    prompt fill, which use none otherwise), the flag is recorded, and the kept sets are select_neurons' with it."""
    from skillkern.perturb import massive_neurons
    from skillkern.prune import prune_run
    from skillkern.stats import NeuronMoments

    prune_run(scored_run / "run", tmp_path / "a", keep=0.2, layers="all", criterion="magnitude", progress=False)
    moments, settings = NeuronMoments.load(tmp_path / "a" / "moments.safetensors")
    moments.moments[0, :, 1, 11] *= 1e4  # neuron 11 of layer 0 made massive: its norm x 100
    moments_file = tmp_path / "planted.safetensors"
    moments.save(moments_file, settings)
    with pytest.raises(ValueError, match="uses no moments"):
        prune_run(scored_run / "run", tmp_path / "b", keep=0.2, layers="all", criterion="skill",
                  moments=moments_file, progress=False)
    r = prune_run(scored_run / "run", tmp_path / "b", keep=0.2, layers="all", criterion="skill", keep_massive=True,
                  moments=moments_file, progress=False)
    assert r["keep_massive"] and r["fill"] == "prompt" and r["statistics"]["moments"]["file"] == str(moments_file)
    record = json.loads((tmp_path / "b" / "model" / "config.json").read_text())["skillkern_pruning"]
    assert record["keep_massive"] is True
    massive = massive_neurons(moments.l2_norm())
    assert 11 in massive[0].tolist() and len(massive[0]) <= len(record["kept"]["0"])
    for layer, kept in record["kept"].items():
        assert set(massive[int(layer)].tolist()) <= set(kept)
    plain = prune_run(scored_run / "run", tmp_path / "c", keep=0.2, layers="all", criterion="skill", progress=False)
    assert plain["keep_massive"] is False and "moments" not in plain["statistics"]
