"""RESULTS.md generation: the significance rule over seeds and the speed table read from benchmark CSVs."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from results_md import _significant, _speed_lines  # noqa: E402


def _seed(skill: float, random: float, rows: int = 400) -> dict:
    return {"perturbation": {"fractions": [0.0, 0.2], "skill": [0.8, skill], "random": [0.8, random],
                             "clean_accuracy": 0.8, "test_rows": rows}}


def test_significance_needs_the_gap_and_the_same_sign_in_every_seed():
    # two SE of the difference at p = 0.8, n = 400: 2 * sqrt(2 * 0.16 / 400) = 0.0566
    assert _significant([_seed(0.60, 0.75)], "perturbation", 0.2)[2]
    assert not _significant([_seed(0.72, 0.75)], "perturbation", 0.2)[2]  # gap inside the noise
    a, b, ok = _significant([_seed(0.50, 0.75), _seed(0.78, 0.76)], "perturbation", 0.2)
    assert (round(a, 3), round(b, 3)) == (0.64, 0.755)
    assert not ok  # the mean gap is large, but one seed points the other way
    assert _significant([_seed(0.60, 0.75), _seed(0.62, 0.74)], "perturbation", 0.2)[2]
    assert not _significant([_seed(0.60, 0.75, rows=10)], "perturbation", 0.2)[2]  # few rows: wide noise band


def test_speed_table_reads_the_benchmark_csv(tmp_path):
    head = "bench,op,provider,shape,dtype,metric,median,p20,p80,unit,n,device\n"
    rows = [("pruned-sliced", "m:batch=1:seq=32:keep=0.02", "1.5", "1.4", "1.6"),
            ("flop-limit", "m:batch=1:seq=32:keep=0.02", "1.8", "1.8", "1.8"),
            ("pruned-sliced", "m:batch=8:seq=32:keep=0.02", "1.75", "1.7", "1.8"),
            ("flop-limit", "m:batch=8:seq=32:keep=0.02", "1.8", "1.8", "1.8"),
            ("pruned-masked_ffn", "m:batch=8:seq=32:keep=0.02", "1.2", "1.1", "1.3"),   # slower: not shown
            ("pruned-masked_ffn", "m:batch=1:seq=32:keep=0.02", "1.3", "1.2", "1.4")]
    body = "".join(f"pruned_model,forward,{p},{s},float32,speedup_vs_dense,{m},{lo},{hi},x,10,CPU X\n"
                   for p, s, m, lo, hi in rows)
    (tmp_path / "pruned_model_cpu.csv").write_text(head + body)
    text = "\n".join(_speed_lines(tmp_path))
    assert "| CPU X | float32 | m | batch=1 seq=32 | sliced | 1.50x | 1.40-1.60 | 1.80x | 83% |" in text
    assert "| CPU X | float32 | m | batch=8 seq=32 | sliced | 1.75x | 1.70-1.80 | 1.80x | 97% |" in text
    (tmp_path / "pruned_model_cpu.csv").write_text(head + body.replace("masked_ffn,m:batch=1:seq=32:keep=0.02,"
                                                                       "float32,speedup_vs_dense,1.3",
                                                                       "masked_ffn,m:batch=1:seq=32:keep=0.02,"
                                                                       "float32,speedup_vs_dense,1.7"))
    text2 = "\n".join(_speed_lines(tmp_path))
    assert "| CPU X | float32 | m | batch=1 seq=32 | masked_ffn | 1.70x | 1.20-1.40 | 1.80x | 94% |" in text2
    assert "Every shape reaches the 90% goal." in text2
    assert "Below the 90% goal: m batch=1 seq=32." in text
    assert "Only CPU numbers exist" in text
    assert _speed_lines(tmp_path / "missing") == []


def test_transfer_seed_means_and_correlations_skip_missing_metrics():
    from run_applications import _correlations, _mean_pairs

    s0 = {"a->b": {"zero_shot": 0.6, "after_steps": 0.7, "head_carried": True, "overlap_indicator": 0.1,
                   "skill_indicator": 0.2},
          "a->c": {"zero_shot": None, "after_steps": 0.5, "head_carried": False, "overlap_indicator": 0.3,
                   "skill_indicator": 0.1}}
    s1 = {"a->b": dict(s0["a->b"], zero_shot=0.8, skill_indicator=0.4), "a->c": dict(s0["a->c"], after_steps=0.7)}
    mean = _mean_pairs([s0, s1])
    assert mean["a->b"]["zero_shot"] == 0.7 and abs(mean["a->b"]["skill_indicator"] - 0.3) < 1e-12
    assert mean["a->c"]["zero_shot"] is None and mean["a->c"]["after_steps"] == 0.6
    assert mean["a->b"]["head_carried"] is True and mean["a->c"]["head_carried"] is False
    pairs = {f"p{i}": {"zero_shot": None if i % 2 else i / 10, "after_steps": i / 10, "overlap_indicator": i,
                       "skill_indicator": -i, "relative_zero_shot": None, "relative_after_steps": i,
                       "gain_over_scratch": i} for i in range(8)}
    corr, p, counts = _correlations(pairs, sorted(pairs))
    assert counts["zero_shot"] == 4 and counts["after_steps"] == 8 and counts["relative_zero_shot"] == 0
    assert corr["overlap_indicator~after_steps"] == 1.0 and corr["skill_indicator~zero_shot"] == -1.0
    assert corr["skill_indicator~relative_zero_shot"] != corr["skill_indicator~relative_zero_shot"]  # nan: no pairs
    assert p["overlap_indicator~after_steps"] < 0.01
