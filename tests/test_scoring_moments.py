"""The moments pass (``Scorer.moments`` / ``collect_moments``): exact against stored activations on the three FFN
shapes, fused against hooks, prompt positions, tracked slots, resume, and two processes.

"Exact": the pass and a brute-force capture read bit-identical activations (same batches, same padding rule); the
pass's float64 sums may differ from the correctly rounded sums of the stored activations (``math.fsum``) only by
summation rounding, ``(n - 1) 2^-53 sum |a|`` per cell (``assert_sums_close``), and the position counts not at
all.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from kernel_checks import TRITON_OK, assert_equal, assert_sums_close, ext  # noqa: F401 (ext: fixture)
from skillkern.batching import iter_batches
from skillkern.checkpoint import Checkpoint
from skillkern.models import capture_neurons
from skillkern.scoring import ScoreSettings, Scorer, collect_moments, token_positions
from tiny_models import VOCAB, WIDTH, shared_tiny_model

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

MAX_LEN, BATCH, PAD = 16, 4, 8
SHAPES = ["bert", "gpt2", "llama"]  # nn.Linear + GELU, Conv1D (weights stored transposed), gated SiLU


class WordTokenizer:
    """Enough of a tokenizer for the scorer: words hashed to ids (right padding is the scorer's)."""

    pad_token_id = 0

    def __call__(self, texts, pairs=None, truncation=True, max_length=MAX_LEN):
        ids = [[3 + sum(map(ord, w)) % (VOCAB - 3) for w in t.split()][:max_length] for t in texts]
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}


def examples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(2, 14, (1,), generator=g))
        out.append({"text": " ".join(f"w{int(i)}" for i in torch.randint(0, 40, (length,), generator=g)),
                    "label": int(torch.randint(0, 2, (1,), generator=g))})
    return out


def stored_activations(model, rows, forward=None, extra=0) -> list[torch.Tensor]:
    """Every layer's activations at every real position (prompt positions: the first ``extra`` of each sample), as
    float64 (N, D): the brute force the pass is checked against."""
    tok, found, current = WordTokenizer(), {}, {}

    def keep(index, h):
        mask = current["mask"]
        if extra:
            mask = torch.cat([torch.ones(mask.shape[0], extra, dtype=mask.dtype), mask], dim=1)
        found.setdefault(index, []).append(h[mask.bool()].double())

    with torch.no_grad(), capture_neurons(model, keep):
        for chunk in range(0, len(rows), BATCH):
            for batch in iter_batches(tok, rows[chunk:chunk + BATCH], BATCH, MAX_LEN, PAD, "cpu"):
                current["mask"] = batch.attention_mask
                (forward or (lambda m, b: m(**b.inputs)))(model, batch)
    return [torch.cat(found[i]) for i in sorted(found)]


def exact_moments(acts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, 3, D) correctly rounded sums of a, a^2 and |a| (math.fsum), and (L, 3, D) sums of magnitudes."""
    exact = torch.tensor([[[math.fsum(col) for col in stat.t().tolist()] for stat in (a, a * a, a.abs())]
                          for a in acts], dtype=torch.float64)
    mag = torch.stack([torch.stack([a.abs().sum(0), (a * a).sum(0), a.abs().sum(0)]) for a in acts])
    return exact, mag


def moments_of(model, rows, backend, **kw):
    return collect_moments(model, WordTokenizer(), rows, max_length=MAX_LEN, batch_size=BATCH, pad_multiple=PAD,
                           backend=backend, **kw)


@pytest.mark.parametrize("model_type", SHAPES)
@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_moments_equal_the_stored_activations(model_type, backend, request):
    if backend == "ext":
        request.getfixturevalue("ext")
    model = shared_tiny_model(model_type)
    rows = examples(11, seed=1)
    m = moments_of(model, rows, backend)
    acts = stored_activations(model, rows)
    n = acts[0].shape[0]
    assert m.count.tolist() == [n] and n == sum(len(r["text"].split()) for r in rows)
    exact, mag = exact_moments(acts)
    assert_sums_close(m.totals(), exact, mag, n, f"{model_type}/{backend}", "(layer, moment, neuron)")
    torch.testing.assert_close(m.variance(), torch.stack([a.var(0) for a in acts]), rtol=1e-9, atol=1e-15)


@pytest.mark.skipif(not TRITON_OK, reason="triton cannot run here (no GPU, no TRITON_INTERPRET=1)")
@pytest.mark.parametrize("model_type", SHAPES)
def test_fused_pass_equals_hooks(model_type):
    """backend='triton' reads the neurons in the fused kernel's epilogue: the same positions, moments within the
    fp32 GEMM rounding of the hook path's (tiny model: |h| < 1, GEMM error ~ 2e-6)."""
    model = shared_tiny_model(model_type)
    rows = examples(9, seed=2)
    scorer = Scorer(model, WordTokenizer(), None, ScoreSettings(max_length=MAX_LEN, batch_size=BATCH,
                                                                pad_multiple=PAD, backend="triton"))
    fused = scorer.moments(rows)
    assert scorer.path == "fused" and scorer.backends == {"ffn_stats": "triton"}
    hooks = moments_of(model, rows, "torch")
    assert torch.equal(fused.count, hooks.count)
    n = int(hooks.count)
    torch.testing.assert_close(fused.mean(), hooks.mean(), rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.totals()[:, 1:] / n, hooks.totals()[:, 1:] / n, rtol=0, atol=1e-5)


def _prompted(model, extra=3):
    """A forward that prepends ``extra`` learned-looking positions, as a soft prompt does."""
    g = torch.Generator().manual_seed(4)
    pre = torch.randn(extra, model.config.hidden_size, generator=g) * 0.02

    def forward(m, batch):
        emb = m.get_input_embeddings()(batch.inputs["input_ids"])
        emb = torch.cat([pre.expand(emb.shape[0], -1, -1), emb], dim=1)
        mask = batch.inputs["attention_mask"]
        mask = torch.cat([torch.ones(mask.shape[0], extra, dtype=mask.dtype), mask], dim=1)
        m(inputs_embeds=emb, attention_mask=mask)

    return forward


def test_prompt_positions_are_real_positions():
    """Positions prepended inside forward (a soft prompt) count as real tokens: P per sample more, first."""
    model = shared_tiny_model("bert")
    rows = examples(7, seed=3)
    forward = _prompted(model)
    m = moments_of(model, rows, "torch", forward=forward)
    acts = stored_activations(model, rows, forward=forward, extra=3)
    assert m.positions() == acts[0].shape[0] == sum(len(r["text"].split()) for r in rows) + 3 * len(rows)
    exact, mag = exact_moments(acts)
    assert_sums_close(m.totals(), exact, mag, acts[0].shape[0], "prompted", "(layer, moment, neuron)")
    assert token_positions(torch.tensor([[1, 1, 0]]), 5).tolist() == [0, 0, 0, 0, -1]
    with pytest.raises(ValueError, match="the FFN saw 2 token rows"):
        token_positions(torch.tensor([[1, 1, 0]]), 2)


def test_tracked_slots_give_the_baseline_means():
    """positions='slots' adds the tracked rows only, one slot each: with pool 'cls' their mean is the threshold
    a baseline pass over the same rows computes (the same rows, summed in another grouping)."""
    model = shared_tiny_model("gpt2")
    rows = examples(10, seed=5)
    settings = dict(max_length=MAX_LEN, batch_size=BATCH, pad_multiple=PAD, backend="torch")
    m = collect_moments(model, WordTokenizer(), rows, positions="slots", pool="last", **settings)
    assert m.count.tolist() == [len(rows)] and m.moments.shape == (2, 1, 3, WIDTH)
    scorer = Scorer(model, WordTokenizer(), 2, ScoreSettings(pool="last", **settings))
    stats = scorer.new_stats()
    scorer.run_pass(stats, rows)
    torch.testing.assert_close(m.mean(), stats.finalize_thresholds()[:, 0], rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="positions='slots' needs one row per tracked position"):
        collect_moments(model, WordTokenizer(), rows, positions="slots", pool="mean", **settings)
    with pytest.raises(ValueError, match="positions must be one of"):
        collect_moments(model, WordTokenizer(), rows, positions="all", **settings)


class _Crash(Exception):
    pass


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    model = shared_tiny_model("llama")
    rows = examples(14, seed=6)
    whole = moments_of(model, rows, "torch")
    path = tmp_path / "checkpoint.safetensors"
    real_save, saves = Checkpoint.save, []

    def crashing_save(self, *a, **k):
        real_save(self, *a, **k)
        saves.append(1)
        if len(saves) == 2:
            raise _Crash()

    monkeypatch.setattr(Checkpoint, "save", crashing_save)
    with pytest.raises(_Crash):
        moments_of(model, rows, "torch", checkpoint=Checkpoint(path, {"job": 1}, every=1, resume=False))
    monkeypatch.setattr(Checkpoint, "save", real_save)
    resumed = moments_of(model, rows, "torch", checkpoint=Checkpoint(path, {"job": 1}, every=1, resume=True))
    assert_equal(resumed.moments, whole.moments, "resumed moments", bitwise=True)
    assert torch.equal(resumed.count, whole.count)
    from skillkern.stats import StatsFileError

    with pytest.raises(StatsFileError, match="another job"):
        moments_of(model, rows, "torch", checkpoint=Checkpoint(path, {"job": 2}, every=1, resume=True))


_TWO_PROCESSES = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
import test_scoring_moments as t
from tiny_models import tiny_model
rank, path = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"file://{path}.init", rank=rank, world_size=2)
m = t.moments_of(tiny_model("bert"), t.examples(13, seed=8), "torch")
if rank == 0:
    torch.save({"moments": m.moments, "count": m.count}, path)
# Both processes finish their collectives before either tears gloo down (as Processes.leave does): a rank that
# destroys its group while the other still talks to it can abort the other ("terminate called ...").
dist.barrier()
dist.destroy_process_group()
"""


def test_two_processes_all_reduce_to_one(tmp_path):
    """Under torch.distributed each process adds a contiguous shard and the moments are all-reduced: the counts
    equal one process's exactly, the sums up to float64 rounding."""
    from tiny_models import tiny_model

    one = moments_of(tiny_model("bert"), examples(13, seed=8), "torch")
    out = tmp_path / "two.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    tests = os.path.dirname(os.path.abspath(__file__))
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(r), str(out), tests], env=env, cwd=tests,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    two = torch.load(out, weights_only=True)
    assert torch.equal(two["count"], one.count) and int(one.count) > 0
    torch.testing.assert_close(two["moments"], one.moments, rtol=1e-13, atol=1e-15)
