"""`teachdiag rollout` on tiny random-init models: seeded, valid records, EOS, padding, bad input."""

import json
from pathlib import Path

import pytest
import torch

from conftest import make_model, make_tokenizer
from teachdiag.cli import main
from teachdiag.errors import InputError
from teachdiag.generation import read_prompts
from teachdiag.commands.rollout import RolloutConfig, run_rollout

CHAT = ("{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"
        "{% if add_generation_prompt %}assistant{% endif %}")

RECORDS = [
    {"id": "a", "prompt": "what is one plus two", "teacher_prompt": "one plus two is three so",
     "answer": "3"},
    {"id": "b", "prompt": "hi", "teacher_prompt": "hi there"},
    {"id": "c", "prompt": "a much longer prompt with many words in it to pad the others",
     "teacher_prompt": "x", "answer": 7},
    {"id": "d", "prompt": "count to five", "teacher_prompt": "one two three four five"},
    {"id": "e", "prompt": "z", "teacher_prompt": "z z"},
]


def save_model(path: Path, chat: bool = False, eos: int | None = None) -> str:
    tok = make_tokenizer()
    if chat:
        tok.chat_template = CHAT
    model = make_model("llama", len(tok), seed=3)
    if eos is not None:
        model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return save_model(tmp_path_factory.mktemp("tiny") / "plain")


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory) -> str:
    return save_model(tmp_path_factory.mktemp("tiny") / "chat", chat=True)


def write_prompts(path: Path, records=RECORDS) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def rollout(student, prompts, out, **kw) -> list[dict]:
    cfg = RolloutConfig(student=student, prompts=prompts, out=str(out), device="cpu",
                        max_new_tokens=kw.pop("max_new_tokens", 8), batch_size=kw.pop("batch_size", 2),
                        **kw)
    path = run_rollout(cfg)
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_same_seed_same_rollouts(tiny, tmp_path):
    p = write_prompts(tmp_path / "p.jsonl")
    a = rollout(tiny, p, tmp_path / "a.jsonl", seed=5)
    torch.manual_seed(123)  # the global RNG state must not matter
    b = rollout(tiny, p, tmp_path / "b.jsonl", seed=5)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    c = rollout(tiny, p, tmp_path / "c.jsonl", seed=6)
    assert [r["response_ids"] for r in a] == [r["response_ids"] for r in b]
    assert [r["response_ids"] for r in a] != [r["response_ids"] for r in c]


def test_records_are_valid_frozen_contexts(tiny, tmp_path):
    p = write_prompts(tmp_path / "p.jsonl")
    recs = rollout(tiny, p, tmp_path / "r.jsonl", samples=2, teacher_prompts=True, max_new_tokens=6,
                   temperature=0.8, top_p=0.9)
    tok = make_tokenizer()
    assert [r["id"] for r in recs] == [f"{x['id']}-s{s}" for x in RECORDS for s in range(2)]
    for r in recs:
        src = RECORDS["abcde".index(r["id"][0])]
        assert set(r) == {"id", "prompt_ids", "response_ids", "teacher_prompt_ids", "meta"}
        assert r["prompt_ids"] == tok(src["prompt"])["input_ids"]
        assert r["teacher_prompt_ids"] == tok(src["teacher_prompt"])["input_ids"]
        assert 1 <= len(r["response_ids"]) <= 6
        assert all(isinstance(t, int) and 0 <= t < len(tok) for t in r["response_ids"])
        m = r["meta"]
        assert m["model"] == tiny and m["seed"] == 0 and m["temperature"] == 0.8 and m["top_p"] == 0.9
        assert m["max_new_tokens"] == 6 and m["sample"] == int(r["id"][-1])
        assert m["n_response_tokens"] == len(r["response_ids"])
        ends_eos = r["response_ids"][-1] == tok.eos_token_id
        assert m["finish_reason"] == ("eos" if ends_eos else "length")
        assert tok.eos_token_id not in r["response_ids"][:-1]
        assert ("answer" in m) == ("answer" in src) and m.get("answer") == src.get("answer")
        assert len(m["tokenizer_fingerprint"]) == 64 and m["chat_template"] is False
        assert m["response_text"] == tok.decode(r["response_ids"])
    # without --teacher-prompts no teacher view is written
    assert all("teacher_prompt_ids" not in r for r in rollout(tiny, p, tmp_path / "s.jsonl"))


def test_eos_is_kept_and_recorded(tmp_path):
    plain = save_model(tmp_path / "m0")
    p = write_prompts(tmp_path / "p.jsonl", RECORDS[:1])
    first = rollout(plain, p, tmp_path / "g.jsonl", temperature=0.0)[0]["response_ids"][0]
    with_eos = save_model(tmp_path / "m1", eos=first)  # same weights, the greedy token is an EOS
    rec = rollout(with_eos, p, tmp_path / "e.jsonl", temperature=0.0)[0]
    assert rec["response_ids"] == [first]
    assert rec["meta"]["finish_reason"] == "eos" and rec["meta"]["n_response_tokens"] == 1


def test_left_padding_matches_unbatched_greedy(tiny, tmp_path):
    p = write_prompts(tmp_path / "p.jsonl")
    batched = rollout(tiny, p, tmp_path / "b.jsonl", temperature=0.0, batch_size=5)
    single = rollout(tiny, p, tmp_path / "s.jsonl", temperature=0.0, batch_size=1)
    assert [r["response_ids"] for r in batched] == [r["response_ids"] for r in single]
    assert all(len(r["response_ids"]) == 8 for r in batched if r["meta"]["finish_reason"] == "length")


def test_chat_template_and_messages(tiny_chat, tmp_path):
    from transformers import AutoTokenizer

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    p = write_prompts(tmp_path / "p.jsonl", [{"id": "m", "messages": msgs, "teacher_messages": msgs[1:]},
                                             {"id": "t", "prompt": "hello", "teacher_prompt": "hey"}])
    recs = rollout(tiny_chat, p, tmp_path / "r.jsonl", teacher_prompts=True)
    tok = AutoTokenizer.from_pretrained(tiny_chat)

    def enc(messages):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    assert recs[0]["prompt_ids"] == enc(msgs) and recs[0]["teacher_prompt_ids"] == enc(msgs[1:])
    assert recs[1]["prompt_ids"] == enc([{"role": "user", "content": "hello"}])
    assert recs[0]["meta"]["chat_template"] is True


def test_messages_without_chat_template_is_input_error(tiny, tmp_path):
    p = write_prompts(tmp_path / "p.jsonl", [{"id": "m", "messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(InputError) as e:
        rollout(tiny, p, tmp_path / "r.jsonl")
    assert (e.value.file, e.value.line, e.value.field) == (p, 1, "messages")
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("lines,line,field", [
    (['{"id": "a", "prompt": "x"}', "not json"], 2, None),
    (['[1, 2]'], 1, None),
    (['{"prompt": "x"}'], 1, "id"),
    (['{"id": true, "prompt": "x"}'], 1, "id"),
    (['{"id": "a"}'], 1, "prompt"),
    (['{"id": "a", "prompt": ""}'], 1, "prompt"),
    (['{"id": "a", "prompt": 3}'], 1, "prompt"),
    (['{"id": "a", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}'], 1, "messages"),
    (['{"id": "a", "messages": [{"role": "user"}]}'], 1, "messages"),
    (['{"id": "a", "messages": []}'], 1, "messages"),
    (['{"id": "a", "prompt": "x"}', "", '{"id": "a", "prompt": "y"}'], 3, "id"),
    (['{"id": "a", "prompt": "x", "teacher_prompt": ["x"]}'], 1, "teacher_prompt"),
])
def test_bad_prompt_record_is_input_error(lines, line, field, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as e:
        read_prompts(path)
    assert (e.value.file, e.value.line, e.value.field) == (str(path), line, field)


def test_teacher_prompts_flag_needs_a_teacher_view(tiny, tmp_path):
    p = write_prompts(tmp_path / "p.jsonl", [RECORDS[0], {"id": "x", "prompt": "no teacher view"}])
    with pytest.raises(InputError) as e:
        rollout(tiny, p, tmp_path / "r.jsonl", teacher_prompts=True)
    assert (e.value.line, e.value.field) == (2, "teacher_prompt")


@pytest.mark.parametrize("opt", [{"temperature": -1.0}, {"top_p": 0.0}, {"samples": 0},
                                 {"max_new_tokens": 0}, {"batch_size": 0}])
def test_bad_options_are_input_errors(tiny, tmp_path, opt):
    p = write_prompts(tmp_path / "p.jsonl")
    with pytest.raises(InputError) as e:
        rollout(tiny, p, tmp_path / "r.jsonl", **opt)
    assert e.value.field == "--" + next(iter(opt)).replace("_", "-")


def test_cli_rollout(tiny, tmp_path, capsys):
    p = write_prompts(tmp_path / "p.jsonl")
    out = tmp_path / "cli.jsonl"
    assert main(["rollout", "--student", tiny, "--prompts", p, "--out", str(out), "--device", "cpu",
                 "--max-new-tokens", "4", "--teacher-prompts", "--samples", "1"]) == 0
    assert len(out.read_text().splitlines()) == len(RECORDS)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote {len(RECORDS)} records to {out}"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\n')
    assert main(["rollout", "--student", tiny, "--prompts", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"teachdiag: error: {bad}:1: prompt: missing prompt (or messages)"


def test_existing_out_needs_overwrite_or_resume(tiny, tmp_path):
    p = write_prompts(tmp_path / "p.jsonl")
    out = tmp_path / "r.jsonl"
    out.write_text("precious\n")
    with pytest.raises(InputError, match="--overwrite.*--resume") as e:
        rollout(tiny, p, out)
    assert e.value.field == "--out" and out.read_text() == "precious\n"
    assert len(rollout(tiny, p, out, overwrite=True)) == len(RECORDS)
    with pytest.raises(InputError, match="nothing to resume"):
        rollout(tiny, p, tmp_path / "none.jsonl", resume=True)
    with pytest.raises(InputError, match="option seed differs"):
        rollout(tiny, p, out, resume=True, seed=9)


def test_resume_after_a_crash_gives_the_uninterrupted_file(tiny, tmp_path):
    p = write_prompts(tmp_path / "p.jsonl")
    full = tmp_path / "full.jsonl"
    rollout(tiny, p, full, samples=2, batch_size=3, seed=4)
    lines = full.read_text().splitlines(keepends=True)
    # a crash: some records written (in another order), the last one torn mid-line
    crashed = tmp_path / "crashed.jsonl"
    crashed.write_text(lines[7] + lines[2] + lines[5][:40])
    rollout(tiny, p, crashed, samples=2, batch_size=3, seed=4, resume=True)
    assert crashed.read_bytes() == full.read_bytes()


def test_progress_lines_off_a_terminal(tiny, tmp_path, capsys):
    p = write_prompts(tmp_path / "p.jsonl")
    rollout(tiny, p, tmp_path / "r.jsonl")  # stderr is captured, not a tty: plain lines; the last batch reports
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"rollout: {len(RECORDS)}/{len(RECORDS)} resp (100.0%)") and last.endswith("tok/s]")


def test_padded_embedding_rows_are_never_sampled(tmp_path):
    """A student with more output rows than tokens (as Qwen2.5: 151,936 rows, 151,665 tokens): a
    sampled id past the tokenizer could not be read back or probed, so generation suppresses them."""
    folder = tmp_path / "wide"
    model = make_model("qwen2", 128, seed=5)
    with torch.no_grad():  # make the padded rows the likeliest tokens, so sampling would pick them
        model.lm_head.weight[len(make_tokenizer()):] += 50.0
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    records = rollout(str(folder), write_prompts(tmp_path / "p.jsonl"), tmp_path / "r.jsonl", max_new_tokens=6)
    assert all(max(r["response_ids"]) < len(make_tokenizer()) for r in records)


class Kill(BaseException):
    """A kill -9 at an injected point: nothing after it runs."""


def test_killed_rollouts_never_look_finished_and_resume_checks_the_prompts(tiny, tmp_path, monkeypatch):
    """#21.4: a rollout killed before any of its batches or before its final rename leaves no --out
    (only <out>.partial, which probe does not take for contexts) and --resume gives the uninterrupted
    file; an edited prompt or a removed id is refused before any sampling, not kept stale or a KeyError."""
    import os

    import teachdiag.commands.rollout as ro
    from teachdiag.contexts import load_contexts

    p = write_prompts(tmp_path / "p.jsonl")
    kw = dict(samples=2, batch_size=3, seed=4)
    full = tmp_path / "full.jsonl"
    rollout(tiny, p, full, **kw)
    real_generate, real_replace, calls = ro.generate_batch, os.replace, [0]
    n_batches = -(-2 * len(RECORDS) // 3)

    def kill_at(n):
        def generate(*a, **k):
            calls[0] += 1
            if calls[0] == n:
                raise Kill
            return real_generate(*a, **k)

        def replace(src, dst, *a, **k):  # the final rename is call n_batches + 1
            if n == n_batches + 1 and str(dst).endswith(".jsonl"):
                raise Kill
            return real_replace(src, dst, *a, **k)

        calls[0] = 0
        monkeypatch.setattr(ro, "generate_batch", generate)
        monkeypatch.setattr(os, "replace", replace)

    for n in range(1, n_batches + 2):
        out = tmp_path / f"killed{n}.jsonl"
        kill_at(n)
        with pytest.raises(Kill):
            rollout(tiny, p, out, **kw)
        kill_at(None)
        assert not out.exists(), n  # nothing that looks finished
        with pytest.raises(InputError, match="not found"):
            load_contexts(out)
        rollout(tiny, p, out, resume=True, **kw)
        assert out.read_bytes() == full.read_bytes(), n
        assert not ro.partial_path(out).exists()

    out = tmp_path / "edited.jsonl"
    kill_at(3)
    with pytest.raises(Kill):
        rollout(tiny, p, out, **kw)
    first = json.loads(ro.partial_path(out).read_text().splitlines()[0])
    rid = first["id"].rsplit("-s", 1)[0]
    edited = [dict(r, prompt=r["prompt"] + " please") if r["id"] == rid else r for r in RECORDS]
    kill_at(1)  # any sampling now would be a failure of the check
    with pytest.raises(InputError, match=f"'{first['id']}' was sampled from another prompt") as e:
        rollout(tiny, write_prompts(tmp_path / "edited.jsonl.prompts", edited), out, resume=True, **kw)
    assert (e.value.file, e.value.line, e.value.field) == (str(ro.partial_path(out)), 1, "prompt_ids")
    removed = [r for r in RECORDS if r["id"] != rid]
    with pytest.raises(InputError, match=f"id '{first['id']}' is not in") as e:
        rollout(tiny, write_prompts(tmp_path / "removed.jsonl.prompts", removed), out, resume=True, **kw)
    assert (e.value.line, e.value.field) == (1, "id") and calls[0] == 0


# ---------------------------------------------------------------- temperature is really applied
# (test_same_seed_same_rollouts passes whatever the temperature does: these fail if it were ignored)


def hand_greedy(folder: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding written out: a full forward of the whole sequence per step, argmax of the last
    row over the tokenizer's ids, stop at (and keep) the EOS token. No generate(), no cache."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos, vocab = make_tokenizer().eos_token_id, len(make_tokenizer())
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids])).logits[0, -1, :vocab].argmax())
            ids.append(nxt)
            out.append(nxt)
            if nxt == eos:
                break
    return out


def test_temperature_zero_and_near_zero_are_greedy_argmax_and_one_is_not(tiny, tmp_path):
    p = write_prompts(tmp_path / "p.jsonl")
    greedy = {r["id"]: hand_greedy(tiny, r["prompt_ids"], 8) for r in rollout(tiny, p, tmp_path / "g0.jsonl",
                                                                               temperature=0.0)}
    for t in (0.0, 1e-4):  # 0: greedy search; 1e-4: sampling from softmax(logits / 1e-4), an argmax
        got = {r["id"]: r["response_ids"] for r in rollout(tiny, p, tmp_path / f"t{t}.jsonl", temperature=t,
                                                           seed=7)}
        assert got == greedy, t
    # at temperature 1 the same seed samples something else: the model is not so peaked that any
    # temperature would pass the check above
    sampled = {r["id"]: r["response_ids"] for r in rollout(tiny, p, tmp_path / "t1.jsonl", temperature=1.0,
                                                           seed=7)}
    assert sampled != greedy


def first_token_counts(folder: str, temperature: float, n: int, seed: int = 0):
    """(counts of the first sampled token over n rows of one prompt, softmax(logits/T) by hand,
    softmax(logits) at T = 1), over the tokenizer's ids."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from teachdiag.generation import generate_batch

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = make_tokenizer()
    prompt = tok("what is one plus two")["input_ids"]
    outs = generate_batch(model, [prompt] * n, max_new_tokens=1, temperature=temperature, top_p=1.0,
                          eos_ids=[tok.eos_token_id], pad_id=tok.eos_token_id, seed=seed, vocab=len(tok))
    counts = np.bincount([resp[0] for resp, _ in outs], minlength=len(tok))
    with torch.no_grad():
        z = model(torch.tensor([prompt])).logits[0, -1, :len(tok)].double().numpy()

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    return counts, softmax(z / temperature), softmax(z)


def chi2_p(counts, probs) -> float:
    """Pearson chi-square goodness of fit, cells with an expected count under 5 pooled into one."""
    import numpy as np
    from scipy import stats

    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.r_[counts[big], counts[~big].sum()]
    exp = np.r_[expected[big], expected[~big].sum()]
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()  # chisquare wants equal totals; float rounding only
    return stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize("temperature", [0.5, 2.0, 50.0])
def test_sampled_token_frequencies_follow_softmax_of_logits_over_temperature(tiny, temperature):
    """4000 draws of the first token: their frequencies fit softmax(logits / T) computed here by hand
    (chi-square, p > 1e-4) and do not fit softmax(logits), what an ignored temperature would give
    (p < 1e-8). At T = 50 that is near-uniform over the 68 ids."""
    import numpy as np

    counts, p_t, p_1 = first_token_counts(tiny, temperature, n=4000)
    assert counts.sum() == 4000
    assert chi2_p(counts, p_t) > 1e-4, temperature
    assert chi2_p(counts, p_1) < 1e-8, temperature  # the check has the power to see an ignored T
    if temperature == 50.0:
        assert np.abs(p_t - 1 / len(p_t)).max() < 0.5 / len(p_t)  # near-uniform, and so are the counts
        assert (counts > 0).sum() >= 60


def test_a_second_rollout_into_the_same_out_is_refused_naming_the_first(tiny, tmp_path):
    """Two rollouts appending to one <out>.partial would interleave their records: while one holds
    --out, another is refused before it reads or writes anything, and its error names the holder.
    The lock is the process's: once the holder ends, the same --out is free again."""
    import subprocess
    import sys

    prompts, out = write_prompts(tmp_path / "p.jsonl"), tmp_path / "r.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from teachdiag.runfolder import lock_folder; "
                               f"lock_folder(Path({str(tmp_path)!r}), name='.r.jsonl.lock'); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=f"pid {holder.pid}") as err:
            rollout(tiny, prompts, out)
        assert err.value.file == str(out) and not out.exists() and not (tmp_path / "r.jsonl.partial").exists()
    finally:
        holder.kill()
        holder.wait()
    assert len(rollout(tiny, prompts, out)) == len(RECORDS)  # a killed holder leaves no stale lock


# ---------------------------------------------------------------- the run record beside --out


def test_the_run_record_says_what_made_the_file(pair, tmp_path, monkeypatch):
    """<out>.run.json holds the run header with the student's weight hashes, the same ones probe's
    run.json records for that model, and the sampling options; it says "complete": false while
    the batches are sampled and true once --out is in place. A killed rollout's record stays false
    and its --resume ends it true; a --resume whose student folder now holds other weights is refused
    before any sampling."""
    import shutil

    import teachdiag.commands.rollout as ro
    from teachdiag.provenance import weights_summary

    p = write_prompts(tmp_path / "p.jsonl")
    out = tmp_path / "r.jsonl"
    record = tmp_path / "r.jsonl.run.json"
    real_generate, seen = ro.generate_batch, []

    def generate(*a, **k):  # what a reader sees while the batches are sampled
        seen.append(json.loads(record.read_text())["complete"])
        return real_generate(*a, **k)

    monkeypatch.setattr(ro, "generate_batch", generate)
    rollout(pair[1], p, out, samples=2, batch_size=3, seed=4)
    monkeypatch.setattr(ro, "generate_batch", real_generate)
    assert seen and not any(seen)
    rec = json.loads(record.read_text())
    assert rec["complete"] is True and rec["n_records"] == 2 * len(RECORDS)
    assert rec["command"].startswith("teachdiag rollout") and rec["options"]["seed"] == 4
    assert rec["sampling"]["temperature"] == 1.0 and rec["sampling"]["samples"] == 2
    assert rec["prompts"]["n_records"] == len(RECORDS)
    assert rec["student"]["weights_sha256"] == weights_summary(pair[1])["sha256"] is not None

    # probe records the same model with the same hashes
    probe_out = tmp_path / "probe"
    assert main(["probe", "--teacher", pair[0], "--student", pair[1], "--contexts", str(out), "--device", "cpu",
                 "--quiet", "--positions", "4", "--out", str(probe_out)]) == 0
    probed = json.loads((probe_out / "run.json").read_text())["student"]
    for key in ("weights_sha256", "config_sha256", "source_dtype", "path"):
        assert rec["student"][key] == probed[key], key

    # killed mid-sampling: the record stays false; --resume finishes the file and the record
    student = tmp_path / "student"
    shutil.copytree(pair[1], student)
    full, killed = tmp_path / "full.jsonl", tmp_path / "killed.jsonl"
    rollout(str(student), p, full, samples=2, batch_size=3, seed=4)

    def dies_second(*a, **k):
        if len(seen) == 1:
            raise Kill
        seen.append(1)
        return real_generate(*a, **k)

    seen.clear()
    monkeypatch.setattr(ro, "generate_batch", dies_second)
    with pytest.raises(Kill):
        rollout(str(student), p, killed, samples=2, batch_size=3, seed=4)
    monkeypatch.setattr(ro, "generate_batch", real_generate)
    assert json.loads((tmp_path / "killed.jsonl.run.json").read_text())["complete"] is False
    rollout(str(student), p, killed, samples=2, batch_size=3, seed=4, resume=True)
    assert killed.read_bytes() == full.read_bytes()
    assert json.loads((tmp_path / "killed.jsonl.run.json").read_text())["complete"] is True

    # the same folder name, retrained in place: the records' meta cannot tell, the record's hashes can
    seen.clear()
    monkeypatch.setattr(ro, "generate_batch", dies_second)
    with pytest.raises(Kill):
        rollout(str(student), p, killed, samples=2, batch_size=3, seed=4, overwrite=True)
    monkeypatch.setattr(ro, "generate_batch", lambda *a, **k: pytest.fail("sampled before the check"))
    make_model("qwen2", 128, seed=11).save_pretrained(student)  # conftest.save_pair's student, other weights
    # no cache to clear: weights_summary hashes a folder again once its files changed (in this process too)
    with pytest.raises(InputError, match="the student model differs") as e:
        rollout(str(student), p, killed, samples=2, batch_size=3, seed=4, resume=True)
    assert e.value.file == str(tmp_path / "killed.jsonl.run.json") and e.value.field == "--resume"
