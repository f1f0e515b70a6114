"""The README's "Inside your trainer" snippets run: each python block of a trainer's section is
executed with tiny models in place of the lines marked `# yours`."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from conftest import write_contexts
from teachdiag.selectors import ta_opd_mask

ROOT = Path(__file__).resolve().parents[2]
HEADING = "## Inside your trainer"


def doc() -> str:
    return (ROOT / "README.md").read_text()


def snippets(section: str) -> list[str]:
    """The ```python blocks of the ### section whose title starts with `section`."""
    text = doc().split(HEADING, 1)[1]
    part = next(p for p in re.split(r"\n### ", text) if p.startswith(section))
    part = re.split(r"\n## ", part)[0]  # the section ends where the next top-level one begins
    return re.findall(r"```python\n(.*?)```", part, flags=re.S)


def run(code: str, values: dict[str, str], env: dict) -> dict:
    """Execute `code` with each `# yours` line's names bound to `values` (python source); every such
    line must be replaced, so a snippet cannot grow a setting the test does not know of."""
    lines = []
    for line in code.splitlines():
        if re.search(r"#\s*yours\b", line):
            names = line.split("=", 1)[0].strip()
            assert names in values, f"no test value for {names!r}"
            line = f"{names} = {values[names]}"
        lines.append(line)
    exec(compile("\n".join(lines), "README snippet", "exec"), env)
    return env


@pytest.fixture(scope="module")
def trl_pair(tmp_path_factory):
    pytest.importorskip("trl")
    from transformers import AutoTokenizer

    from trl_pair import save_same_vocab_pair

    teacher, student = save_same_vocab_pair(tmp_path_factory.mktemp("doc_pair"))
    for folder in (teacher, student):  # GKD's default collator renders chats through a template
        tok = AutoTokenizer.from_pretrained(folder)
        tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}"
                             "{% endfor %}{% if add_generation_prompt %} {% endif %}")
        tok.save_pretrained(folder)
    return teacher, student


def test_trl_snippets_run(trl_pair, tmp_path, monkeypatch):
    from trl_pair import PROMPTS, common_args

    monkeypatch.chdir(tmp_path)
    first, second = snippets("TRL")
    pair = f"{trl_pair[0]!r}, {trl_pair[1]!r}"
    env = run(first, {"TEACHER, STUDENT": pair, "prompts": f"Dataset.from_dict({{'prompt': {PROMPTS!r}}})",
                      "args": "DistillationConfig(**common_args('runs/ta_opd'), max_completion_length=6)"},
              {"common_args": common_args})
    assert [r["step"] for r in env["trainer"].selection_log] == [1, 2, 3]

    chat = [{"role": "user", "content": "abc de"}, {"role": "assistant", "content": "ed cba"}]
    env = run(second, {"TEACHER, STUDENT": pair, "chat": repr(chat),
                       "args": "GKDConfig(**common_args('runs/gkd'), lmbda=1.0, max_new_tokens=6)"},
              {"common_args": common_args})
    assert len(env["trainer"].selection_log) == 3


def test_slime_snippet_runs():
    from test_slime_hook import ARGS, make_batch, masks

    env = run(snippets("slime")[0], {}, {})
    samples, s, t, response = make_batch(k=16)
    env["post_process_rewards"](ARGS, samples)
    assert torch.equal(masks(samples), ta_opd_mask(s, t, response, budget=0.05, k=16, signals="topk_lb"))
    assert env["post_process_rewards"].log[-1]["kept"] == sum(sum(x.loss_mask) for x in samples)
    assert callable(env["reward_func"])


def test_verl_snippet_runs():
    from test_verl_mask import verl_batch

    env = run(snippets("verl")[0], {}, {})
    data, s, t = verl_batch(k=16)  # the stage tensors nested over whole sequences, as the driver holds them
    response_mask = data["response_mask"]
    metrics = env["ta_opd_response_mask"](SimpleNamespace(batch=data))
    expected = ta_opd_mask(s, t, response_mask, budget=0.05, k=16, signals="topk")
    assert torch.equal(data["response_mask"].bool(), expected) and expected.sum() < response_mask.sum()
    assert torch.equal(data["loss_mask"], data["response_mask"]) and data["response_mask_full"] is response_mask
    assert metrics["ta_opd/kept"] == expected.sum()


def test_monitor_snippet_runs(pair, tmp_path, monkeypatch):
    import teachdiag

    monkeypatch.chdir(tmp_path)
    contexts = write_contexts(tmp_path / "bank.jsonl", n=3)
    step = "lambda model: [p.data.add_(1e-3) for p in model.parameters()]"
    run(snippets("A live monitor")[0], {"TEACHER, STUDENT, BANK": f"{pair[0]!r}, {pair[1]!r}, {str(contexts)!r}",
                                        "STEPS, EVERY": "2, 1", "train_one_step": step}, {})
    assert pd.read_csv("runs/my_opd/monitor/trajectory.csv")["step"].tolist() == [1, 2]
    assert (teachdiag.analyze("runs/my_opd/monitor", bootstrap=20) / "trajectory.md").is_file()
