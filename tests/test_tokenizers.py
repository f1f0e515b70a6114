"""Tokenizers compared by meaning, on the real Qwen3 vocabulary (tests/fixtures/qwen3_tokenizer).

Variants are made from the real files, the way the real model families differ: Qwen2.5 (the
same files without Qwen3's four added tokens), a DeepSeek-R1-Distill-Qwen-like tokenizer (some
special ids of Qwen2.5 given other strings), and one with two regular tokens swapped (refused).
The expected differences are read from the JSON files themselves, not from transformers.
"""

import json
import lzma
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_model, write_contexts
from reference import full_logits, ref_signals
from teachdiag.cli import main
from teachdiag.errors import InputError
from teachdiag.models import load_tokenizer
from teachdiag.table import read_tokens
from teachdiag.tokenizers import compare_tokenizers, tokenizer_fingerprint

FIXTURE = Path(__file__).parent / "fixtures" / "qwen3_tokenizer"
ROWS = 151680  # >= 151669 tokens, like Qwen's padded embeddings
QWEN25_LEN = 151665  # Qwen2.5's tokenizer: Qwen3 adds <tool_response>, </tool_response>, <think>, </think>
DEEPSEEK = {151643: "<｜end▁of▁sentence｜>", 151644: "<｜User｜>", 151645: "<｜Assistant｜>",
            151646: "<｜begin▁of▁sentence｜>", 151648: "<think>", 151649: "</think>"}
SWAPPED = (1000, 2000)


@lru_cache(maxsize=1)
def qwen3_text() -> str:
    return lzma.decompress((FIXTURE / "tokenizer.json.xz").read_bytes()).decode()


def qwen3_files() -> dict:
    return {"tokenizer.json": json.loads(qwen3_text()),
            "tokenizer_config.json": json.loads((FIXTURE / "tokenizer_config.json").read_text())}


def variant(name: str) -> dict:
    files = qwen3_files()
    tj, tc = files["tokenizer.json"], files["tokenizer_config.json"]
    if name in ("qwen25", "deepseek"):
        tj["added_tokens"] = [a for a in tj["added_tokens"] if a["id"] < QWEN25_LEN]
        tc["added_tokens_decoder"] = {k: v for k, v in tc["added_tokens_decoder"].items() if int(k) < QWEN25_LEN}
    if name == "deepseek":
        for a in tj["added_tokens"]:
            if a["id"] in DEEPSEEK:
                a["content"] = DEEPSEEK[a["id"]]
        for k, v in tc["added_tokens_decoder"].items():
            if int(k) in DEEPSEEK:
                v["content"] = DEEPSEEK[int(k)]
        tc.update(eos_token=DEEPSEEK[151643], pad_token=DEEPSEEK[151643], additional_special_tokens=[])
    if name == "regular":
        inv = {i: s for s, i in tj["model"]["vocab"].items()}
        a, b = SWAPPED
        tj["model"]["vocab"][inv[a]], tj["model"]["vocab"][inv[b]] = b, a
    return files


def save_folder(path: Path, name: str, arch: str, weights: bool = False) -> str:
    model = make_model(arch, ROWS, seed=len(name), tied=True, layers=1)
    model.config.eos_token_id = 151643
    # the teacher's ids that the student reads differently carry real mass (logit std ~10 instead of
    # ~1), so that dropping them and renormalising changes the numbers visibly
    heavy = {"qwen3": list(range(QWEN25_LEN, 151669)), "deepseek": sorted(DEEPSEEK)}.get(name, [])
    with torch.no_grad():
        model.get_output_embeddings().weight[heavy] *= 12.0
    (model.save_pretrained if weights else model.config.save_pretrained)(path)
    if name == "qwen3":  # the files as published, byte for byte
        (path / "tokenizer.json").write_text(qwen3_text())
        shutil.copy(FIXTURE / "tokenizer_config.json", path)
        return str(path)
    for fname, obj in variant(name).items():
        (path / fname).write_text(json.dumps(obj, ensure_ascii=False))
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("qwen_tok")
    return {"qwen3": save_folder(root / "qwen3", "qwen3", "qwen3", weights=True),
            "qwen3_as_qwen2": save_folder(root / "qwen3_as_qwen2", "qwen3", "qwen2"),
            "qwen25": save_folder(root / "qwen25", "qwen25", "qwen2", weights=True),
            "deepseek": save_folder(root / "deepseek", "deepseek", "qwen2", weights=True),
            "regular": save_folder(root / "regular", "regular", "qwen3")}


@pytest.fixture(scope="module")
def toks(folders) -> dict:
    return {k: load_tokenizer(v) for k, v in folders.items()}


def test_fixture_is_the_published_file():
    import hashlib

    data = lzma.decompress((FIXTURE / "tokenizer.json.xz").read_bytes())
    assert hashlib.sha256(data).hexdigest() == (FIXTURE / "tokenizer.json.sha256").read_text().strip()


def test_same_files_under_qwen2_and_qwen3_configs_are_identical(toks, capsys):
    match = compare_tokenizers(toks["qwen3"], toks["qwen3_as_qwen2"], "T", "S")
    assert match.shared_ids is None and match.differing == [] and match.vocab == 151669
    assert tokenizer_fingerprint(toks["qwen3"]) == tokenizer_fingerprint(toks["qwen3_as_qwen2"]) == match.fingerprint
    assert capsys.readouterr().err == ""  # identical pairs say nothing


def test_word_level_files_under_qwen2_and_qwen3_configs_are_identical(tmp_path):
    """transformers 5.24 re-builds a word-level tokenizer.json next to a Qwen2 config as BPE;
    teachdiag loads what the files say."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "hello", "world", "a", "b", "<eos>"]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="<eos>")
    loaded = []
    for arch in ("qwen2", "qwen3"):
        make_model(arch, 8, 0).config.save_pretrained(tmp_path / arch)
        fast.save_pretrained(tmp_path / arch)
        loaded.append(load_tokenizer(str(tmp_path / arch)))
    assert [tok("hello world a")["input_ids"] for tok in loaded] == [[1, 2, 3]] * 2
    assert compare_tokenizers(*loaded, "T", "S").shared_ids is None


def test_qwen25_student_qwen3_teacher_runs_over_shared_ids(toks, capsys):
    added = {a["id"]: a["content"] for a in qwen3_files()["tokenizer.json"]["added_tokens"]}
    match = compare_tokenizers(toks["qwen3"], toks["qwen25"], "qwen3", "qwen2.5")
    assert match.vocab == 151669 and match.shared_ids == list(range(QWEN25_LEN))
    assert match.differing == [{"id": i, "kind": "added", "teacher": added[i], "student": None}
                               for i in range(QWEN25_LEN, 151669)]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "4 ids" in err[0] and "only the teacher has 151665-151668" in err[0]
    with pytest.raises(InputError, match="differ on 4 ids.*strict-tokenizer"):
        compare_tokenizers(toks["qwen3"], toks["qwen25"], "qwen3", "qwen2.5", strict=True)


def test_deepseek_like_renamed_special_ids(toks, capsys):
    qwen = {a["id"]: a["content"] for a in qwen3_files()["tokenizer.json"]["added_tokens"]}
    match = compare_tokenizers(toks["deepseek"], toks["qwen25"], "deepseek", "qwen2.5")
    assert [d["id"] for d in match.differing] == sorted(DEEPSEEK)
    for d in match.differing:
        assert (d["teacher"], d["student"]) == (DEEPSEEK[d["id"]], qwen[d["id"]])
    assert {d["kind"] for d in match.differing} == {"special"}
    assert match.shared_ids == [i for i in range(QWEN25_LEN) if i not in DEEPSEEK]
    assert "6 ids" in capsys.readouterr().err


def test_a_changed_regular_token_is_refused(toks):
    inv = {i: s for s, i in qwen3_files()["tokenizer.json"]["model"]["vocab"].items()}
    a, b = SWAPPED
    with pytest.raises(InputError) as e:
        compare_tokenizers(toks["regular"], toks["qwen3"], "T", "S")
    msg = str(e.value)
    assert f"regular token id {a}" in msg and repr(inv[b]) in msg and repr(inv[a]) in msg


def test_probe_runs_a_qwen25_student_against_a_qwen3_teacher(folders, tmp_path, capsys):
    ctx = write_contexts(tmp_path / "c.jsonl", n=2, teacher_view=False)
    out = tmp_path / "run"
    assert main(["probe", "--teacher", folders["qwen3"], "--student", folders["qwen25"], "--contexts", str(ctx),
                 "--out", str(out), "--device", "cpu", "--quiet", "--positions", "3"]) == 0
    assert "tokenizers differ on 4 ids" in capsys.readouterr().err
    rec = json.loads((out / "run.json").read_text())["tokenizer"]
    assert [d["id"] for d in rec["differing"]] == list(range(QWEN25_LEN, 151669))
    assert rec["identical"] is False and rec["n_shared_ids"] == QWEN25_LEN
    assert_over_shared_ids(out, folders["qwen3"], folders["qwen25"], ctx, np.arange(151669) < QWEN25_LEN)


def assert_over_shared_ids(out: Path, teacher: str, student: str, contexts: Path, keep: np.ndarray) -> None:
    """Every finite row of the run equals the NumPy reference over the kept ids, renormalised, and
    drops teacher and student mass; a row whose token is outside keep is not finite."""
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (teacher, student)]
    ctxs = {c["id"]: c for c in map(json.loads, contexts.read_text().splitlines())}
    df = read_tokens(out / "tokens.csv")
    assert len(df) > 0
    for row in df.itertuples():
        ctx = ctxs[row.context_id]
        ids, j = ctx["prompt_ids"] + ctx["response_ids"], int(row.position)
        if not keep[ctx["response_ids"][j]]:
            assert row.finite == 0 and np.isnan(row.student_logprob) and np.isnan(row.teacher_logprob)
            continue
        with torch.no_grad():
            t, s = (full_logits(m, ids, len(ctx["prompt_ids"]) + j - 1, len(keep)).double().numpy() for m in models)
        ref = ref_signals(s, t, ctx["response_ids"][j], 16, keep)
        full = ref_signals(s, t, ctx["response_ids"][j], 16)  # what comparing every id would give
        assert row.finite == 1 and row.teacher_dropped_mass > 0 and row.student_dropped_mass > 0
        for name in ("fkl", "rkl", "teacher_logprob", "teacher_dropped_mass", "student_dropped_mass"):
            assert getattr(row, name) == pytest.approx(ref[name], rel=1e-5), (row.context_id, j, name)
        assert abs(row.fkl - full["fkl"]) > 100 * abs(row.fkl - ref["fkl"])  # renormalised, visibly


def test_probe_runs_a_deepseek_like_teacher_without_its_renamed_ids(folders, tmp_path, capsys):
    ctx = tmp_path / "c.jsonl"
    recs = [{"id": "d0", "prompt_ids": [1, 2, 3], "response_ids": [5, 151648, 7, 151643, 9]},
            {"id": "d1", "prompt_ids": [4, 151644, 6], "response_ids": [8, 10, 151649, 12]}]
    ctx.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "run"
    assert main(["probe", "--teacher", folders["deepseek"], "--student", folders["qwen25"], "--contexts", str(ctx),
                 "--out", str(out), "--device", "cpu", "--quiet", "--positions", "all"]) == 0
    assert "tokenizers differ on 6 ids" in capsys.readouterr().err
    keep = np.ones(QWEN25_LEN, dtype=bool)
    keep[sorted(DEEPSEEK)] = False
    assert_over_shared_ids(out, folders["deepseek"], folders["qwen25"], ctx, keep)
    df = read_tokens(out / "tokens.csv")
    assert (df["finite"] == 0).sum() == 3  # the three positions that predict a renamed id


def test_published_files_whose_config_names_another_class_compare_identical(tmp_path, capsys):
    """#21.10.1: byte-identical Qwen3 files whose tokenizer_config.json names GPT2Tokenizer load as
    Qwen2Tokenizer next to a Qwen2 config and as GPT2Tokenizer (GPT-2's own pre-tokenizer) next to a
    Qwen3 config, which split code differently; teachdiag loads what tokenizer.json says, both times."""
    from tokenizers import Tokenizer

    from teachdiag.tokenizers import PROBE_TEXTS

    config = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "GPT2Tokenizer"
    loaded = []
    for arch in ("qwen2", "qwen3"):
        path = tmp_path / arch
        make_model(arch, 8, 0).config.save_pretrained(path)
        (path / "tokenizer.json").write_text(qwen3_text())
        (path / "tokenizer_config.json").write_text(json.dumps(config))
        loaded.append(load_tokenizer(str(path)))
    written = Tokenizer.from_str(qwen3_text())
    for tok in loaded:
        assert [tok(t, add_special_tokens=False)["input_ids"] for t in PROBE_TEXTS] == \
               [written.encode(t, add_special_tokens=False).ids for t in PROBE_TEXTS]
    match = compare_tokenizers(*loaded, "T", "S")
    assert match.shared_ids is None and match.differing == []
    assert capsys.readouterr().err == ""
