"""End to end through `teachdiag probe` (main(argv)), and every bad input: exit 2, one line."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from conftest import make_tokenizer, write_contexts
from teachdiag.cli import main
from teachdiag.table import COLUMNS, read_tokens


def probe(pair, contexts, out, *extra):
    teacher, student = pair
    return main(["probe", "--teacher", teacher, "--student", student, "--contexts", str(contexts),
                 "--out", str(out), "--device", "cpu", "--quiet", *extra])


def test_probe_writes_table_and_run_record(tmp_path, pair, contexts, capsys):
    out = tmp_path / "r1"
    assert probe(pair, contexts, out, "--positions", "all", "--top-k", "8") == 0
    stdout = capsys.readouterr().out
    assert "tokens.csv" in stdout and "median fkl" in stdout and "Spearman" in stdout
    assert stdout.splitlines()[-1] == f"next: teachdiag analyze {out}"  # as viability ends (#21.10.5)
    header = (out / "tokens.csv").read_text().splitlines()[0].split(",")
    assert header[:22] == COLUMNS[:22]
    df = read_tokens(out / "tokens.csv")
    ctxs = [json.loads(line) for line in open(contexts)]
    assert len(df) == sum(len(c["response_ids"]) for c in ctxs)  # one row per position
    assert list(df["position"][: len(ctxs[0]["response_ids"])]) == list(range(len(ctxs[0]["response_ids"])))
    assert (df["gain_fkl"] == df["fkl"] - df["fkl_after"]).all()
    assert df["teachability"].between(0, 1).all() and df["incompat"].between(0, 1).all()
    # floats are written repr-exact, not to 6 digits
    text = (out / "tokens.csv").read_text().splitlines()[1].split(",")
    assert len(text[4]) > 12 and float(text[4]) == df["fkl"].iloc[0]
    # the decoded token text is the tokenizer's
    tok = make_tokenizer()
    assert df["token"].iloc[0] == tok.decode([int(df["token_id"].iloc[0])])
    rec = json.loads((out / "run.json").read_text())
    assert rec["complete"] is True and rec["top_k"] == 8
    for key in ("command", "options", "teacher", "student", "tokenizer", "versions", "device", "seed",
                "wall_s", "positions_per_s"):
        assert key in rec, key
    assert rec["teacher"]["config_sha256"] != rec["student"]["config_sha256"]
    assert rec["teacher"]["vocab_rows"] == 112 and rec["student"]["vocab_rows"] == 128
    assert rec["tokenizer"]["vocab"] == 68
    assert not (out / "tokens.partial.csv").exists()


def test_sampled_positions_are_seeded_and_truncation_applies(tmp_path, pair, contexts):
    assert probe(pair, contexts, tmp_path / "a", "--positions", "5", "--seed", "3") == 0
    assert probe(pair, contexts, tmp_path / "b", "--positions", "5", "--seed", "3") == 0
    a, b = read_tokens(tmp_path / "a/tokens.csv"), read_tokens(tmp_path / "b/tokens.csv")
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 5
    # another --seed samples other positions (a probe that ignored --seed would pass the check above)
    assert probe(pair, contexts, tmp_path / "d", "--positions", "5", "--seed", "4") == 0
    d = read_tokens(tmp_path / "d/tokens.csv")
    assert len(d) == 5
    picked = lambda t: set(zip(t["context_id"], t["position"]))  # noqa: E731
    assert picked(a) != picked(d)
    assert probe(pair, contexts, tmp_path / "c", "--max-response-tokens", "2") == 0
    c = read_tokens(tmp_path / "c/tokens.csv")
    assert c["position"].max() == 1 and len(c) == 8


def test_text_records_are_tokenized_with_the_student_tokenizer(tmp_path, pair):
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"id": "t", "prompt": "what is two", "response": "two plus two"}) + "\n")
    assert probe(pair, path, tmp_path / "r") == 0
    df = read_tokens(tmp_path / "r/tokens.csv")
    assert "".join(df["token"]) == "two plus two"


def test_parquet_contexts(tmp_path, pair, contexts):
    recs = [json.loads(line) for line in open(contexts)]
    pd.DataFrame(recs).to_parquet(tmp_path / "ctx.parquet")
    assert probe(pair, tmp_path / "ctx.parquet", tmp_path / "p") == 0
    assert probe(pair, contexts, tmp_path / "j") == 0
    pd.testing.assert_frame_equal(read_tokens(tmp_path / "p/tokens.csv"), read_tokens(tmp_path / "j/tokens.csv"))


BAD_RECORDS = {
    "missing id": ({"prompt_ids": [1], "response_ids": [2]}, "line 2|:2: id: missing"),
    "duplicate id": ({"id": "c0", "prompt_ids": [1], "response_ids": [2]}, ":2: id: duplicate id 'c0'"),
    "empty response": ({"id": "x", "prompt_ids": [1], "response_ids": []}, ":2: response_ids: is empty"),
    "token id >= vocab": ({"id": "x", "prompt_ids": [1], "response_ids": [68]}, ":2: response_ids: token id 68"),
    "float id": ({"id": "x", "prompt_ids": [1.5], "response_ids": [2]}, ":2: prompt_ids: token id 1.5"),
    "negative id": ({"id": "x", "prompt_ids": [1], "response_ids": [-3]}, ":2: response_ids: token id -3"),
    "numeric context id": ({"id": 7, "prompt_ids": [1], "response_ids": [2]}, ":2: id: must be a non-empty string"),
    "misspelt field": ({"id": "x", "prompt_ids": [1], "respones_ids": [2]},
                       ":2: respones_ids: unknown field (did you mean 'response_ids'?)"),
}


def assert_clean_error(capsys, out, expect: str):
    err = capsys.readouterr().err.strip()
    assert err.startswith("teachdiag: error:"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert any(e in err for e in expect.split("|")), err
    assert not (out / "tokens.csv").exists()


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_records(tmp_path, pair, capsys, case):
    rec, expect = BAD_RECORDS[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "c0", "prompt_ids": [1, 2], "response_ids": [3, 4]}) + "\n"
                    + json.dumps(rec) + "\n")
    assert probe(pair, path, tmp_path / "out") == 2
    assert_clean_error(capsys, tmp_path / "out", expect)


def test_malformed_json_reports_the_line(tmp_path, pair, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "prompt_ids": [1], "response_ids": [2]}\n\n{"id": "b", "prompt_ids": [1\n')
    assert probe(pair, path, tmp_path / "out") == 2
    assert_clean_error(capsys, tmp_path / "out", "bad.jsonl:3: malformed JSON")


def test_mismatched_tokenizers_refused(tmp_path, pair, contexts, capsys):
    import shutil

    other = tmp_path / "other_teacher"
    shutil.copytree(pair[0], other)
    make_tokenizer(drop_merge=True).save_pretrained(other)
    assert probe((str(other), pair[1]), contexts, tmp_path / "out") == 2
    assert_clean_error(capsys, tmp_path / "out", "tokenizers differ")


def test_unknown_model_path(tmp_path, pair, contexts, capsys):
    assert probe((str(tmp_path / "nope"), pair[1]), contexts, tmp_path / "out") == 2
    assert_clean_error(capsys, tmp_path / "out", "teacher model folder not found")


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_bad_positions(tmp_path, pair, contexts, capsys, value):
    assert probe(pair, contexts, tmp_path / "out", "--positions", value) == 2
    assert_clean_error(capsys, tmp_path / "out", "--positions")


def test_non_empty_out_needs_overwrite(tmp_path, pair, contexts, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    assert probe(pair, contexts, out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert probe(pair, contexts, out, "--overwrite") == 0


def test_remote_code_is_refused_without_flag(tmp_path, pair, contexts, capsys):
    import shutil

    model = tmp_path / "custom"
    shutil.copytree(pair[1], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                       "AutoConfig": "configuration_evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    (model / "configuration_evil.py").write_text("raise SystemExit('remote code ran')\n")
    assert probe((pair[0], str(model)), contexts, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "remote code ran" not in err and len(err.strip().splitlines()) == 1


def test_console_script_exit_code_and_no_traceback(tmp_path, pair):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    proc = subprocess.run([sys.executable, "-m", "teachdiag", "probe", "--teacher", pair[0], "--student", pair[1],
                           "--contexts", str(bad), "--out", str(tmp_path / "o"), "--device", "cpu"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "teachdiag: error: " + str(bad) + ":1: malformed JSON (Expecting value, column 1)"


def _command_table() -> dict:
    """The CLI's own command table as name -> (config class, handler, description): a command added
    there is covered by the --help tests below without editing them. (cli.COMMANDS names each
    config class by module, so that only the chosen command's module is imported.)"""
    from teachdiag.cli import COMMANDS, _config_class

    return {name: (_config_class(name), run, desc) for name, (_, _, run, desc) in COMMANDS.items()}


COMMANDS = list(_command_table())


def test_the_command_table_is_not_empty_and_has_the_documented_commands():
    # a floor, not the list: the parametrized test takes whatever the table holds
    assert {"probe", "rollout", "analyze", "calibrate", "train", "viability"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_for_every_command(command, capsys):
    """`teachdiag CMD --help` exits 0 and lists exactly CMD's options: one flag per field of its
    config dataclass (no more, no fewer: another command's config would fail), each field's own help
    text, and the command's description."""
    import dataclasses
    import re

    cls, _, desc = _command_table()[command]
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    usage = out.partition("\n\n")[0]
    assert usage.startswith(f"usage: teachdiag {command} [-h]"), usage
    flat = "".join(out.split())  # argparse wraps lines (and breaks at hyphens): compare without whitespace
    flags, positional = set(), []
    for f in dataclasses.fields(cls):
        if f.metadata.get("positional"):
            positional.append(f.name)
        else:
            flags.add("--" + f.name.replace("_", "-"))
        assert "".join(f.metadata["help"].split()) in flat, (command, f.name)
    assert set(re.findall(r"\[(--[a-z0-9][a-z0-9-]*)", usage)) == flags, command
    for name in positional:
        assert re.search(rf"(?<![\w-]){name}(?![\w-])", usage), (command, name)
    assert "".join(desc.split()) in flat


def test_top_level_help_and_version_through_python_m():
    """The real entry point (`python -m teachdiag`, as the console script): --help names every
    command of the table, --version prints the version pyproject.toml declares."""
    import tomllib
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "teachdiag", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.split("{", 1)[1].split("}", 1)[0].split(",")  # usage: teachdiag ... {probe,rollout,...}
    assert listed == COMMANDS
    proc = subprocess.run([sys.executable, "-m", "teachdiag", "--version"], capture_output=True, text=True)
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert proc.returncode == 0 and proc.stdout.strip() == f"teachdiag {pyproject['project']['version']}"


def test_non_utf8_contexts(tmp_path, pair, capsys):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"id": "a", "prompt_ids": [1], "response_ids": [2]}\n{"id": "\xe9"}\n')
    assert probe(pair, path, tmp_path / "out") == 2
    assert_clean_error(capsys, tmp_path / "out", "latin1.jsonl:2: not UTF-8")


# ---------------------------------------------------------------- habits of the command line

def test_version_and_real_defaults_in_help(capsys):
    from teachdiag import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"teachdiag {__version__}"
    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "sgd 1e-05, normalized 0.001, adam 1e-07" in text  # each rule's default lr, from probe/steps.py
    assert "200 on the demo" in text and "[default: reverse_kl]" in text


def test_negative_lr_parses_and_is_refused_in_one_line(tmp_path, pair, capsys):
    contexts = write_contexts(tmp_path / "c.jsonl")
    rc = main(["probe", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts),
               "--out", str(tmp_path / "r"), "--lr", "-1e-3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["teachdiag: error: --lr: must be positive, got -0.001"]


def test_an_internal_bug_keeps_its_traceback(tmp_path, pair, monkeypatch):
    """A ValueError raised inside the probe is a bug, not a user's --params mistake: it propagates."""
    import teachdiag.probe.exact as exact

    def broken(*args, **kwargs):
        raise ValueError("internal bug")

    monkeypatch.setattr(exact, "kls_from_logits", broken)
    contexts = write_contexts(tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match="internal bug"):
        main(["probe", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts),
              "--out", str(tmp_path / "r"), "--device", "cpu", "--quiet", "--positions", "2", "--params", "last:1"])


def test_threads_option_sets_torch_threads(tmp_path, pair):
    import torch

    before = torch.get_num_threads()
    try:
        contexts = write_contexts(tmp_path / "c.jsonl")
        assert main(["probe", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts),
                     "--out", str(tmp_path / "r"), "--device", "cpu", "--quiet", "--positions", "1",
                     "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["probe", "--threads", "-1", "--out", str(tmp_path / "x")]) == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("signals, gain", [("topk", "per_position"), ("topk_lb", "shared")])
def test_probe_top_k_signals_equal_the_served_reference(tmp_path, pair, contexts, signals, gain):
    """--signals topk/topk_lb: topk_entropy, union_fkl, compat_mass as a served teacher's top-K lists
    give them (reference_ta_opd, from full-sequence forwards); every other column as --signals full."""
    import torch
    from transformers import AutoModelForCausalLM

    from reference import full_logits
    from reference_ta_opd import ref_topk_signals
    from teachdiag.contexts import load_contexts

    extra = ["--top-k", "4", "--lr", "1e-3"] + (["--gain", "shared"] if gain == "shared" else [])
    assert probe(pair, contexts, tmp_path / "full", *extra) == 0
    assert probe(pair, contexts, tmp_path / "served", *extra, "--signals", signals) == 0
    full, got = read_tokens(tmp_path / "full/tokens.csv"), read_tokens(tmp_path / "served/tokens.csv")
    assert json.loads((tmp_path / "served/run.json").read_text())["signals"] == signals
    same = [c for c in COLUMNS if c not in ("topk_entropy", "union_fkl", "compat_mass", "teachability", "incompat")]
    pd.testing.assert_frame_equal(full[same], got[same])
    teacher, student = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in pair)
    ctxs = {c.id: c for c in load_contexts(contexts)}
    with torch.no_grad():
        for _, row in got.iterrows():
            c, j = ctxs[row["context_id"]], int(row["position"])
            ls = full_logits(student, c.prompt_ids + c.response_ids, len(c.prompt_ids) + j - 1, 68).double().log_softmax(-1)
            lt = full_logits(teacher, c.teacher_view + c.response_ids, len(c.teacher_view) + j - 1, 68).double().log_softmax(-1)
            s_lp, s_ids = ls.topk(4)
            t_lp, t_ids = lt.topk(4)
            si, ti = list(zip(s_ids.tolist(), s_lp.tolist())), list(zip(t_ids.tolist(), t_lp.tolist()))
            want = ref_topk_signals(si, ti, None if signals == "topk_lb" else {i: lt[i].item() for i, _ in si})
            for name, value in want.items():
                assert row[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (row["context_id"], j, name)
    assert (got["union_fkl"] != full["union_fkl"]).any()


def test_messages_name_the_right_line_the_differing_option_and_every_excluded_row(tmp_path, pair, capsys):
    """#21.9: analyze names the line a bad number is really on when ids hold newlines (not the row
    number + 2); analyze counts rows marked finite but holding inf among the excluded (it dropped them
    while saying "0 excluded"); a moved train folder resumes, and a changed option is named."""
    import numpy as np

    from synthetic import make_tokens

    df = make_tokens(n_ctx=10, n_pos=20, seed=3)
    df["context_id"] = df["context_id"] + "\nline two"  # every row takes two lines in the CSV
    bad = df.astype({"fkl": object})
    bad.loc[5, "fkl"] = "oops"  # row 5: its record starts on line 2 + 2·5 = 12
    (tmp_path / "bad").mkdir()
    bad.to_csv(tmp_path / "bad/tokens.csv", index=False)
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "bad"), "--bootstrap", "0"]) == 2
    assert f"tokens.csv:12: fkl: not a number: 'oops'" in capsys.readouterr().err

    (tmp_path / "inf").mkdir()
    df.loc[[3, 40, 77], "fkl"] = np.inf  # marked finite = 1 all the same
    df.to_csv(tmp_path / "inf/tokens.csv", index=False)
    assert main(["analyze", str(tmp_path / "inf"), "--bootstrap", "0"]) == 0
    assert f"{len(df)} rows, 3 excluded as non-finite" in capsys.readouterr().err
    assert f"{len(df)} rows, 3 excluded" in (tmp_path / "inf/analysis/summary.md").read_text()

    contexts = write_contexts(tmp_path / "c.jsonl", n=4)
    args = ["train", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts), "--device", "cpu",
            "--quiet", "--batch", "2"]
    assert main([*args, "--lr", "1e-3", "--steps", "2", "--out", str(tmp_path / "a")]) == 0
    (tmp_path / "a").rename(tmp_path / "moved")
    assert main([*args, "--lr", "1e-3", "--steps", "3", "--out", str(tmp_path / "moved"), "--resume"]) == 0
    capsys.readouterr()
    assert main([*args, "--lr", "2e-3", "--steps", "4", "--out", str(tmp_path / "moved"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("options differ from the run being resumed: lr (0.001 vs 0.002)"), err


@pytest.mark.parametrize("command", ["probe", "viability", "train", "calibrate"])
def test_top_k_of_the_whole_vocabulary_is_refused_before_any_model_loads(tmp_path, pair, monkeypatch, capsys,
                                                                          command):
    """#21.10.2: --top-k >= the vocabulary made every compat_mass 1.0 after minutes of work; it is one
    line naming --top-k, found from the tokenizers, before a model is loaded."""
    import teachdiag.models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(teachdiag.models, "load_model", no_model)
    contexts = tmp_path / "c.jsonl"  # with the answer viability checks branches against
    contexts.write_text(json.dumps({"id": "a", "prompt_ids": [1, 2], "response_ids": [3, 4], "meta": {"answer": "4"}}))
    rc = main([command, "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts),
               "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet", "--top-k", "68"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("teachdiag: error: --top-k: must be below the vocabulary (68 ids)"), err
    assert not (tmp_path / "out").exists()  # refused before any command made its folder (or a lock in it)


@pytest.mark.parametrize("argv, absent", [(["--version"], ["torch", "pandas", "transformers"]),
                                          (["--help"], ["torch", "pandas", "transformers"]),
                                          (["analyze", "--help"], ["torch", "matplotlib", "scipy"]),
                                          (["probe", "--help"], ["teachdiag.commands.train", "teachdiag.commands.analyze"])])
def test_version_and_help_import_only_what_they_show(argv, absent):
    """#21.10.7: every command took 6-9 s on a busy machine before its first line, `--version` too,
    because the CLI imported every command (torch, transformers, scipy, seaborn) to build its parser.
    Now a command's module is imported only when that command runs or shows its --help."""
    code = ("import sys\nfrom teachdiag.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            f"print(sorted(m for m in {absent!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-300:]
