"""`teachdiag viability` end to end on the tiny pair: rows against independent recomputations, resume,
and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import N_WORDS
from reference import full_logits, ref_signals
from teachdiag.commands import viability as vb
from teachdiag.branches import is_correct
from teachdiag.cli import main
from teachdiag.errors import InputError
from teachdiag.models import load_model, load_tokenizer
from teachdiag.table import VIABILITY_COLUMNS
from teachdiag.commands.viability import ViabilityConfig, run_viability

EOS = N_WORDS


def write_records(path: Path, n: int = 5, seed: int = 0, answer: bool = True) -> Path:
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for i in range(n):
            rec = {"id": f"q{i}", "prompt_ids": torch.randint(0, N_WORDS, (4,), generator=g).tolist(),
                   "response_ids": torch.randint(0, N_WORDS, (5 + i % 3,), generator=g).tolist(),
                   "teacher_prompt_ids": torch.randint(0, N_WORDS, (7,), generator=g).tolist(),
                   "meta": {"answer": str(i % 10)} if answer else {}}
            f.write(json.dumps(rec) + "\n")
    return path


def config(pair, contexts, out, **kw) -> ViabilityConfig:
    teacher, student = pair
    base = dict(teacher=teacher, student=student, contexts=str(contexts), positions="all", alternatives=3,
                max_new_tokens=5, samples=1, temperature=1.0, batch=8, out=str(out), quiet=True, device="cpu")
    return ViabilityConfig(**{**base, **kw})


def read(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "viability.csv", dtype={"greedy_answer": str}, keep_default_na=False,
                       na_values={c: ["nan", ""] for c in VIABILITY_COLUMNS if c != "greedy_answer"})


def test_rows_against_independent_recomputation(pair, tmp_path):
    ctx_path = write_records(tmp_path / "c.jsonl")
    out = run_viability(config(pair, ctx_path, tmp_path / "v"))
    df = read(out)
    recs = [json.loads(line) for line in ctx_path.read_text().splitlines()]
    assert len(df) == 3 * sum(len(r["response_ids"]) for r in recs)
    assert list(df.columns) == VIABILITY_COLUMNS
    teacher = load_model(pair[0], "teacher", "float32", torch.device("cpu"))
    student = load_model(pair[1], "student", "float32", torch.device("cpu"))
    tok = load_tokenizer(pair[1])
    vocab = len(tok)
    rows = df.sample(8, random_state=0)
    for _, row in rows.iterrows():
        rec = recs[int(row["context_id"][1:])]
        j = int(row["position"])
        resp = rec["response_ids"]
        t = full_logits(teacher, rec["teacher_prompt_ids"] + resp[:j], -1, vocab, torch.float64)
        s = full_logits(student, rec["prompt_ids"] + resp[:j], -1, vocab, torch.float64)
        p_t, p_s = torch.softmax(t, -1), torch.softmax(s, -1)
        alt = int(torch.argsort(p_t, descending=True)[int(row["alt_rank"]) - 1])
        assert row["alt_id"] == alt
        assert row["teacher_prob"] == pytest.approx(float(p_t[alt]), rel=1e-5)
        assert row["student_prob"] == pytest.approx(float(p_s[alt]), rel=1e-5)
        ref = ref_signals(s.numpy(), t.numpy(), resp[j], 16)
        for k in ("fkl", "rkl", "student_entropy", "teacher_entropy", "compat_mass", "union_fkl"):
            assert row[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-7), k
        assert row["pos_norm"] == pytest.approx(j / (len(resp) - 1))
        assert row["is_sampled"] == int(alt == resp[j])
        # the label: the student's own greedy continuation of its view with the alternative forced
        ids = rec["prompt_ids"] + resp[:j] + [alt]
        cont = [] if alt == EOS else _greedy(student, ids, 5)
        text = tok.decode(resp[:j] + [alt] + cont, skip_special_tokens=True)
        assert row["viable_greedy"] == int(is_correct(text, rec["meta"]["answer"]))
        assert row["greedy_new_tokens"] == len(cont)
    assert df["viable_sampled"].isin([0.0, 1.0]).all()
    # teachability is normalised over positions, each once: every alternative of a position shares it
    assert (df.groupby(["context_id", "position"])["teachability"].nunique() == 1).all()
    rec = json.loads((out / "run.json").read_text())
    assert rec["complete"] is True and rec["contexts"]["n_contexts"] == 5
    assert 0 <= rec["contexts"]["solve_rate"] <= 1


def _greedy(model, ids: list[int], n: int) -> list[int]:
    rows = model.get_output_embeddings().weight.shape[0]
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, eos_token_id=EOS, pad_token_id=EOS,
                         suppress_tokens=list(range(N_WORDS + 1, rows)))[0, len(ids):].tolist()
    return out[: out.index(EOS) + 1] if EOS in out else out


def interrupted_at(n: int, real):
    """`real`, except that its n-th call raises KeyboardInterrupt (Ctrl-C in the middle of a run)."""
    calls = []

    def wrapper(*args, **kw):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kw)

    return wrapper


def test_resume_after_an_interruption_gives_the_uninterrupted_table(pair, tmp_path, monkeypatch):
    ctx_path = write_records(tmp_path / "c.jsonl", n=6)
    whole = read(run_viability(config(pair, ctx_path, tmp_path / "whole")))
    real = vb.run_group
    monkeypatch.setattr(vb, "run_group", interrupted_at(2, real))
    with pytest.raises(KeyboardInterrupt):
        run_viability(config(pair, ctx_path, tmp_path / "cut"))
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["complete"] is False
    assert not (tmp_path / "cut" / "viability.csv").exists()  # nothing that looks finished
    assert main(["analyze", str(tmp_path / "cut")]) == 2  # analyze says so in one line
    monkeypatch.setattr(vb, "run_group", real)
    with pytest.raises(InputError, match="option samples differs"):  # another protocol cannot continue this folder
        run_viability(config(pair, ctx_path, tmp_path / "cut", samples=0, resume=True))
    resumed = read(run_viability(config(pair, ctx_path, tmp_path / "cut", resume=True)))
    pd.testing.assert_frame_equal(resumed, whole)


def test_missing_answer_is_a_one_line_error(pair, tmp_path, capsys):
    ctx_path = write_records(tmp_path / "c.jsonl", answer=False)
    teacher, student = pair
    code = main(["viability", "--teacher", teacher, "--student", student, "--contexts", str(ctx_path),
                 "--out", str(tmp_path / "v"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"{ctx_path}:1: meta.answer:" in err[0]
    assert not (tmp_path / "v" / "viability.csv").exists()


@pytest.mark.parametrize("flag, value", [("--alternatives", "0"), ("--samples", "-1"), ("--max-new-tokens", "0")])
def test_bad_options_are_one_line_errors(pair, tmp_path, capsys, flag, value):
    teacher, student = pair
    ctx_path = write_records(tmp_path / "c.jsonl")
    code = main(["viability", "--teacher", teacher, "--student", student, "--contexts", str(ctx_path),
                 "--out", str(tmp_path / "v"), flag, value])
    assert code == 2 and flag in capsys.readouterr().err


def test_analyze_reads_a_viability_run(pair, tmp_path):
    ctx_path = write_records(tmp_path / "c.jsonl", n=6)
    out = run_viability(config(pair, ctx_path, tmp_path / "v", alternatives=4))
    assert main(["analyze", str(out), "--bootstrap", "50"]) == 0
    auc = pd.read_csv(out / "analysis" / "viability_auroc.csv")
    assert set(auc["predictor"]) >= {"position", "teacher_entropy", "student_entropy", "fkl", "teachability",
                                     "compat_mass"}
    assert set(auc["label"]) == {"viable_greedy", "viable_sampled"}
    assert (out / "analysis" / "figures" / "viability.png").is_file()
    assert (out / "analysis" / "viability.md").is_file()
    finite = auc["auroc"].dropna()
    assert ((finite >= 0) & (finite <= 1)).all()
    assert np.isfinite(auc["viable_share"]).all()


def test_python_api(pair, tmp_path):
    import teachdiag

    ctx_path = write_records(tmp_path / "c.jsonl", n=2)
    teacher, student = pair
    df = teachdiag.run_viability(teacher=teacher, student=student, contexts=str(ctx_path), positions="3",
                                 alternatives=2, max_new_tokens=3, samples=0, out=str(tmp_path / "v"), device="cpu")
    assert len(df) == 6 and df["viable_sampled"].isna().all()


def test_groups_span_contexts_and_greedy_rows_do_not_depend_on_batching(pair, tmp_path):
    ctx_path = write_records(tmp_path / "c.jsonl", n=6)
    one = read(run_viability(config(pair, ctx_path, tmp_path / "b8", batch=8)))  # a group per context
    many = read(run_viability(config(pair, ctx_path, tmp_path / "b64", batch=64)))  # one group, split back
    assert len(vb.groups({0: [1, 2], 1: [3], 2: [4, 5]}, alternatives=3, batch=64)) == 1
    same = [c for c in VIABILITY_COLUMNS if c not in ("viable_sampled",)]  # samples are seeded per group
    pd.testing.assert_frame_equal(one[same], many[same])


def test_a_crash_between_two_contexts_of_a_group_regenerates_the_group(pair, tmp_path, monkeypatch):
    ctx_path = write_records(tmp_path / "c.jsonl", n=6)
    whole = read(run_viability(config(pair, ctx_path, tmp_path / "whole", batch=40)))
    from teachdiag.runtable import RunWriter

    real, calls = RunWriter.append_context, []

    def dies_third(self, cid, rows):
        calls.append(cid)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, cid, rows)

    monkeypatch.setattr(RunWriter, "append_context", dies_third)
    with pytest.raises(KeyboardInterrupt):
        run_viability(config(pair, ctx_path, tmp_path / "cut", batch=40))
    monkeypatch.setattr(RunWriter, "append_context", real)
    resumed = read(run_viability(config(pair, ctx_path, tmp_path / "cut", batch=40, resume=True)))
    pd.testing.assert_frame_equal(resumed, whole)  # sampled labels included: the group was redone whole
    with pytest.raises(InputError, match="batch"):
        cut2 = tmp_path / "cut2"
        monkeypatch.setattr(RunWriter, "append_context", dies_third)
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            run_viability(config(pair, ctx_path, cut2, batch=40))
        monkeypatch.setattr(RunWriter, "append_context", real)
        run_viability(config(pair, ctx_path, cut2, batch=8, resume=True))


def test_prefix_viable_marks_prefixes_that_already_state_the_answer(pair, tmp_path):
    ctx_path = write_records(tmp_path / "c.jsonl", n=3)
    out = run_viability(config(pair, ctx_path, tmp_path / "v"))
    df = read(out)
    tok = load_tokenizer(pair[1])
    recs = {json.loads(x)["id"]: json.loads(x) for x in ctx_path.read_text().splitlines()}
    for _, row in df.iterrows():
        rec = recs[row["context_id"]]
        text = tok.decode(rec["response_ids"][: int(row["position"])], skip_special_tokens=True)
        assert row["prefix_viable"] == int(is_correct(text, rec["meta"]["answer"]))


def test_analyze_refuses_options_that_do_not_apply(pair, tmp_path, capsys):
    ctx_path = write_records(tmp_path / "c.jsonl", n=2)
    out = run_viability(config(pair, ctx_path, tmp_path / "v", positions="3"))
    assert main(["analyze", str(out), "--protocol", "paper"]) == 2
    assert "--protocol" in capsys.readouterr().err


def test_resume_refuses_a_table_written_with_other_columns(pair, tmp_path, monkeypatch):
    ctx_path = write_records(tmp_path / "c.jsonl", n=6)
    real = vb.run_group
    monkeypatch.setattr(vb, "run_group", interrupted_at(2, real))
    with pytest.raises(KeyboardInterrupt):
        run_viability(config(pair, ctx_path, tmp_path / "cut"))
    part = tmp_path / "cut" / "tokens.partial.csv"
    lines = part.read_text().splitlines(keepends=True)
    part.write_text(lines[0].replace(",prefix_viable", "") + "".join(lines[1:]))  # an older version's header
    monkeypatch.setattr(vb, "run_group", real)
    with pytest.raises(InputError, match="columns differ"):
        run_viability(config(pair, ctx_path, tmp_path / "cut", resume=True))
