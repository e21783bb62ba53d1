"""NeuronStats, predictivity and selection on synthetic rows, against numpy brute force."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from skillkern.stats import (NeuronStats, ShardedNeuronStats, StatsFileError, combine_runs, select_global,
                             select_multiclass, select_per_layer, top_neurons)


def _feed(stats, layers_rows, labels, chunk=13):
    for start in range(0, labels.numel(), chunk):
        sl = slice(start, start + chunk)
        for layer, rows in enumerate(layers_rows):
            S = stats.num_slots
            lab = labels[sl]
            h = rows[sl].reshape(-1, stats.width)
            slot = torch.arange(S).repeat(lab.numel())
            stats.add_rows(layer, h, slot, lab.repeat_interleave(S))
        stats.count_rows(labels[sl])


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_accuracy_matches_brute_force(classes):
    g = torch.Generator().manual_seed(classes)
    L, S, D, N = 3, 2, 37, 101
    base = [torch.randn(N, S, D, generator=g) for _ in range(L)]
    ev = [torch.randn(N, S, D, generator=g) + 0.3 for _ in range(L)]
    yb = torch.randint(0, classes, (N,), generator=g)
    ye = torch.randint(0, classes, (N,), generator=g)
    stats = NeuronStats(L, S, D, classes)
    _feed(stats, base, yb)
    stats.finalize_thresholds()
    _feed(stats, ev, ye)

    thr = np.stack([b.double().numpy().mean(0) for b in base])                 # (L, S, D)
    fired = np.stack([e.double().numpy() for e in ev], axis=1) > thr[None]       # (N, L, S, D)
    y = ye.numpy()
    acc = np.stack([(fired == (y == c)[:, None, None, None]).mean(0) for c in range(classes)], axis=2)
    np.testing.assert_allclose(stats.threshold.numpy(), thr, rtol=1e-13)
    np.testing.assert_allclose(stats.accuracy().numpy(), acc, atol=1e-12)
    pred = np.maximum(acc, 1 - acc)
    expected = pred[:, :, 1].max(1) if classes == 2 else pred.max(2).max(1)
    np.testing.assert_allclose(stats.predictivity().numpy(), expected, atol=1e-12)
    assert stats.sign().shape == (L, D)


def test_sharded_stats_equal_one_device():
    """Layers split over 'devices' (two distinct CPU device objects, interleaved so groups are not contiguous):
    every number equals the single-tensor accumulator's exactly, and the state round-trips."""
    g = torch.Generator().manual_seed(7)
    L, S, D, C, N = 4, 2, 9, 3, 40
    base = [torch.randn(N, S, D, generator=g) for _ in range(L)]
    ev = [torch.randn(N, S, D, generator=g) for _ in range(L)]
    yb, ye = torch.randint(0, C, (N,), generator=g), torch.randint(0, C, (N,), generator=g)
    devices = ["cpu", torch.device("cpu", 0), "cpu", torch.device("cpu", 0)]
    one, sharded = NeuronStats(L, S, D, C), ShardedNeuronStats(L, S, D, C, devices)
    assert [layers for _, layers in sharded.groups] == [[0, 2], [1, 3]]
    assert [p.num_layers for p in sharded.parts] == [2, 2]
    for stats in (one, sharded):
        _feed(stats, base, yb)
        assert stats.threshold is None
        stats.finalize_thresholds()
    assert torch.equal(sharded.threshold, one.threshold)
    state = sharded.state_tensors()  # mid-run checkpoint of the evaluation pass
    for stats in (one, sharded):
        _feed(stats, ev, ye)
    merged = sharded.gather()
    for key in ("sums", "above", "threshold", "baseline_class_count", "eval_class_count"):
        assert torch.equal(getattr(merged, key), getattr(one, key)), key
    assert torch.equal(merged.predictivity(), one.predictivity())
    again = ShardedNeuronStats(L, S, D, C, devices)
    again.load_state(state)
    _feed(again, ev, ye)
    assert torch.equal(again.above, one.above) and torch.equal(again.sums, one.sums)
    assert again.parts[1].above.shape == (2, S, C, D)
    with pytest.raises(ValueError, match="3 layer devices"):
        ShardedNeuronStats(L, S, D, C, devices[:3])


def test_sign_marks_inhibitory_neurons():
    stats = NeuronStats(1, 1, 2, 2)
    h = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # neuron 0 fires for class 1, neuron 1 for class 0
    y = torch.tensor([1, 0])
    for _ in range(2):
        stats.add_rows(0, h, torch.zeros(2, dtype=torch.long), y)
        stats.count_rows(y)
        if stats.threshold is None:
            stats.finalize_thresholds()
    assert stats.predictivity().tolist() == [[1.0, 1.0]]
    assert stats.sign().tolist() == [[1, -1]]


def test_merge_rejects_mismatch():
    a, b = NeuronStats(2, 1, 4, 2), NeuronStats(2, 1, 5, 2)
    with pytest.raises(ValueError, match="shape"):
        a.merge_(b)


def test_no_baseline_rows():
    with pytest.raises(ValueError, match="no rows"):
        NeuronStats(1, 1, 3, 2).finalize_thresholds()


def test_select_per_layer_counts_and_order():
    pred = torch.rand(4, 1536, generator=torch.Generator().manual_seed(0))
    sel = select_per_layer(pred, 0.02)
    assert [len(s) for s in sel] == [30] * 4  # int(0.02 * 1536) = 30, despite float rounding
    for layer, s in enumerate(sel):
        assert torch.equal(s, pred[layer].argsort(descending=True)[:30])
    assert [len(s) for s in select_per_layer(pred, 0.0)] == [0] * 4
    with pytest.raises(ValueError):
        select_per_layer(pred, 1.5)


def test_select_global():
    pred = torch.tensor([[0.5, 0.9, 0.6], [0.95, 0.55, 0.7]])
    assert select_global(pred, 3).tolist() == [[1, 0], [0, 1], [1, 2]]
    assert top_neurons(pred, 1)[0] == {"layer": 1, "neuron": 0, "predictivity": pytest.approx(0.95)}


def test_select_multiclass_union_rule():
    pn = torch.tensor([[0.9, 0.8, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    neu = torch.tensor([[0.99, 0.5, 0.7, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    # q = 0.2 -> k = 2 from pn {0, 1}; fill from neu's best not yet chosen: 0 is taken, so 2 and 3.
    assert select_multiclass(pn, neu, 0.2)[0].tolist() == [0, 1, 2, 3]


def test_combine_runs():
    a, b = torch.tensor([[0.6, 0.9]]), torch.tensor([[0.8, 0.7]])
    torch.testing.assert_close(combine_runs([a, b]), torch.tensor([[0.7, 0.8]], dtype=torch.float64))
    torch.testing.assert_close(combine_runs([a, b], "min"), torch.tensor([[0.6, 0.7]], dtype=torch.float64))
    with pytest.raises(ValueError, match="different shapes"):
        combine_runs([a, torch.zeros(2, 2)])


def test_corrupt_stats_file(tmp_path):
    bad = tmp_path / "stats.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(StatsFileError, match="not a readable"):
        NeuronStats.load(bad)
    with pytest.raises(FileNotFoundError):
        NeuronStats.load(tmp_path / "missing.safetensors")


def test_stats_file_of_something_else(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(StatsFileError, match="not a skillkern stats file"):
        NeuronStats.load(path)


def test_stats_file_of_another_model_or_task(tmp_path):
    stats = NeuronStats(1, 1, 3, 2)
    stats.save(tmp_path / "s.safetensors", {"model": "minilm", "task": "sst2"})
    NeuronStats.load(tmp_path / "s.safetensors", expect={"model": "minilm", "task": "sst2"})
    with pytest.raises(StatsFileError, match="task='sst2', not 'imdb'"):
        NeuronStats.load(tmp_path / "s.safetensors", expect={"model": "minilm", "task": "imdb"})


# ------------------------------------------------------------------------------------------------ the stats file
def _scored(L=3, S=2, D=7, C=3, seed=0, evaluate=True):
    g = torch.Generator().manual_seed(seed)
    stats = NeuronStats(L, S, D, C)
    _feed(stats, [torch.randn(20, S, D, generator=g) for _ in range(L)], torch.randint(0, C, (20,), generator=g))
    if evaluate:
        stats.finalize_thresholds()
        _feed(stats, [torch.randn(17, S, D, generator=g) for _ in range(L)], torch.randint(0, C, (17,), generator=g))
    return stats


def _write_version_1(stats, path, settings):
    """A stats file as skillkern 0.1.0 wrote it (format_version 1): the thresholds under ``baseline``; ``sums``,
    ``above`` and ``accuracy`` as (L, S, D, C); ``above`` only once the thresholds exist."""
    from safetensors.torch import save_file

    t = {"sums": stats.sums.permute(0, 1, 3, 2).contiguous(), "baseline_class_count": stats.baseline_class_count,
         "eval_class_count": stats.eval_class_count}
    if stats.threshold is not None:
        t["baseline"] = stats.threshold
        t["above"] = stats.above.permute(0, 1, 3, 2).contiguous()
        t["predictivity"] = stats.predictivity().float()
        t["accuracy"] = stats.accuracy().permute(0, 1, 3, 2).contiguous().float()
        t["sign"] = stats.sign()
    save_file(t, str(path), metadata={"format": "skillkern-stats", "format_version": "1",
                                      "settings": json.dumps(settings)})


def _assert_same_stats(got, want):
    assert got.shape == want.shape
    for key in ("sums", "above", "baseline_class_count", "eval_class_count", "threshold"):
        a, b = getattr(got, key), getattr(want, key)
        assert (a is None and b is None) or torch.equal(a, b), key


def test_shape_is_the_shape_of_the_tensors():
    stats = NeuronStats(4, 3, 11, 2)
    assert stats.shape == (4, 3, 2, 11) == tuple(stats.sums.shape) == tuple(stats.above.shape)
    sharded = ShardedNeuronStats(4, 3, 11, 2, ["cpu", torch.device("cpu", 0), "cpu", "cpu"])
    assert sharded.shape == stats.shape == tuple(sharded.sums.shape)


@pytest.mark.parametrize("evaluate", [True, False])
def test_stats_file_holds_the_state_in_memory_layout(tmp_path, evaluate):
    from safetensors import safe_open

    stats = _scored(evaluate=evaluate)
    stats.save(tmp_path / "s.safetensors", {"task": "t"})
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format_version"] == "2"
    state = {"sums", "above", "baseline_class_count", "eval_class_count"}
    assert set(t) == (state | {"threshold", "accuracy", "predictivity", "sign"} if evaluate else state)
    for key in ("sums", "above") + (("accuracy",) if evaluate else ()):
        assert tuple(t[key].shape) == stats.shape, key
    if evaluate:
        assert torch.equal(t["accuracy"], stats.accuracy().float())
        assert torch.equal(t["threshold"], stats.threshold)
    again, settings = NeuronStats.load(tmp_path / "s.safetensors")
    assert settings == {"task": "t"}
    _assert_same_stats(again, stats)


@pytest.mark.parametrize("evaluate", [True, False])
def test_reads_a_version_1_file(tmp_path, evaluate):
    stats = _scored(evaluate=evaluate)
    _write_version_1(stats, tmp_path / "v1.safetensors", {"model": "m"})
    again, settings = NeuronStats.load(tmp_path / "v1.safetensors", expect={"model": "m"})
    assert settings == {"model": "m"}
    _assert_same_stats(again, stats)
    if evaluate:
        assert torch.equal(again.predictivity(), stats.predictivity())
        assert torch.equal(again.accuracy(), stats.accuracy())


def test_refuses_a_newer_format_and_bad_shapes(tmp_path):
    from safetensors.torch import save_file

    stats = _scored()
    tensors = stats.to_file_tensors()
    save_file(tensors, str(tmp_path / "v3.safetensors"), metadata={"format": "skillkern-stats", "format_version": "3"})
    with pytest.raises(StatsFileError, match="format version 3"):
        NeuronStats.load(tmp_path / "v3.safetensors")
    tensors["above"] = tensors["above"].permute(0, 1, 3, 2).contiguous()  # a version-1 layout in a version-2 file
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"format": "skillkern-stats", "format_version": "2"})
    with pytest.raises(StatsFileError, match="'above' has shape"):
        NeuronStats.load(tmp_path / "bad.safetensors")
