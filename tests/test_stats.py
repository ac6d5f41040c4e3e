"""Known answers for rndpo.stats: aggregation over seeds, β selection on val, paired bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rndpo.stats import (
    METHOD_ORDER,
    RN_PAIRS,
    CASE_METRIC,
    aggregate,
    case_comparisons,
    comparisons,
    hierarchical_bootstrap,
    method_sort_key,
    paired_bootstrap,
    select_beta,
    selected_rows,
    to_bool,
    to_float,
)

TEST_COLUMNS = ("peak", "final", "sustained", "drop", "auc")


# --------------------------------------------------------------------------- aggregate


def test_aggregate_mean_std_n_known_answer():
    rows = [
        {"method": "dpo", "seed": 0, "peak": 0.7, "drop": 0.1},
        {"method": "dpo", "seed": 1, "peak": 0.8, "drop": 0.2},
        {"method": "dpo", "seed": 2, "peak": 0.9, "drop": ""},  # missing value: skipped for drop only
        {"method": "base", "seed": 0, "peak": 0.5, "drop": 0.0},
    ]
    out = aggregate(rows, by=["method"], metrics=["peak", "drop"])
    assert [r["method"] for r in out] == ["dpo", "base"]
    dpo, base = out
    assert dpo["n"] == 3
    assert dpo["peak_mean"] == pytest.approx(0.8)
    assert dpo["peak_std"] == pytest.approx(0.1)  # sample std (ddof=1) of 0.7, 0.8, 0.9
    assert dpo["peak_n"] == 3
    assert dpo["drop_mean"] == pytest.approx(0.15)
    assert dpo["drop_std"] == pytest.approx(np.std([0.1, 0.2], ddof=1))
    assert dpo["drop_n"] == 2
    assert base["n"] == 1 and base["peak_mean"] == pytest.approx(0.5)
    assert math.isnan(base["peak_std"])  # n = 1: no std


def test_aggregate_groups_nan_beta_together_and_reads_strings():
    rows = [
        {"method": "base", "beta": "", "peak": "0.5"},
        {"method": "base", "beta": float("nan"), "peak": "0.7"},
        {"method": "dpo", "beta": "0.1", "peak": 0.6},
        {"method": "dpo", "beta": 0.1, "peak": 0.8},
        {"method": "dpo", "beta": 1.0, "peak": 0.9},
    ]
    out = aggregate(rows, by=("method", "beta"), metrics=("peak",))
    assert [r["n"] for r in out] == [2, 2, 1]
    assert out[0]["peak_mean"] == pytest.approx(0.6)
    assert out[1]["peak_mean"] == pytest.approx(0.7)


def test_aggregate_validates():
    with pytest.raises(ValueError, match="by"):
        aggregate([{"a": 1}], by=[], metrics=["a"])
    with pytest.raises(ValueError, match="method"):
        aggregate([{"a": 1}], by=["method"], metrics=["a"])
    assert aggregate([], by=["method"], metrics=["peak"]) == []


# --------------------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_constant_difference():
    b = np.array([0.5, 0.6, 0.7, 0.8])
    out = paired_bootstrap(b + 0.1, b, n_boot=2000)
    assert out["n"] == 4
    assert out["mean_diff"] == pytest.approx(0.1)
    assert out["lo"] == pytest.approx(0.1) and out["hi"] == pytest.approx(0.1)
    assert out["p_value_two_sided"] == pytest.approx(2 / 2001)  # the smallest p the bootstrap can give


def test_paired_bootstrap_known_mean_and_pairing():
    # unpaired the two methods overlap completely; paired, a beats b by exactly 0.02 on each seed
    b = np.array([0.2, 0.9, 0.4, 0.6, 0.75])
    a = b + np.array([0.01, 0.03, 0.02, 0.02, 0.02])
    out = paired_bootstrap(a, b, n_boot=5000, seed=1)
    assert out["mean_diff"] == pytest.approx(0.02)
    assert 0.01 <= out["lo"] <= 0.02 <= out["hi"] <= 0.03
    assert out["p_value_two_sided"] < 0.01


def test_paired_bootstrap_ci_covers_true_mean_of_shifted_normal():
    rng = np.random.default_rng(123)
    b = rng.normal(0.0, 1.0, size=200)
    a = b + rng.normal(0.5, 1.0, size=200)  # true mean difference 0.5
    out = paired_bootstrap(a, b, n_boot=4000, ci=0.95, seed=0)
    assert out["lo"] < 0.5 < out["hi"]
    assert out["hi"] - out["lo"] == pytest.approx(2 * 1.96 / math.sqrt(200), rel=0.2)  # ≈ normal CI width
    assert out["p_value_two_sided"] < 0.001
    # a null difference: the CI covers 0 and the p-value is large
    null = paired_bootstrap(b + rng.normal(0.0, 1.0, size=200), b, n_boot=4000)
    assert null["lo"] < 0.0 < null["hi"] or abs(null["mean_diff"]) < 0.2


def test_paired_bootstrap_deterministic_by_seed():
    rng = np.random.default_rng(0)
    a, b = rng.random(6), rng.random(6)
    first = paired_bootstrap(a, b, n_boot=1000, seed=7)
    assert paired_bootstrap(a, b, n_boot=1000, seed=7) == first
    other = paired_bootstrap(a, b, n_boot=1000, seed=8)
    assert other["mean_diff"] == first["mean_diff"]
    assert (other["lo"], other["hi"]) != (first["lo"], first["hi"])


def test_paired_bootstrap_single_pair_and_empty():
    one = paired_bootstrap([0.8], [0.75])
    assert one["n"] == 1 and one["mean_diff"] == pytest.approx(0.05)
    assert math.isnan(one["lo"]) and math.isnan(one["hi"]) and math.isnan(one["p_value_two_sided"])
    # non-finite pairs are dropped
    partial = paired_bootstrap([0.8, float("nan")], [0.75, 0.5])
    assert partial["n"] == 1 and partial["mean_diff"] == pytest.approx(0.05)
    empty = paired_bootstrap([], [])
    assert empty["n"] == 0 and math.isnan(empty["mean_diff"])


def test_paired_bootstrap_validates():
    with pytest.raises(ValueError, match="equal length"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap([1.0], [1.0], n_boot=0)
    with pytest.raises(ValueError, match="ci"):
        paired_bootstrap([1.0], [1.0], ci=1.5)


# --------------------------------------------------------------------------- β selection


def grid_rows(seed_count: int = 3, rng: np.random.Generator | None = None) -> list[dict]:
    """dpo / rn-dpo with a β grid and a base baseline, 2 judges, several seeds; random metrics."""
    rng = rng or np.random.default_rng(0)
    rows = []
    for judge in ("oracle", "agreement"):
        for seed in range(seed_count):
            rows.append({"dataset": "synth", "judge": judge, "mining": "top-vs-rest", "method": "base",
                         "beta": "", "lr": "", "seed": seed, "cell_id": f"base-{judge}-{seed}",
                         **{c: rng.random() for c in TEST_COLUMNS}, "val_sustained": rng.random()})
            for method in ("dpo", "rn-dpo"):
                for beta in (0.01, 0.1, 1.0):
                    rows.append({"dataset": "synth", "judge": judge, "mining": "top-vs-rest", "method": method,
                                 "beta": beta, "lr": 1e-4, "seed": seed, "cell_id": f"{method}-{judge}-{beta}-{seed}",
                                 **{c: rng.random() for c in TEST_COLUMNS}, "val_sustained": rng.random()})
    return rows


def test_select_beta_picks_best_val_sustained_one_per_group():
    rows = grid_rows()
    out = select_beta(rows)
    assert len(out) == len(rows) and all("selected" not in r for r in rows)  # copies; input untouched
    groups = {}
    for row in out:
        groups.setdefault((row["judge"], row["method"], row["seed"]), []).append(row)
    for members in groups.values():
        assert sum(r["selected"] for r in members) == 1
        best = max(members, key=lambda r: r["val_sustained"])
        assert best["selected"]


def test_select_beta_ties_go_to_smaller_beta_and_missing_val_last():
    base = {"dataset": "d", "judge": "j", "mining": "m", "method": "dpo", "seed": 0}
    rows = [
        {**base, "beta": 1.0, "val_sustained": 0.8},
        {**base, "beta": 0.1, "val_sustained": 0.8},
        {**base, "beta": 0.01, "val_sustained": ""},
    ]
    assert [r["selected"] for r in select_beta(rows)] == [False, True, False]
    only_missing = [{**base, "beta": 1.0, "val_sustained": None}, {**base, "beta": 0.1, "val_sustained": None}]
    assert [r["selected"] for r in select_beta(only_missing)] == [False, True]


def test_select_beta_never_reads_test_columns():
    rows = grid_rows()
    reference = [r["selected"] for r in select_beta(rows)]
    rng = np.random.default_rng(99)
    for _ in range(3):
        shuffled = [dict(r) for r in rows]
        for column in TEST_COLUMNS:
            values = [r[column] for r in shuffled]
            rng.shuffle(values)
            for row, value in zip(shuffled, values):
                row[column] = value
        assert [r["selected"] for r in select_beta(shuffled)] == reference
    stripped = [{k: v for k, v in r.items() if k not in TEST_COLUMNS} for r in rows]
    assert [r["selected"] for r in select_beta(stripped)] == reference


def test_selected_rows_uses_column_or_recomputes():
    rows = grid_rows()
    marked = select_beta(rows)
    # flip the runner's choice for one group: selected_rows must honour the column as written
    group = [r for r in marked if r["judge"] == "oracle" and r["method"] == "dpo" and r["seed"] == 0]
    for row in group:
        row["selected"] = "True" if row["beta"] == 1.0 else "False"
    chosen = selected_rows(marked)
    assert len(chosen) == 2 * 3 * 3  # judges × seeds × methods
    pick = [r for r in chosen if r["judge"] == "oracle" and r["method"] == "dpo" and r["seed"] == 0]
    assert [r["beta"] for r in pick] == [1.0]
    # column missing → recomputed on val
    recomputed = selected_rows(rows)
    assert sorted(r["cell_id"] for r in recomputed) == sorted(r["cell_id"] for r in select_beta(rows) if r["selected"])


# --------------------------------------------------------------------------- comparisons


def test_comparisons_known_differences():
    rows = []
    for seed in range(4):
        common = {"dataset": "synth", "judge": "oracle", "mining": "top-vs-rest", "seed": seed, "lr": 1e-4}
        rows.append({**common, "method": "base", "beta": "", "peak": 0.60 + 0.01 * seed, "sustained": 0.6,
                     "final": 0.6, "drop": 0.0, "val_sustained": 0.6})
        for beta, bonus in ((0.1, 0.0), (1.0, 0.05)):  # β = 1 wins on val AND is worse on test: must be chosen
            val = 0.7 + bonus
            rows.append({**common, "method": "dpo", "beta": beta, "peak": 0.70 + 0.01 * seed - bonus,
                         "sustained": 0.65, "final": 0.62, "drop": 0.08, "val_sustained": val})
            rows.append({**common, "method": "rn-dpo", "beta": beta, "peak": 0.75 + 0.01 * seed - bonus,
                         "sustained": 0.72, "final": 0.71, "drop": 0.04, "val_sustained": val})
    out = comparisons(rows, n_boot=500)
    table = {(r["comparison"], r["metric"]): r for r in out}
    assert {r["comparison"] for r in out} == {"rn-dpo − dpo", "dpo − base", "rn-dpo − base"}
    assert [r["comparison"] for r in out][0] == "rn-dpo − dpo"  # region-normalised comparisons come first
    rn = table[("rn-dpo − dpo", "peak")]
    assert rn["n"] == 4 and rn["seeds"] == "0 1 2 3"
    assert rn["mean_diff"] == pytest.approx(0.05)
    assert rn["lo"] == pytest.approx(0.05) and rn["hi"] == pytest.approx(0.05)
    assert table[("rn-dpo − dpo", "drop")]["mean_diff"] == pytest.approx(-0.04)
    # selected β = 1 (val), whose test peak is 0.70 - 0.05 + 0.01 s; base is 0.60 + 0.01 s
    assert table[("dpo − base", "peak")]["mean_diff"] == pytest.approx(0.05)
    assert table[("dpo − base", "peak")]["mean_a"] == pytest.approx(0.665)
    assert table[("rn-dpo − base", "sustained")]["mean_diff"] == pytest.approx(0.12)


def test_comparisons_pair_only_shared_seeds_and_skip_missing_partners():
    rows = [
        {"dataset": "d", "judge": "j", "mining": "m", "method": "rn-dpo", "beta": 0.1, "seed": s,
         "peak": 0.8, "sustained": 0.8, "final": 0.8, "drop": 0.0, "val_sustained": 0.8}
        for s in (0, 1, 2)
    ] + [
        {"dataset": "d", "judge": "j", "mining": "m", "method": "dpo", "beta": 0.1, "seed": s,
         "peak": 0.7, "sustained": 0.7, "final": 0.7, "drop": 0.0, "val_sustained": 0.7}
        for s in (1, 2, 5)
    ] + [
        {"dataset": "d", "judge": "j", "mining": "m", "method": "ipo", "beta": 0.1, "seed": 0,
         "peak": 0.7, "sustained": 0.7, "final": 0.7, "drop": 0.0, "val_sustained": 0.7}
    ]
    out = comparisons(rows, metrics=("peak",), n_boot=200)
    assert len(out) == 1  # no rn-ipo, no base: only rn-dpo − dpo
    assert out[0]["n"] == 2 and out[0]["seeds"] == "1 2"
    assert out[0]["mean_diff"] == pytest.approx(0.1)


# --------------------------------------------------------------------------- per-case comparisons


def test_hierarchical_bootstrap_constant_and_mean_of_seed_means():
    a = [np.full(5, 0.8), np.full(50, 0.6)]
    b = [np.full(5, 0.7), np.full(50, 0.7)]
    result = hierarchical_bootstrap(a, b, n_boot=500)
    # the estimate weighs seeds equally (not cases): (0.1 + (-0.1)) / 2 = 0, not the pooled -0.082
    assert result["mean_diff"] == pytest.approx(0.0, abs=1e-12)
    assert result["n"] == 2 and result["n_cases"] == 55
    same = hierarchical_bootstrap([np.full(7, 0.9)] * 3, [np.full(7, 0.85)] * 3, n_boot=200)
    assert same["lo"] == pytest.approx(0.05) and same["hi"] == pytest.approx(0.05)
    assert same["p_value_two_sided"] == pytest.approx(2 / 201)


def test_hierarchical_bootstrap_one_seed_is_the_case_bootstrap():
    rng = np.random.default_rng(3)
    d = rng.normal(0.02, 0.1, 400)
    one = hierarchical_bootstrap([d], [np.zeros(400)], n_boot=4000)
    flat = paired_bootstrap(d, np.zeros(400), n_boot=4000)
    assert one["mean_diff"] == pytest.approx(flat["mean_diff"])
    assert (one["hi"] - one["lo"]) == pytest.approx(flat["hi"] - flat["lo"], rel=0.1)
    # and the width is the normal-theory one: 2 · 1.96 · sd / sqrt(n)
    assert (one["hi"] - one["lo"]) == pytest.approx(2 * 1.96 * d.std(ddof=1) / np.sqrt(400), rel=0.1)


def test_hierarchical_bootstrap_carries_seed_variance():
    """Seeds that disagree widen the interval beyond a bootstrap that pools every case."""
    rng = np.random.default_rng(0)
    offsets = [-0.03, 0.0, 0.03]
    a = [rng.normal(0.01 + o, 0.05, 300) for o in offsets]
    b = [np.zeros(300)] * 3
    two_level = hierarchical_bootstrap(a, b, n_boot=4000)
    pooled = paired_bootstrap(np.concatenate(a), np.zeros(900), n_boot=4000)
    assert two_level["mean_diff"] == pytest.approx(pooled["mean_diff"])
    assert (two_level["hi"] - two_level["lo"]) > 3 * (pooled["hi"] - pooled["lo"])
    assert two_level["lo"] < two_level["mean_diff"] < two_level["hi"]
    assert hierarchical_bootstrap(a, b, n_boot=300, seed=5) == hierarchical_bootstrap(a, b, n_boot=300, seed=5)


def test_hierarchical_bootstrap_drops_nan_and_validates():
    result = hierarchical_bootstrap([np.array([0.5, np.nan, 0.7]), np.array([np.nan])],
                                    [np.array([0.4, 0.1, 0.5]), np.array([0.2])], n_boot=100)
    assert result["n"] == 1 and result["n_cases"] == 2
    assert result["mean_diff"] == pytest.approx(0.15)
    empty = hierarchical_bootstrap([], [], n_boot=10)
    assert empty["n"] == 0 and math.isnan(empty["mean_diff"])
    with pytest.raises(ValueError, match="same seeds"):
        hierarchical_bootstrap([np.zeros(3)], [], n_boot=10)
    with pytest.raises(ValueError, match="aligned by case"):
        hierarchical_bootstrap([np.zeros(3)], [np.zeros(4)], n_boot=10)
    with pytest.raises(ValueError, match="n_boot"):
        hierarchical_bootstrap([np.zeros(3)], [np.zeros(3)], n_boot=0)


def test_case_comparisons_match_cases_by_id_and_use_selected_cells():
    def row(method, seed, cell, beta=None, val=0.5):
        return {"dataset": "d", "judge": "j", "mining": "m", "method": method, "seed": seed, "beta": beta,
                "lr": 1e-3, "cell_id": cell, "val_sustained": val, "final": 0.0}

    rows = [row("base", 0, "b0"), row("base", 1, "b1"),
            row("dpo", 0, "d0"), row("dpo", 1, "d1"),
            row("rn-dpo", 0, "r0", beta=1.0, val=0.9), row("rn-dpo", 0, "r0-loser", beta=10.0, val=0.1),
            row("rn-dpo", 1, "r1", beta=1.0)]
    per_case = {
        "b0": {"x": 0.5, "y": 0.6}, "b1": {"x": 0.5, "y": 0.5},
        "d0": {"y": 0.7, "x": 0.6}, "d1": {"x": 0.6, "y": 0.6},            # dpo − base: +0.1 in every case
        "r0": {"x": 0.9, "y": 0.8}, "r1": {"y": 0.6, "x": 0.7, "z": 1.0},  # z exists on one side only
        "r0-loser": {"x": 0.0, "y": 0.0},                                 # not chosen on val: never read
    }
    out = {r["comparison"]: r for r in case_comparisons(rows, per_case, n_boot=300)}
    assert set(out) == {"rn-dpo − dpo", "dpo − base", "rn-dpo − base"}
    rn = out["rn-dpo − dpo"]
    # seed 0: (0.3 + 0.1) / 2 = 0.2; seed 1: (0.1 + 0.0) / 2 = 0.05 (z ignored); mean of seeds 0.125
    assert rn["mean_diff"] == pytest.approx(0.125) and rn["n"] == 2 and rn["n_cases"] == 4
    assert rn["metric"] == CASE_METRIC and rn["seeds"] == "0 1"
    assert out["dpo − base"]["mean_diff"] == pytest.approx(0.1)
    assert out["dpo − base"]["lo"] == pytest.approx(0.1) and out["dpo − base"]["hi"] == pytest.approx(0.1)
    # a seed whose cells lack per-case values is left out; no seed at all leaves the comparison out
    partial = case_comparisons(rows, {k: v for k, v in per_case.items() if k not in ("d1",)}, n_boot=50)
    assert {r["comparison"]: r["n"] for r in partial}["rn-dpo − dpo"] == 1
    assert case_comparisons(rows, {}, n_boot=50) == []


def test_small_helpers():
    assert METHOD_ORDER[0] == "base" and METHOD_ORDER[-1] == "oracle"
    assert ("rn-dpo", "dpo") in RN_PAIRS and ("rn-rdpo", "rdpo") in RN_PAIRS and ("rn-ipo", "ipo") in RN_PAIRS
    assert sorted(["oracle", "zzz", "rn-dpo", "base", "dpo"], key=method_sort_key) == ["base", "dpo", "rn-dpo", "oracle", "zzz"]
    assert to_bool("True") is True and to_bool("0") is False and to_bool("") is None and to_bool(float("nan")) is None
    assert math.isnan(to_float("")) and to_float("0.5") == 0.5 and math.isnan(to_float(None))
