"""analysis/heldout.py on planted checkpoint runs: paired differences and their verdicts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from teachdiag.analysis import heldout
from teachdiag.errors import InputError
from teachdiag.table import COLUMNS, rows_to_csv


def write_run(folder, gains: np.ndarray, ctx: np.ndarray, pos: np.ndarray) -> None:
    folder.mkdir(parents=True)
    rows = [{c: 0.0 for c in COLUMNS} | {"context_id": f"c{c}", "position": int(p), "token": "x", "finite": 1,
                                         "instrument": "checkpoint", "gain_fkl": float(g), "rel_gain_fkl": float(g) / 2}
            for g, c, p in zip(gains, ctx, pos)]
    (folder / "tokens.csv").write_text(rows_to_csv(rows, header=True))


def test_planted_paired_differences(tmp_path):
    rng = np.random.default_rng(0)
    ctx, pos = np.repeat(np.arange(30), 10), np.tile(np.arange(10), 30)
    base = rng.normal(0.01, 0.02, 300) + np.repeat(rng.normal(0, 0.01, 30), 10)  # a context effect
    write_run(tmp_path / "gain_teachability", base + 0.005, ctx, pos)
    write_run(tmp_path / "gain_fkl", base + 0.005 + rng.normal(0, 1e-4, 300), ctx, pos)
    write_run(tmp_path / "gain_random", base - 0.01, ctx, pos)
    runs = heldout.load(tmp_path)
    assert list(runs) == ["teachability", "fkl", "random"]
    means, diffs = heldout.compare(runs, "gain_fkl", n_boot=300)
    assert means.set_index("selector").loc["random", "mean"] == pytest.approx(base.mean() - 0.01)
    d = diffs.set_index("other")
    assert d.loc["random", "mean"] == pytest.approx(0.015) and d.loc["random", "verdict"] == "teachability higher"
    assert d.loc["fkl", "verdict"] == "inconclusive"
    # paired: the shared context effect cancels, so the difference's CI is far narrower than a mean's
    m = means.set_index("selector").loc["teachability"]
    assert d.loc["random", "ci_high"] - d.loc["random", "ci_low"] < 1e-9 < m["ci_high"] - m["ci_low"]
    assert heldout.main([str(tmp_path), "--bootstrap", "50"]) == 0
    assert (tmp_path / "analysis" / "heldout.md").is_file() and (tmp_path / "analysis" / "heldout.png").is_file()
    back = pd.read_csv(tmp_path / "analysis" / "heldout_gains.csv.gz")
    assert len(back) == 900 and (back.loc[back.selector == "random", "gain_fkl"].to_numpy() == runs["random"]["gain_fkl"].to_numpy()).all()


def test_runs_over_different_positions_are_refused(tmp_path):
    write_run(tmp_path / "gain_teachability", np.zeros(4), np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]))
    write_run(tmp_path / "gain_fkl", np.zeros(4), np.array([0, 0, 1, 2]), np.array([0, 1, 0, 1]))
    with pytest.raises(InputError, match="positions differ"):
        heldout.load(tmp_path)


def test_pairs_by_position_not_row_order_and_refuses_unfinished(tmp_path):
    ctx, pos = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    write_run(tmp_path / "gain_teachability", np.array([1.0, 2.0, 3.0, 4.0]), ctx, pos)
    write_run(tmp_path / "gain_fkl", np.array([4.0, 3.0, 2.0, 1.0]), ctx[::-1], pos[::-1])  # same gains, rows reversed
    _, diffs = heldout.compare(heldout.load(tmp_path), "gain_fkl", n_boot=20)
    assert diffs["mean"].iloc[0] == 0.0
    (tmp_path / "gain_random").mkdir()
    with pytest.raises(InputError, match="not finished"):
        heldout.load(tmp_path)
