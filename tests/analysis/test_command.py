"""`teachdiag analyze` end to end on synthetic runs: every file written, input errors, no torch.

    python -m pytest -q tests/test_analyze_cli.py
"""

import dataclasses
import json
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from synthetic import make_tokens
from teachdiag.analysis.runs import COLUMNS, load_run, load_tokens
from teachdiag.analysis.options import AnalyzeConfig
from teachdiag.commands.analyze import run_analyze
from teachdiag.errors import InputError

TABLES = ["correlations.csv", "regressions.csv", "q3.csv", "selection.csv", "summary.md",
          "summary.tex"]
FIGURES = ["gain_vs_fkl", "gain_by_decile", "gain_vs_fkl_by_compat", "selection_by_budget",
           "std_coefficients", "correlation_heatmap"]


def write_run(folder: pathlib.Path, complete: bool = True, **kw) -> pathlib.Path:
    folder.mkdir(parents=True)
    make_tokens(**kw).to_csv(folder / "tokens.csv", index=False)
    (folder / "run.json").write_text(json.dumps({"complete": complete, "top_k": 16,
                                                 "options": {"step": "sgd", "lr": 1e-4}}))
    return folder


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    """Two runs analyzed side by side, default output folder."""
    root = tmp_path_factory.mktemp("runs")
    r1 = write_run(root / "sgd", n_ctx=20, n_pos=30, n_nonfinite=7, seed=1)
    r2 = write_run(root / "adam", n_ctx=15, n_pos=20, effect="incompat", seed=2)
    out = run_analyze(AnalyzeConfig(runs=[str(r1), str(r2)], bootstrap=50))
    return out, r1


def test_writes_every_file_in_the_default_folder(analyzed):
    out, r1 = analyzed
    assert out == r1 / "analysis"
    for name in TABLES:
        assert (out / name).stat().st_size > 100, name


def test_figures_are_nonempty_png_and_pdf(analyzed):
    out, _ = analyzed
    for name in FIGURES:
        png, pdf = out / "figures" / f"{name}.png", out / "figures" / f"{name}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1024, name
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1024, name


def test_tables_hold_both_runs_and_report_excluded_rows(analyzed):
    out, _ = analyzed
    for name in TABLES[:4]:
        assert set(pd.read_csv(out / name)["run"]) == {"sgd", "adam"}, name
    corr = pd.read_csv(out / "correlations.csv")
    assert set(corr["gain"]) == {"gain_fkl", "gain_rkl", "rel_gain_fkl", "rel_gain_rkl"}
    assert {"teachability", "tip", "teach_entropy", "random", "position"} <= set(corr["signal"])
    assert corr[corr["run"] == "sgd"]["n"].max() == 20 * 30 - 7
    md = (out / "summary.md").read_text()
    assert "7 excluded as non-finite" in md and "Verdict" in md
    assert "do NOT support" in md  # the "adam" run was planted on incompat
    tex = (out / "summary.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and tex.count("Verdict") == 2


def test_partial_run_is_refused_unless_allowed(tmp_path):
    run = write_run(tmp_path / "r", complete=False, n_ctx=3, n_pos=4)
    with pytest.raises(InputError, match="complete"):
        load_run(run)
    assert load_run(run, allow_partial=True)["n_rows"] == 12
    with pytest.raises(InputError, match="allow-partial"):
        run_analyze(AnalyzeConfig(runs=[str(run)], bootstrap=0))


def test_partial_run_without_a_finished_context_says_so(tmp_path, capsys):
    """A probe killed during its first context leaves run.json ("complete": false) and no table yet:
    --allow-partial says that, not "no such file" (#21.10.4)."""
    from teachdiag.cli import main

    run = tmp_path / "r"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"complete": False, "top_k": 16, "options": {}}))
    with pytest.raises(InputError, match="no finished context yet"):
        load_run(run, allow_partial=True)
    assert main(["analyze", str(run), "--allow-partial", "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no finished context yet" in err and "no such file" not in err


def test_interrupted_probe_folder_reads_the_partial_table(tmp_path):
    run = write_run(tmp_path / "r", complete=False, n_ctx=4, n_pos=5)
    df = pd.read_csv(run / "tokens.csv")
    df.assign(teachability="", incompat="").to_csv(run / "tokens.partial.csv", index=False)
    (run / "tokens.csv").unlink()
    with pytest.raises(InputError, match="incomplete"):
        load_run(run)
    t = load_run(run, allow_partial=True)["table"]
    np.testing.assert_allclose(t["teachability"].to_numpy(), df["teachability"].to_numpy())
    np.testing.assert_allclose(t["incompat"].to_numpy(), df["incompat"].to_numpy())

    # an interrupted torchrun run: rank 1's part is read too
    part = pd.read_csv(run / "tokens.partial.csv")
    first = part["context_id"].isin(part["context_id"].unique()[:2])
    part[first].to_csv(run / "tokens.partial.csv", index=False)
    part[~first].to_csv(run / "tokens.partial.rank1.csv", index=False)
    t2 = load_run(run, allow_partial=True)["table"]
    pd.testing.assert_frame_equal(t2, t)


def test_input_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(InputError, match="tokens.csv: no such file"):
        load_run(tmp_path)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(InputError, match="empty.csv: file is empty"):
        load_tokens(empty)
    df = make_tokens(n_ctx=2, n_pos=3)
    df.drop(columns="compat_mass").to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(InputError) as e:
        load_tokens(tmp_path / "a.csv")
    assert e.value.field == "compat_mass" and "\n" not in str(e.value) and "a.csv" in str(e.value)
    df.iloc[:0].to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(InputError, match="no rows"):
        load_tokens(tmp_path / "b.csv")
    bad = df.astype({"fkl": object})
    bad.loc[2, "fkl"] = "oops"
    bad.to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(InputError, match=r"c.csv:4: fkl: not a number"):
        load_tokens(tmp_path / "c.csv")
    df.assign(finite=0).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(InputError, match="finite"):
        load_tokens(tmp_path / "d.csv")
    with pytest.raises(InputError, match="gain"):
        run_analyze(AnalyzeConfig(runs=[str(tmp_path / "a.csv")], gain="fkl"))


def test_gz_file_with_bool_finite_and_table_order(tmp_path):
    df = make_tokens(n_ctx=3, n_pos=4, seed=3).iloc[::-1]  # positions descending
    df["finite"] = [True] * 11 + [False]
    df.to_csv(tmp_path / "t.csv.gz", index=False)
    t, excluded = load_tokens(tmp_path / "t.csv.gz")
    assert excluded == 1 and len(t) == 11
    assert list(t["position"][:4]) == [0, 1, 2, 3] and t["context_id"].iloc[0] == "c002"
    na = make_tokens(n_ctx=2, n_pos=2).assign(context_id="NA", token="nan")
    na.to_csv(tmp_path / "na.csv", index=False)
    t, _ = load_tokens(tmp_path / "na.csv")  # text stays text, as the probe wrote it
    assert (t["context_id"] == "NA").all() and (t["token"] == "nan").all()


def test_config_follows_the_cli_convention():
    fields = {f.name: f for f in dataclasses.fields(AnalyzeConfig)}
    assert list(fields) == ["runs", "gain", "out", "figures", "bootstrap", "seed", "allow_partial",
                            "protocol", "response_lengths"]
    assert fields["runs"].metadata["positional"] and fields["runs"].metadata["nargs"] == "+"
    assert all(f.metadata.get("help") for f in fields.values())
    cfg = AnalyzeConfig()
    assert (cfg.gain, cfg.bootstrap, cfg.seed, cfg.allow_partial) == ("rel_gain_fkl", 1000, 0, False)
    assert cfg.protocol == "teachdiag" and fields["protocol"].metadata["choices"] == ("teachdiag", "paper")
    assert COLUMNS[0] == "context_id" and COLUMNS[21] == "grad_norm" and COLUMNS[23] == "finite"
    assert COLUMNS[-4:-2] == ["response_length", "instrument"]  # added in 0.2, after the 0.1 columns
    assert COLUMNS[-2:] == ["student_dropped_mass", "teacher_dropped_mass"]  # after 0.2's, for differing tokenizers


def test_analysis_path_never_imports_torch():
    code = ("import sys, teachdiag.commands.analyze, teachdiag.analysis.runs, teachdiag.analysis.stats, teachdiag.analysis.plots, "
            "teachdiag.analysis.report, teachdiag.analysis.selection, teachdiag.analysis.paper, "
            "teachdiag.analysis.paper_report, teachdiag.analysis.paper_command; assert 'torch' not in sys.modules")
    root = pathlib.Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_titles_of_lr_auto_and_checkpoint_runs():
    from teachdiag.analysis.runs import describe

    t = pd.DataFrame({"instrument": ["per_position"]})
    opts = {"optimizer": "normalized", "lr": "auto", "loss": "reverse_kl"}
    assert describe({"options": opts, "step": {"lr": 0.003}, "table": t}) == \
        "per-position gain: normalized step, lr 0.003, reverse_kl loss"
    assert "lr auto" in describe({"options": opts, "table": t})  # an older record: no crash
    assert describe({"options": opts, "table": pd.DataFrame({"instrument": ["checkpoint"]})}).startswith(
        "checkpoint gain: θ0 → θτ")


def test_the_record_names_every_file_and_the_tables_read(analyzed):
    """analysis.json: complete, the files written (tables, summary, figures), and the sha256 of each
    input table and run record, so a number in a paper can be traced to the bytes it came from."""
    from teachdiag.provenance import file_sha256

    out, r1 = analyzed
    record = json.loads((out / "analysis.json").read_text())
    assert record["complete"] is True and record["command"].startswith("teachdiag analyze")
    assert record["options"]["bootstrap"] == 50 and record["teachdiag"]["version"]
    assert set(TABLES) | {f"figures/{f}.{s}" for f in FIGURES for s in ("png", "pdf")} <= set(record["files"])
    assert all((out / f).is_file() for f in record["files"])
    first = record["inputs"][0]
    assert first["path"] == str(r1)
    assert first["sha256"] == {"tokens.csv": file_sha256(r1 / "tokens.csv"), "run.json": file_sha256(r1 / "run.json")}
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("protocol", ["teachdiag", "paper"])
def test_a_disk_failing_mid_analysis_is_one_line_and_leaves_no_finished_look(tmp_path, monkeypatch, capsys,
                                                                           protocol):
    """A full disk at the fourth file: one line naming the file (exit 2, no traceback); the files
    before it are whole (equal to an unbroken run's), none is torn, and analysis.json says
    complete: false. Run again, the analysis completes."""
    import errno
    import os

    import teachdiag.durable as durable
    from teachdiag.cli import main

    run = write_run(tmp_path / "r", n_ctx=12, n_pos=10, seed=4)
    args = ["analyze", str(run), "--bootstrap", "20", "--protocol", protocol]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    real, calls = durable._fsync_write, []

    def failing_write(path, text, mode="a"):
        calls.append(pathlib.Path(path).name)
        if len(calls) == 5:  # the record, then the fourth file
            real(path, text[: len(text) // 2], mode)  # torn where a real disk would tear it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, text, mode)

    monkeypatch.setattr(durable, "_fsync_write", failing_write)
    out = tmp_path / "broken"
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the progress lines, then the error
    torn = calls[-1].removesuffix(".tmp")
    assert sum("error" in line for line in err) == 1 and not any("Traceback" in line for line in err), err
    assert err[-1].startswith(f"teachdiag: error: {out}/{torn}")
    assert os.strerror(errno.ENOSPC) in err[-1] and "complete: false" in err[-1]
    assert json.loads((out / "analysis.json").read_text())["complete"] is False
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(torn))
    written = [n.removesuffix(".tmp") for n in calls[1:4]]
    for name in written:  # whole, and the same as the unbroken run's (figures: PNGs are deterministic)
        if not name.endswith(".pdf"):
            assert next(out.rglob(name)).read_bytes() == next((tmp_path / "whole").rglob(name)).read_bytes(), name
    monkeypatch.setattr(durable, "_fsync_write", real)
    assert main([*args, "--out", str(out)]) == 0
    assert json.loads((out / "analysis.json").read_text())["complete"] is True


def test_an_earlier_analysis_files_not_written_again_are_removed(tmp_path):
    """Analysing again into the same --out with one run instead of two: the earlier instruments.csv
    (written only for several runs) is removed, not left whole and stale beside the new tables; a
    file of the user's is left alone. A run given as its CSV is hashed with the run.json beside it."""
    from teachdiag.provenance import file_sha256

    r1 = write_run(tmp_path / "a", n_ctx=10, n_pos=10, seed=1)
    r2 = write_run(tmp_path / "b", n_ctx=10, n_pos=10, seed=2)
    out = tmp_path / "out"
    run_analyze(AnalyzeConfig(runs=[str(r1), str(r2)], bootstrap=0, out=str(out)))
    assert (out / "instruments.csv").is_file()
    (out / "notes.txt").write_text("mine")
    run_analyze(AnalyzeConfig(runs=[str(r1 / "tokens.csv")], bootstrap=0, out=str(out)))
    record = json.loads((out / "analysis.json").read_text())
    assert not (out / "instruments.csv").exists() and (out / "notes.txt").read_text() == "mine"
    assert "instruments.csv" not in record["files"] and all((out / f).is_file() for f in record["files"])
    assert record["inputs"][0]["sha256"] == {"tokens.csv": file_sha256(r1 / "tokens.csv"),
                                             "run.json": file_sha256(r1 / "run.json")}
    # a record edited (or copied in) to name files outside the analysis is not obeyed
    (tmp_path / "precious.csv").write_text("keep")
    record["files"] += ["../precious.csv", str(tmp_path / "precious.csv"), "notes.txt"]
    (out / "analysis.json").write_text(json.dumps(record))
    run_analyze(AnalyzeConfig(runs=[str(r1)], bootstrap=0, out=str(out)))
    assert (tmp_path / "precious.csv").read_text() == "keep" and (out / "notes.txt").read_text() == "mine"


def test_input_refused_by_a_statistics_module_leaves_no_record(tmp_path):
    """Two monitor folders are refused inside analysis/trajectory.py, before any file is written:
    --out holds no analysis.json that could pass for an analysis begun."""
    for name in ("m1", "m2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trajectory.csv").write_text("step\n")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="one monitor folder at a time"):
        run_analyze(AnalyzeConfig(runs=[str(tmp_path / "m1"), str(tmp_path / "m2")], out=str(out)))
    assert not (out / "analysis.json").exists()
