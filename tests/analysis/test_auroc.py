"""analysis/viability.py: AUROC against scipy's Mann-Whitney U, planted answers and CI coverage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import mannwhitneyu

from teachdiag.analysis.viability import PREDICTORS, auroc, auroc_table, viable_by_position


@pytest.mark.parametrize("seed", range(4))
def test_auroc_is_mann_whitney_u_over_n1_n0(seed):
    rng = np.random.default_rng(seed)
    score = rng.integers(0, 6, 300).astype(float)  # many ties
    label = rng.random(300) < 0.3 + 0.08 * score
    u = mannwhitneyu(score[label], score[~label], alternative="two-sided").statistic
    assert auroc(score, label) == pytest.approx(u / (label.sum() * (~label).sum()), abs=1e-12)


def test_auroc_planted_values():
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5  # all tied: chance
    assert auroc([1, 2, 2, 3], [0, 1, 0, 1]) == 0.875  # pairs (2,1) (2,2) (3,1) (3,2): 1 + ½ + 1 + 1 over 4
    assert np.isnan(auroc([1, 2], [1, 1]))


def planted(n_ctx: int, per: int, rng, slope: float = 4.0) -> pd.DataFrame:
    """Viability that rises with relative position (logistic), plus a context effect; every other
    predictor is noise."""
    rows = []
    for c in range(n_ctx):
        bias = rng.normal(0, 0.5)
        T = int(rng.integers(20, 60))
        for j in np.sort(rng.choice(T, per, replace=False)):
            p = 1 / (1 + np.exp(-(slope * (j / (T - 1) - 0.5) + bias)))
            rows.append({"context_id": f"c{c}", "position": j, "response_length": T, "pos_norm": j / (T - 1),
                         "viable_greedy": int(rng.random() < p), "viable_sampled": float("nan"), "finite": 1,
                         **{col: rng.normal() for _, col, _ in PREDICTORS if col not in ("pos_norm", "position_weight")}})
    return pd.DataFrame(rows)


def test_planted_position_effect_is_found_and_noise_is_chance():
    t = auroc_table(planted(80, 8, np.random.default_rng(0)), n_boot=200)
    by = t.set_index("predictor")
    assert by.loc["position", "auroc"] > 0.7 and by.loc["position", "ci_low"] > 0.6
    assert by.loc["position_weight", "auroc"] == pytest.approx(by.loc["position", "auroc"], abs=0.02)
    for name in ("teacher_entropy", "fkl", "teachability"):  # noise: chance, within ~2.5 standard errors
        assert abs(by.loc[name, "auroc"] - 0.5) < 0.06
    assert by.loc["teacher_entropy", "paper"] == "≤ 0.57" and by.loc["position", "paper"].startswith("0.83")


def test_cluster_ci_covers_the_truth():
    """95% cluster-bootstrap CIs of the position AUROC cover the population value (from a very large
    planted sample) in at least 85% of 30 seeded repetitions (expected 95%; 30 draws are noisy)."""
    big = planted(4000, 8, np.random.default_rng(123))
    truth = auroc(big["pos_norm"], big["viable_greedy"] == 1)
    hits = 0
    for seed in range(30):
        t = auroc_table(planted(60, 8, np.random.default_rng(seed)), n_boot=200, seed=seed)
        row = t.set_index("predictor").loc["position"]
        hits += row["ci_low"] <= truth <= row["ci_high"]
    assert hits >= 26


def test_too_few_of_a_class_gives_a_note_not_a_number():
    df = planted(5, 4, np.random.default_rng(1))
    df["viable_greedy"] = 0
    df.loc[0, "viable_greedy"] = 1
    t = auroc_table(df, n_boot=10)
    assert t["auroc"].isna().all() and t["note"].str.contains("too few").all()


def test_viable_by_position_bins():
    df = pd.DataFrame({"context_id": ["a"] * 4, "pos_norm": [0.0, 0.1, 0.9, 1.0], "viable_greedy": [0, 0, 1, 1],
                       "viable_sampled": [np.nan] * 4, "finite": [1] * 4})
    b = viable_by_position(df, bins=2)
    assert b["viable_share"].tolist() == [0.0, 1.0] and b["n"].tolist() == [2, 2]
