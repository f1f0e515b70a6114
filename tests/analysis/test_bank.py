"""The released TA-OPD code's token bank export read as a table (analysis/bank.py), and analyzed."""

import json

import numpy as np
import pandas as pd
import pytest

from synthetic import make_tokens
from teachdiag.analysis.bank import is_bank, read_bank
from teachdiag.cli import main

# the export's header as the released code writes it (schema_version 1), plus a measured gain
FIELDS = ["schema_version", "pair_id", "teacher_name", "student_name", "seed", "rollout_id", "sample_index",
          "group_index", "sample_ordinal", "tok_pos", "pos_norm", "prompt_len", "resp_len", "total_len", "truncated",
          "token_id", "student_logp_sampled", "teacher_logp_sampled", "sampled_reverse_kl", "sampled_teacher_adv",
          "student_top1_id", "teacher_top1_id", "student_top1_prob", "teacher_top1_prob", "student_topk_mass",
          "teacher_topk_mass", "Hs_topk", "Ht_topk", "Hs_topk_norm", "Ht_topk_norm", "KLf_union", "KLr_union",
          "Cmass", "Cmass_topk", "Cmass_true", "Cmass_exact", "Coverlap", "CBC", "Cprefix_ema", "reach_t1",
          "target_in_student_topk", "target_in_teacher_topk", "target_student_rank", "target_teacher_rank",
          "loss_mask_original", "H_norm", "D_norm", "C_norm", "DC_norm", "Dlearn", "Dincompat", "tip_score",
          "ca_softor_score", "split_ca_score", "quadrant", "budget_method", "budget_ratio", "budget_score",
          "budget_keep", "student_top_ids", "student_top_logps", "teacher_top_ids", "teacher_top_logps", "G_KLf"]


def write_bank(folder, fmt="csv", n_ctx=12, n_pos=30):
    """Two rollout files of a synthetic table in the export's columns; every 7th row loss-masked."""
    t = make_tokens(n_ctx=n_ctx, n_pos=n_pos, seed=4)
    ctx = pd.factorize(t["context_id"])[0]
    bank = pd.DataFrame({f: "" for f in FIELDS}, index=t.index)
    bank = bank.assign(schema_version=1, rollout_id=ctx // (n_ctx // 2), sample_index=ctx, tok_pos=t["position"],
                       pos_norm=t["position"] / (n_pos - 1), resp_len=n_pos, token_id=t["token_id"],
                       student_logp_sampled=t["student_logprob"], teacher_logp_sampled=t["teacher_logprob"],
                       Hs_topk_norm=t["topk_entropy"], KLf_union=t["union_fkl"], Cmass=t["compat_mass"],
                       Cmass_exact=1, loss_mask_original=(np.arange(len(t)) % 7 != 3).astype(int),
                       quadrant="Q3_lowH_highD", G_KLf=t["rel_gain_fkl"])
    folder.mkdir(parents=True, exist_ok=True)
    for r, part in bank.groupby("rollout_id"):
        if fmt == "csv":
            part.to_csv(folder / f"rollout_{r:06d}.csv", index=False)
        else:
            with open(folder / f"rollout_{r:06d}.jsonl", "w") as f:
                for rec in part.to_dict("records"):
                    f.write(json.dumps(rec) + "\n")
    return t, bank


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_bank_columns_map_to_the_table(tmp_path, fmt):
    t, bank = write_bank(tmp_path / "bank", fmt)
    assert is_bank(tmp_path / "bank") and not is_bank(tmp_path)
    table, info = read_bank(tmp_path / "bank")
    kept = bank["loss_mask_original"].to_numpy() == 1
    assert len(table) == kept.sum() and info["rows_loss_masked"] == (~kept).sum() and info["rows"] == len(bank)
    want = t[kept].reset_index(drop=True)
    for ours, theirs in (("position", "position"), ("topk_entropy", "topk_entropy"), ("union_fkl", "union_fkl"),
                         ("compat_mass", "compat_mass"), ("rel_gain_fkl", "rel_gain_fkl"),
                         ("student_logprob", "student_logprob"), ("teacher_logprob", "teacher_logprob")):
        np.testing.assert_array_equal(table[ours].to_numpy(float), want[theirs].to_numpy(float), err_msg=ours)
    assert (table["response_length"] == 30).all() and table["fkl"].isna().all()
    ids = table["context_id"].str.split(":").str[1].astype(int).to_numpy()
    assert (ids == pd.factorize(want["context_id"])[0]).all() and table["context_id"].nunique() == 12
    assert info["gains"] == {"G_KLf": "rel_gain_fkl"} and info["cmass"] == "exact"
    assert info["missing"] == ["fkl", "rkl", "student_entropy", "teacher_entropy"]
    assert {"topk_entropy", "union_fkl", "compat_mass", "position"} <= set(info["predictors"])


def test_analyze_reads_a_bank_and_says_what_it_lacks(tmp_path, capsys):
    write_bank(tmp_path / "bank")
    assert main(["analyze", str(tmp_path / "bank"), "--out", str(tmp_path / "an"), "--bootstrap", "20"]) == 0
    err = capsys.readouterr().err
    assert "TA-OPD token bank" in err and "not in a bank: fkl, rkl" in err
    corr = pd.read_csv(tmp_path / "an" / "correlations.csv")
    assert "fkl" not in set(corr["signal"]) and corr.query("signal == 'teachability'")["estimate"].notna().all()
    sel = pd.read_csv(tmp_path / "an" / "selection.csv")
    assert "fkl" not in set(sel["selector"]) and "teachability" in set(sel["selector"])
    reg = pd.read_csv(tmp_path / "an" / "regressions.csv")
    assert "teacher_entropy" not in set(reg["term"]) and reg.query("stat == 'std_coef'")["estimate"].notna().any()
    assert "TA-OPD token bank" in (tmp_path / "an" / "summary.md").read_text()


def test_a_bad_number_in_a_bank_is_one_line_naming_file_line_and_field(tmp_path, capsys):
    write_bank(tmp_path / "bank")
    path = tmp_path / "bank" / "rollout_000001.csv"
    lines = path.read_text().splitlines()
    cells = lines[4].split(",")
    cells[FIELDS.index("KLf_union")] = "lots"
    lines[4] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    assert main(["analyze", str(tmp_path / "bank"), "--out", str(tmp_path / "an")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rollout_000001.csv:5: KLf_union: not a number" in err


def test_the_paper_protocol_refuses_a_bank_saying_why(tmp_path, capsys):
    write_bank(tmp_path / "bank")
    assert main(["analyze", str(tmp_path / "bank"), "--protocol", "paper", "--out", str(tmp_path / "an")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "token bank has no full-vocabulary" in err, err


def test_a_bad_number_in_a_jsonl_bank_names_its_real_line(tmp_path, capsys):
    write_bank(tmp_path / "bank", "jsonl")
    path = tmp_path / "bank" / "rollout_000000.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[6])
    rec["Cmass"] = "lots"
    lines[6] = json.dumps(rec)
    path.write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")  # a blank line before it: file line 8
    assert main(["analyze", str(tmp_path / "bank"), "--out", str(tmp_path / "an")]) == 2
    assert "rollout_000000.jsonl:8: Cmass: not a number" in capsys.readouterr().err
