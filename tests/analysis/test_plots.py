"""Figures read by people (#21.10.8): titles name the run, panels share scales, repeated rows are
merged and said so, and a panel with nothing to show says why.

    python -m pytest -q tests/analysis/test_plots.py
"""

import json

import numpy as np
import pandas as pd

import teachdiag.analysis.plots as plots
from synthetic import make_tokens
from teachdiag.analysis.runs import DECILE_SCORES
from teachdiag.analysis.options import AnalyzeConfig
from teachdiag.analysis.stats import add_scores, gain_by_bin


def texts(fig) -> list[str]:
    out = [fig._suptitle.get_text()] if fig._suptitle else []
    for ax in fig.axes:
        out += [ax.get_title(), *(t.get_text() for t in ax.texts), *(t.get_text() for t in ax.get_xticklabels())]
    return out


def test_titles_name_the_models_not_the_folder_timestamp(tmp_path, monkeypatch):
    from teachdiag.commands.analyze import run_analyze

    run = tmp_path / "20261203-051500"  # the default --out of probe: runs/<date-time>
    run.mkdir()
    make_tokens(n_ctx=12, n_pos=20).to_csv(run / "tokens.csv", index=False)
    (run / "run.json").write_text(json.dumps({"complete": True, "top_k": 16, "options": {
        "teacher": "org/Teacher-7B", "student": "/models/student-1b", "optimizer": "normalized", "loss": "reverse_kl"}}))
    figs = {}
    def keep(fig, folder, name, write=None):  # the figures themselves, to read their texts
        figs[name] = fig
        return [tmp_path / f"{name}.png", tmp_path / f"{name}.pdf"]

    monkeypatch.setattr(plots, "save", keep)
    for protocol in ("teachdiag", "paper"):
        run_analyze(AnalyzeConfig(runs=[str(run)], bootstrap=0, protocol=protocol, out=str(tmp_path / protocol)))
    assert len(figs) == 7
    for name, fig in figs.items():
        shown = "\n".join(texts(fig))
        assert "20261203-051500" not in shown, (name, shown)
        assert "Teacher-7B → student-1b" in shown, (name, shown)


def test_gain_by_decile_is_a_grid_with_one_y_scale():
    t = add_scores(make_tokens(n_ctx=20, n_pos=30))
    dec = pd.concat([gain_by_bin(t, s, "rel_gain_fkl", n_boot=0).assign(run="r") for s in DECILE_SCORES])
    fig = plots.gain_by_decile(dec, "rel_gain_fkl")
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == len(DECILE_SCORES) == 7
    assert len({round(ax.get_position().y0, 3) for ax in shown}) >= 2  # rows, not one strip of seven
    width, height = fig.get_size_inches()
    assert width / height < 2.5  # was 2730 x 420 px
    assert len({ax.get_ylim() for ax in shown}) == 1
    assert all(shown[0].get_shared_y_axes().joined(shown[0], ax) for ax in shown)


def test_correlation_heatmap_merges_identical_rows_and_says_so():
    rows = []
    for signal, values in (("fkl", (0.1, 0.2)), ("topk_entropy", (0.3, -0.4)), ("entropy", (0.3, -0.4)),
                           ("teachability", (0.5, 0.6))):
        for gain, v in zip(("gain_fkl", "rel_gain_fkl"), values):
            rows.append({"run": "r", "method": "spearman", "signal": signal, "gain": gain, "estimate": v, "note": ""})
    fig = plots.correlation_heatmap(pd.DataFrame(rows))
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["fkl", "topk_entropy = entropy", "teachability"]


def test_viability_auroc_panel_without_numbers_says_why():
    note = "too few positions (viable 0, not viable 8; need 5 of each)"
    auc = pd.DataFrame({"predictor": ["position", "fkl"], "label": "viable_greedy", "auroc": np.nan,
                        "ci_low": np.nan, "ci_high": np.nan, "note": note})
    by_pos = pd.DataFrame({"label": "viable_greedy", "pos_from": [0.0, 0.5], "pos_to": [0.5, 1.0],
                           "viable_share": [0.0, 0.0], "n": [4, 4]})
    fig = plots.viability(auc, by_pos)
    assert any("too few positions" in t.get_text() for t in fig.axes[0].texts)
