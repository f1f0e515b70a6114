"""`teachdiag calibrate`: the sweep equals the naive reference probe at each lr, restores θ0, tends to
first order, and the lr rule (a pure function, tested on planted summaries)."""

import copy
import json

import pandas as pd
import pytest
import torch

from reference import naive_probe
from teachdiag.calibration import choose_lr, in_regime, parse_lrs, summarize, sweep
from teachdiag.cli import main
from teachdiag.contexts import load_contexts, select_positions
from teachdiag.errors import InputError
from teachdiag.models import load_model

VOCAB = 68  # the test tokenizer's length (conftest)
GRID = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]  # normalized: well linear ... far past it on the tiny pair


def calibrate(pair, contexts, out, *extra):
    teacher, student = pair
    return main(["calibrate", "--teacher", teacher, "--student", student, "--contexts", str(contexts),
                 "--out", str(out), "--device", "cpu", "--quiet", *extra])


@pytest.mark.parametrize("optimizer,loss", [("normalized", "reverse_kl"), ("adam", "forward_kl"),
                                            ("sgd", "sampled_token")])
def test_sweep_equals_naive_reference_at_each_lr_and_restores_theta0(pair, contexts, optimizer, loss):
    """Every (position, lr) of the sweep against the naive deep-copy probe (tests/reference.py: full-
    sequence forwards, torch.distributions loss, torch.optim SGD/Adam or a hand-written normalized step)."""
    teacher, student = load_model(pair[0], "teacher"), load_model(pair[1], "student")
    theta0 = copy.deepcopy(student.state_dict())
    ctxs = load_contexts(contexts)
    picks = select_positions(ctxs, 8, seed=1)
    lrs = [lr * {"normalized": 1, "adam": 1e-3, "sgd": 0.1}[optimizer] for lr in GRID]
    table = sweep(teacher, student, ctxs, picks, lrs, VOCAB, loss, optimizer)
    assert len(table) == len(picks) * len(lrs)
    assert sorted(zip(table["context_id"], table["position"], table["lr"])) == sorted(
        (ctxs[c].id, j, lr) for c, j in picks for lr in lrs)
    assert all(torch.equal(theta0[k], v) for k, v in student.state_dict().items())  # bit for bit
    assert not any(p.requires_grad for p in student.parameters())

    raw = {rec["id"]: rec for rec in map(json.loads, open(contexts))}
    for row in table.itertuples():
        ref = naive_probe(student, teacher, raw[row.context_id], row.position, VOCAB, loss, optimizer, row.lr)
        # float32 forwards of the prefix (sweep) and of the full sequence (reference) round differently:
        # ~1e-7 nats in each KL, ~1e-6 relative in g. The gain is a difference of two KLs, hence an
        # absolute floor; same tolerances as test_probe_equals_naive_reference.
        assert row.grad_norm == pytest.approx(ref["grad_norm"], rel=1e-4)
        first = {"sgd": ref["grad_norm"] ** 2, "normalized": ref["grad_norm"], "adam": ref["g_adam"]}[optimizer]
        assert row.gain_first_order == pytest.approx(row.lr * first, rel=1e-4)
        for col in ("gain_fkl", "gain_rkl"):
            assert getattr(row, col) == pytest.approx(ref[col], rel=2e-3, abs=2e-6), (row.lr, col)
        if loss == "sampled_token":
            # the surrogate −c·log p_S(y) with c = log p_T(y) − log p_S(y) frozen at θ0 drops by
            # c·(log p_S1(y) − log p_S0(y)), from the reference's log-probabilities before and after
            c = ref["teacher_logprob"] - ref["student_logprob"]
            want = c * (ref["student_logprob_after"] - ref["student_logprob"])
        else:
            want = ref["gain_rkl" if loss == "reverse_kl" else "gain_fkl"]
        assert row.gain == pytest.approx(want, rel=2e-3, abs=2e-6), row.lr


def test_ratio_tends_to_one_and_the_summary_follows_the_rule(tmp_path, pair, contexts, capsys):
    out = tmp_path / "calib"
    assert calibrate(pair, contexts, out, "--positions", "12", "--lrs", ",".join(map(str, GRID))) == 0
    stdout = capsys.readouterr().out
    assert "chosen lr" in stdout and len(stdout.strip().splitlines()) <= 4
    table = pd.read_csv(out / "calibration.csv")
    assert list(table.columns[:9]) == ["context_id", "position", "lr", "gain", "gain_first_order", "ratio",
                                       "gain_fkl", "gain_rkl", "grad_norm"]
    assert len(table) == 12 * len(GRID)
    assert (table["ratio"] == table["gain"] / table["gain_first_order"]).all()
    rec = json.loads((out / "calibration.json").read_text())
    summary = pd.DataFrame(rec["summary"])
    assert summary["lr"].tolist() == GRID and (summary["n"] == 12).all()
    assert summary["median_ratio"].iloc[0] == pytest.approx(1, abs=0.02)  # first order as lr -> 0
    assert summary["median_ratio"].iloc[-1] < 0.5  # and far from it at the top of the grid
    lr = rec["chosen_lr"]
    assert lr is not None and f"chosen lr = {lr:.3g}" in stdout
    ok = (summary["median_ratio"].between(0.9, 1.1) & (summary["share_negative"] < 0.05)).tolist()
    i = GRID.index(lr)
    assert ok[i] and (i + 1 == len(GRID) or not ok[i + 1])  # the top of the run ...
    assert all(ok[GRID.index(min(g for g, o in zip(GRID, ok) if o)): i + 1])  # ... that starts lowest
    assert rec["teacher"]["name"] == pair[0] and rec["student"]["name"] == pair[1] and rec["seed"] == 0
    # the run header every command writes: the weights by hash, as probe's run.json pins them
    from teachdiag.provenance import weights_summary
    assert rec["student"]["weights_sha256"] == weights_summary(pair[1])["sha256"] is not None
    assert rec["contexts"]["path"] == str(contexts) and rec["command"].startswith("teachdiag calibrate")
    assert rec["options"]["loss"] == "reverse_kl" and "rule" in rec
    assert (out / "calibration.png").stat().st_size > 10_000


@pytest.mark.parametrize("lrs,expect", [("-1e-3,1e-2", "positive"), (",", "empty"), ("1e-3,nan", "positive"),
                                        ("1e-3,abc", "numbers")])
def test_bad_grid_exits_2_with_one_line(tmp_path, pair, contexts, capsys, lrs, expect):
    assert calibrate(pair, contexts, tmp_path / "o", f"--lrs={lrs}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("teachdiag: error: --lrs:") and expect in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_no_lr_in_regime_writes_files_then_fails(tmp_path, pair, contexts, capsys):
    assert calibrate(pair, contexts, tmp_path / "o", "--positions", "4", "--lrs", "1,3") == 2
    assert "no lr in the linear regime" in capsys.readouterr().err
    assert json.loads((tmp_path / "o/calibration.json").read_text())["chosen_lr"] is None


def test_default_grid():
    lrs = parse_lrs("", "normalized")
    assert len(lrs) == 10 and lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert parse_lrs(" 1e-2, 1e-3 ,1e-3", "sgd") == [1e-3, 1e-2]  # sorted, distinct
    with pytest.raises(InputError):
        parse_lrs("0", "sgd")


# ---------------------------------------------------------------------------- the rule, no models

def planted(ratios, negatives=None):
    n = len(ratios)
    return pd.DataFrame({"lr": [10.0**k for k in range(-n, 0)], "n": 50, "median_ratio": ratios,
                         "share_negative": negatives or [0.0] * n})


@pytest.mark.parametrize("ratios,negatives,expect", [
    ([1.0, 0.99, 0.95, 0.91], None, 1e-1),  # all linear: the top of the grid
    ([1.0, 0.98, 0.85, 0.3], None, 1e-3),  # curvature sets in
    ([1.0, 1.0, 0.97, 0.9], [0, 0, 0.02, 0.05], 1e-2),  # 5% negative gains is already too many
    ([0.4, 1.3, 1.0, 0.95, 0.6], None, 1e-2),  # rounding noise at the smallest lrs: skipped
    ([1.0, 0.8, 1.0, 1.02], None, 1e-4),  # an overshoot back near 1 is never chosen
    ([1.0, float("nan"), 1.0], None, 1e-3),  # no finite ratio: not in regime
    ([0.5, 0.3, 0.1], None, None),  # nothing qualifies
])
def test_choose_lr_on_planted_summaries(ratios, negatives, expect):
    s = planted(ratios, negatives)
    assert choose_lr(s) == expect
    assert choose_lr(s.iloc[::-1]) == expect  # order of the rows does not matter


def test_summarize_counts_only_finite_rows():
    table = pd.DataFrame({"lr": [1e-3] * 4 + [1e-2] * 2, "gain": [1, 1, -1, 5, 1, 1],
                          "gain_first_order": [1, 1, 1, 0, 1, 1], "finite": [1, 1, 1, 1, 0, 0]})
    table["ratio"] = table["gain"] / table["gain_first_order"].where(table["gain_first_order"] != 0)
    s = summarize(table)
    assert s["n"].tolist() == [3, 0] and s["share_negative"].iloc[0] == pytest.approx(1 / 3)
    assert s["median_ratio"].iloc[0] == 1 and not in_regime(s).any()


def test_help():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "teachdiag", "calibrate", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--lrs" in proc.stdout and "linear regime" in proc.stdout


def test_auto_lr_for_the_probe(pair, contexts):
    from teachdiag.calibration import auto_lr

    teacher, student = load_model(pair[0], "teacher"), load_model(pair[1], "student")
    lr, summary = auto_lr(teacher, student, load_contexts(contexts), VOCAB, loss="reverse_kl",
                          optimizer="normalized", params="all", seed=0, positions=6, lrs=GRID)
    assert lr == choose_lr(summary) and lr in GRID and summary["n"].eq(6).all()
    with pytest.raises(InputError, match="no lr in the linear regime"):
        auto_lr(teacher, student, load_contexts(contexts), VOCAB, loss="reverse_kl", optimizer="normalized",
                params="all", seed=0, positions=4, lrs=[1.0, 3.0])


def test_probe_lr_auto_takes_the_calibrated_lr(tmp_path, pair, contexts):
    common = ["--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts), "--device", "cpu",
              "--quiet", "--seed", "1"]
    assert main(["calibrate", *common, "--positions", "6", "--out", str(tmp_path / "cal")]) == 0
    chosen = json.loads((tmp_path / "cal/calibration.json").read_text())["chosen_lr"]
    assert main(["probe", *common, "--lr", "auto", "--auto-lr-positions", "6", "--positions", "5",
                 "--out", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run/run.json").read_text())
    assert record["step"]["lr"] == chosen and record["options"]["lr"] == "auto"
    assert record["step"]["lr_auto"]["positions"] == 6 and len(record["step"]["lr_auto"]["summary"]) == 10
    assert (tmp_path / "run/calibration.png").is_file()


@pytest.mark.parametrize("extra,field", [(["--params", "last:9"], "--params"),
                                         (["--auto-lr-positions", "0"], "--auto-lr-positions")])
def test_probe_lr_auto_bad_options_are_one_line(tmp_path, pair, contexts, capsys, extra, field):
    assert main(["probe", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts), "--device",
                 "cpu", "--quiet", "--lr", "auto", "--out", str(tmp_path / "r"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err and "Traceback" not in err


def test_the_python_api_writes_what_the_cli_writes_for_lr_auto_and_calibrate(tmp_path, pair, contexts):
    """The two front doors call the same run_* functions: teachdiag.run_probe(lr="auto") draws the
    sweep's figure as `teachdiag probe --lr auto` does (before, only the CLI drew it), and
    teachdiag.run_calibrate returns the summary calibration.json holds."""
    import teachdiag

    common = dict(teacher=pair[0], student=pair[1], contexts=str(contexts), device="cpu", seed=1)
    summary = teachdiag.run_calibrate(out=str(tmp_path / "cal"), positions="6", **common)
    record = json.loads((tmp_path / "cal/calibration.json").read_text())
    assert summary.to_dict("records") == record["summary"] and len(summary) == 10
    run = teachdiag.run_probe(out=str(tmp_path / "run"), lr="auto", auto_lr_positions=6, positions="5", **common)
    assert run.record["step"]["lr"] == record["chosen_lr"]
    assert (tmp_path / "run/calibration.png").is_file() and (tmp_path / "run/calibration.pdf").is_file()


def test_calibration_json_is_the_run_record_written_last(tmp_path, pair, contexts, monkeypatch):
    """While the sweep runs, calibration.json is this sweep's run record with "complete": false (an
    older sweep's record is gone); it is complete only once the table and the figure are written."""
    import teachdiag.commands.calibrate as cal

    out, real_sweep, seen = tmp_path / "calib", cal.sweep, []
    out.mkdir()
    (out / "calibration.json").write_text('{"complete": true, "chosen_lr": 1}\n')  # an older sweep's

    def sweep(*a, **k):
        seen.append(json.loads((out / "calibration.json").read_text()))
        return real_sweep(*a, **k)

    monkeypatch.setattr(cal, "sweep", sweep)
    assert calibrate(pair, contexts, out, "--positions", "4", "--lrs", "1e-4,1e-3") == 0
    assert seen[0]["complete"] is False and "chosen_lr" not in seen[0] and seen[0]["student"]["weights_sha256"]
    rec = json.loads((out / "calibration.json").read_text())
    assert rec["complete"] is True and "summary" in rec
    assert all((out / f"calibration.{s}").stat().st_size > 0 for s in ("csv", "png", "pdf"))
    assert not list(out.glob("*.tmp"))
