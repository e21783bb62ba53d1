"""The streaming scorer against a brute-force computation that stores every activation (real model, real data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from skillkern.scoring import NonFiniteActivationError, ScoreSettings, Scorer, score
from skillkern.stats import NeuronStats

from conftest import requires_data

N_BASE, N_EVAL = 240, 160
PAD = 32
MAX_LEN = 64


@pytest.fixture(scope="module")
def minilm():
    from skillkern.models import load_model

    return load_model("minilm")


@pytest.fixture(scope="module")
def sst2():
    from skillkern.data import load_task

    task = load_task("sst2")
    return task.split("train")[:N_BASE], task.split("dev")[:N_EVAL]


def _brute_force_activations(model, tokenizer, examples):
    """Every sample alone, padded by the tokenizer itself to its own length rounded up to PAD; hooks written
    here (not the library's) store the whole (T, D) activation of every layer; pooling done afterwards."""
    layers = model.encoder.layer
    store: dict[int, torch.Tensor] = {}
    hooks = [layer.output.dense.register_forward_pre_hook(
        lambda mod, inp, i=i: store.__setitem__(i, inp[0][0].clone())) for i, layer in enumerate(layers)]
    pooled = {p: [] for p in ("cls", "last", "mean", "max", "slots")}
    try:
        for ex in examples:
            n = len(tokenizer(ex.text, truncation=True, max_length=MAX_LEN)["input_ids"])
            target = min(math.ceil(n / PAD) * PAD, MAX_LEN)
            enc = tokenizer(ex.text, truncation=True, max_length=target, padding="max_length", return_tensors="pt")
            with torch.inference_mode():
                model(**enc)
            h = torch.stack([store[i] for i in range(len(layers))])  # (L, T, D)
            real = h[:, :n]
            pooled["cls"].append(h[:, 0].double())
            pooled["last"].append(h[:, n - 1].double())
            pooled["mean"].append((real.float().sum(1) / n).double())
            pooled["max"].append(real.amax(1).double())
            pooled["slots"].append(h[:, [0, 2]].double())  # (L, 2, D)
    finally:
        for hk in hooks:
            hk.remove()
    return {k: torch.stack(v) for k, v in pooled.items()}  # (N, L, D) or (N, L, S, D)


@pytest.fixture(scope="module")
def brute_force(minilm, sst2):
    model, tokenizer = minilm
    base, ev = sst2
    return _brute_force_activations(model, tokenizer, base), _brute_force_activations(model, tokenizer, ev)


def _brute_force_stats(base_act, eval_act, base_labels, eval_labels):
    if base_act.dim() == 3:
        base_act, eval_act = base_act.unsqueeze(2), eval_act.unsqueeze(2)
    threshold = base_act.numpy().mean(axis=0)  # numpy float64 mean, (L, S, D)
    above = eval_act.numpy() > threshold[None]
    y = np.asarray(eval_labels)
    counts = np.stack([above[y == c].sum(axis=0) for c in range(2)], axis=2)  # (L, S, C, D)
    acc = ((above == (y[:, None, None, None] == 1))).mean(axis=0)
    return threshold, counts, acc


@requires_data
@pytest.mark.parametrize("pool", ["cls", "last", "mean", "max", "slots"])
def test_streaming_equals_brute_force(minilm, sst2, brute_force, pool):
    model, tokenizer = minilm
    base, ev = sst2
    base_act, eval_act = brute_force
    threshold, counts, acc = _brute_force_stats(base_act[pool], eval_act[pool],
                                                [e.label for e in base], [e.label for e in ev])

    settings = dict(pool=pool, max_length=MAX_LEN, batch_size=16, pad_multiple=PAD)
    if pool == "slots":
        settings["slots"] = (0, 2)
    stats = score(model, tokenizer, base, ev, 2, **settings)
    files = stats.to_file_tensors()
    np.testing.assert_allclose(files["threshold"].numpy(), threshold, rtol=1e-12, atol=1e-15)
    got = files["above"].numpy()
    mismatch = np.argwhere(got != counts)
    assert mismatch.size == 0, f"{len(mismatch)} count mismatches, first at {mismatch[:5].tolist()}"
    np.testing.assert_allclose(stats.accuracy()[:, :, 1].numpy(), acc, rtol=0, atol=1e-12)
    assert files["eval_class_count"].tolist() == np.bincount([e.label for e in ev], minlength=2).tolist()
    # Predictivity: max over slots of max(Acc, 1 - Acc).
    expected_pred = np.maximum(acc, 1 - acc).max(axis=1)
    np.testing.assert_allclose(stats.predictivity().numpy(), expected_pred, atol=1e-12)


@requires_data
def test_batch_size_invariance(minilm, sst2):
    model, tokenizer = minilm
    base, ev = sst2
    runs = [score(model, tokenizer, base[:120], ev[:80], 2, batch_size=bs, max_length=MAX_LEN) for bs in (1, 7, 32)]
    for other in runs[1:]:
        assert torch.equal(other.above, runs[0].above)
        assert torch.equal(other.eval_class_count, runs[0].eval_class_count)
        # Sums are added in a different order when batches group rows by length: float64 rounding only.
        torch.testing.assert_close(other.threshold, runs[0].threshold, rtol=1e-13, atol=1e-15)


@requires_data
def test_halves_merge_to_whole(minilm, sst2):
    model, tokenizer = minilm
    base, ev = sst2
    base, ev = base[:96], ev[:64]
    scorer = Scorer(model, tokenizer, 2, ScoreSettings(max_length=MAX_LEN, batch_size=16), progress=False)
    whole = scorer.score(base, ev)
    a, b = scorer.new_stats(), scorer.new_stats()
    scorer.run_pass(a, base[:40])
    scorer.run_pass(b, base[40:])
    merged = a + b
    torch.testing.assert_close(merged.sums, whole.sums, rtol=1e-13, atol=1e-12)
    merged.threshold = whole.threshold.clone()
    a.threshold = b.threshold = whole.threshold.clone()
    a2, b2 = scorer.new_stats(), scorer.new_stats()
    a2.threshold = b2.threshold = whole.threshold.clone()
    scorer.run_pass(a2, ev[:25])
    scorer.run_pass(b2, ev[25:])
    assert torch.equal((a2 + b2).above, whole.above)
    assert torch.equal((a2 + b2).eval_class_count, whole.eval_class_count)


def test_nan_activations_name_the_layer(minilm):
    model, tokenizer = minilm
    rows = [{"text": "fine", "label": 0}, {"text": "bad", "label": 1}]
    layer = model.encoder.layer[3].intermediate.dense
    saved = layer.bias.detach().clone()
    try:
        with torch.no_grad():
            layer.bias[7] = float("nan")
        with pytest.raises(NonFiniteActivationError, match="layer 3"):
            score(model, tokenizer, rows, rows, 2)
    finally:
        with torch.no_grad():
            layer.bias.copy_(saved)


def test_label_out_of_range(minilm):
    model, tokenizer = minilm
    rows = [{"text": "fine", "label": 0}, {"text": "bad", "label": 2}]
    with pytest.raises(ValueError, match=r"label 2 out of range \[0, 2\)"):
        score(model, tokenizer, rows, rows, 2)


def test_empty_split(minilm):
    model, tokenizer = minilm
    with pytest.raises(ValueError, match="empty"):
        score(model, tokenizer, [], [{"text": "x", "label": 0}], 2)


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown pool"):
        ScoreSettings(pool="median")
    with pytest.raises(ValueError, match="slot"):
        ScoreSettings(pool="slots")


def test_slot_beyond_sequence(minilm):
    model, tokenizer = minilm
    rows = [{"text": "short", "label": 0}, {"text": "also short", "label": 1}]
    with pytest.raises(ValueError, match="beyond the sequence length"):
        score(model, tokenizer, rows, rows, 2, pool="slots", slots=(0, 40), pad_multiple=0)


def test_stats_survive_save_and_load(tmp_path, minilm):
    model, tokenizer = minilm
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(["good", "bad", "great film", "awful", "ok"])]
    stats = score(model, tokenizer, rows, rows, 2)
    stats.save(tmp_path / "s.safetensors", {"model": "minilm"})
    back, meta = NeuronStats.load(tmp_path / "s.safetensors")
    assert meta == {"model": "minilm"}
    assert torch.equal(back.above, stats.above) and torch.equal(back.sums, stats.sums)
    assert torch.equal(back.threshold, stats.threshold)
    assert torch.equal(back.predictivity(), stats.predictivity())


def test_skip_nonfinite_drops_and_counts_samples(minilm):
    from skillkern.models import edit_neurons

    model, tokenizer = minilm
    rows = [{"text": f"sample number {i} " * (1 + i % 3), "label": i % 2} for i in range(12)]
    poisoned = {"n": 0}

    def poison(layer, h):
        if layer == 2:  # first sample of every forward call gets a NaN neuron
            h = h.clone()
            h[0, 0, 5] = float("nan")
            poisoned["n"] += 1
        return h

    scorer = Scorer(model, tokenizer, 2, ScoreSettings(batch_size=4), progress=False, nonfinite="skip")
    with edit_neurons(model, poison, layers=[2]):
        stats = scorer.score(rows, rows)
    assert scorer.skipped["baseline"] == scorer.skipped["eval"] > 0
    assert int(stats.baseline_class_count.sum()) == 12 - scorer.skipped["baseline"]
    assert int(stats.eval_class_count.sum()) == 12 - scorer.skipped["eval"]
    assert torch.isfinite(stats.threshold).all()
    strict = Scorer(model, tokenizer, 2, ScoreSettings(batch_size=4), progress=False)
    with edit_neurons(model, poison, layers=[2]), pytest.raises(NonFiniteActivationError, match="layer 2"):
        strict.score(rows, rows)


@requires_data
def test_layers_on_two_devices_keep_their_stats_apart(minilm, sst2, monkeypatch, tmp_path):
    """A model whose layers sit on two devices (faked: layers 3-5 report a second CPU device object) is scored
    into one accumulator per device, each layer's rows going to its own device's part; the gathered result, and
    one resumed from a mid-run checkpoint of the sharded state, equal the single-device run exactly."""
    import skillkern.scoring as scoring_mod
    from skillkern.checkpoint import Checkpoint
    from skillkern.stats import ShardedNeuronStats

    model, tokenizer = minilm
    base, ev = sst2[0][:32], sst2[1][:24]
    settings = ScoreSettings(max_length=MAX_LEN, batch_size=8)
    single = Scorer(model, tokenizer, 2, settings, progress=False).score(base, ev)

    second = torch.device("cpu", 0)  # a distinct device object; tensors made on it live on the CPU
    real = scoring_mod.layer_device
    monkeypatch.setattr(scoring_mod, "layer_device", lambda layer: second if layer.index >= 3 else real(layer))
    routed: dict[int, set] = {}
    real_part = ShardedNeuronStats._part

    def spy(self, layer):
        part, local = real_part(self, layer)
        routed.setdefault(layer, set()).add(self.parts.index(part))
        return part, local

    monkeypatch.setattr(ShardedNeuronStats, "_part", spy)
    scorer = Scorer(model, tokenizer, 2, settings, progress=False)
    assert list(scorer.device_groups.values()) == [[0, 1, 2], [3, 4, 5]]
    assert isinstance(scorer.new_stats(), ShardedNeuronStats)
    got = scorer.score(base, ev)
    assert routed == {0: {0}, 1: {0}, 2: {0}, 3: {1}, 4: {1}, 5: {1}}
    assert isinstance(got, NeuronStats) and got.sums.device.type == "cpu"
    for key in ("sums", "threshold", "above", "baseline_class_count", "eval_class_count"):
        assert torch.equal(getattr(got, key), getattr(single, key).cpu()), key

    # 4 baseline chunks, the thresholds, 3 evaluation chunks: crash after the first evaluation chunk's
    # checkpoint and resume from the sharded state (thresholds included)
    saves = {"n": 0}
    real_save = Checkpoint.save

    def crashing_save(self, *a, **k):
        real_save(self, *a, **k)
        saves["n"] += 1
        if saves["n"] == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", crashing_save)
    path = tmp_path / "checkpoint.safetensors"
    with pytest.raises(KeyboardInterrupt):
        Scorer(model, tokenizer, 2, settings, progress=False).score(base, ev, Checkpoint(path, {"job": 1}, every=1))
    assert saves["n"] == 6
    monkeypatch.setattr(Checkpoint, "save", real_save)
    resumed = Scorer(model, tokenizer, 2, settings, progress=False).score(base, ev, Checkpoint(path, {"job": 1}))
    for key in ("sums", "threshold", "above", "baseline_class_count", "eval_class_count"):
        assert torch.equal(getattr(resumed, key), getattr(single, key).cpu()), key


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@requires_data
def test_device_map_over_two_gpus_keeps_each_layers_stats_there(tmp_path, minilm, sst2):
    pytest.importorskip("accelerate")
    from transformers import AutoConfig, AutoModel

    from skillkern.models import load_model
    from skillkern.stats import ShardedNeuronStats

    _, tokenizer = minilm
    config = AutoConfig.for_model("bert", num_hidden_layers=4, hidden_size=32, intermediate_size=37,
                                  num_attention_heads=4, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    device_map = {"embeddings": 0, "encoder.layer.0": 0, "encoder.layer.1": 0, "encoder.layer.2": 1,
                  "encoder.layer.3": 1, "pooler": 1}
    model, tok = load_model(str(tmp_path / "tiny"), device_map=device_map)
    base, ev = sst2[0][:64], sst2[1][:48]
    single_model, _ = load_model(str(tmp_path / "tiny"), device="cuda:0")
    for backend in ("torch", "auto"):  # hooks + stats_update; the fused kernel (auto on CUDA)
        settings = ScoreSettings(max_length=MAX_LEN, batch_size=16, backend=backend)
        scorer = Scorer(model, tok, 2, settings, progress=False)
        cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
        assert scorer.layer_devices == [cuda0, cuda0, cuda1, cuda1]
        stats = scorer.new_stats()
        assert isinstance(stats, ShardedNeuronStats)
        scorer.run_pass(stats, base)
        stats.finalize_thresholds()
        scorer.run_pass(stats, ev)
        assert [p.above.device for p in stats.parts] == [cuda0, cuda1]
        assert [p.threshold.device for p in stats.parts] == [cuda0, cuda1]
        got = stats.gather()
        ref = Scorer(single_model, tok, 2, settings, progress=False).score(base, ev)
        if backend == "torch":  # same kernels, same row order: identical
            assert torch.equal(got.above, ref.above.cpu()) and torch.equal(got.threshold, ref.threshold.cpu())
        else:  # float64 atomics add rows in no fixed order
            torch.testing.assert_close(got.threshold, ref.threshold.cpu(), rtol=1e-12, atol=1e-12)
