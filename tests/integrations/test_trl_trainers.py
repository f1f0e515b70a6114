"""TA-OPD in TRL's GKDTrainer and DistillationTrainer, end to end on tiny random models on CPU: three
steps run and log their selection; the loss is a hand-built masked mean over exactly the positions
ta_opd_mask keeps; and only those positions get a gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402  (TRL's own dependency)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DistillationConfig  # noqa: E402
from trl.experimental.gkd import GKDConfig  # noqa: E402

from teachdiag.errors import InputError  # noqa: E402
from teachdiag.integrations.trl import Selection, TAOPDDistillationTrainer, TAOPDGKDTrainer  # noqa: E402
from teachdiag.scores import SELECTORS  # noqa: E402
from teachdiag.selectors import ta_opd_mask  # noqa: E402
from trl_pair import PROMPTS, common_args, save_same_vocab_pair  # noqa: E402

BUDGET = 0.3  # of 12 completion positions: 4 kept, so kept and dropped positions both exist


@pytest.fixture(scope="module")
def same_vocab_pair(tmp_path_factory):
    return save_same_vocab_pair(tmp_path_factory.mktemp("trl_pair"))


def load(path):
    return AutoModelForCausalLM.from_pretrained(path)


def collate(tok):
    """GKD batches from token ids: prompts left-padded (generation), prompt + completion right-padded,
    labels −100 off the completion (GKD's convention)."""
    def run(rows):
        pad = tok.pad_token_id
        width = max(len(r["prompt_ids"]) for r in rows)
        length = max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)
        out = {k: [] for k in ("input_ids", "attention_mask", "labels", "prompts", "prompt_attention_mask")}
        for r in rows:
            p, c = r["prompt_ids"], r["completion_ids"]
            n, gap = len(p) + len(c), width - len(p)
            out["prompts"].append([pad] * gap + p)
            out["prompt_attention_mask"].append([0] * gap + [1] * len(p))
            out["input_ids"].append(p + c + [pad] * (length - n))
            out["attention_mask"].append([1] * n + [0] * (length - n))
            out["labels"].append([-100] * len(p) + c + [-100] * (length - n))
        return {k: torch.tensor(v) for k, v in out.items()}
    return run


def gkd_trainer(pair, out, selector="teachability", steps=3):
    teacher, student = pair
    tok = AutoTokenizer.from_pretrained(student)
    ds = Dataset.from_dict({"prompt_ids": [tok(p)["input_ids"] for p in PROMPTS],
                            "completion_ids": [tok(p[::-1])["input_ids"] for p in PROMPTS]})
    args = GKDConfig(**common_args(out, steps), max_new_tokens=6, lmbda=1.0, beta=0.5, temperature=1.0)
    return TAOPDGKDTrainer(model=load(student), teacher_model=load(teacher), args=args, train_dataset=ds,
                           processing_class=tok, data_collator=collate(tok),
                           selection=Selection(selector=selector, budget=BUDGET))


def distillation_trainer(pair, out, steps=3, accumulation=1):
    teacher, student = pair
    args = DistillationConfig(**common_args(out, steps, accumulation), max_completion_length=6, beta=1.0,
                              temperature=1.0)
    return TAOPDDistillationTrainer(model=load(student), teacher_model=load(teacher), args=args,
                                    train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                                    processing_class=AutoTokenizer.from_pretrained(student),
                                    selection=Selection(budget=BUDGET))


def check_log(trainer, steps):
    log = trainer.selection_log
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    for r in log:
        assert 1 <= r["kept"] < r["positions"] and r["kept_fraction"] == r["kept"] / r["positions"]
        assert 0 <= r["teachability_kept"] <= 1 and 0 <= r["compat_all"] <= 1
    logged = [h for h in trainer.state.log_history if "ta_opd/kept" in h]
    assert [h["ta_opd/kept"] for h in logged] == [r["kept"] for r in log]  # logging_steps=1: each step's own


def test_gkd_trains_three_steps_and_logs_each_selection(same_vocab_pair, tmp_path):
    trainer = gkd_trainer(same_vocab_pair, tmp_path / "gkd")
    trainer.train()  # lmbda 1: every step on the student's own completions
    check_log(trainer, 3)


def test_distillation_trains_three_steps_and_logs_each_selection(same_vocab_pair, tmp_path):
    trainer = distillation_trainer(same_vocab_pair, tmp_path / "distil", accumulation=2)
    trainer.train()  # 3 optimizer steps, each over a generation batch of 2 micro-batches
    check_log(trainer, 3)
    assert all(r["positions"] == 4 * 6 for r in trainer.selection_log)  # selected over the whole batch


def jsd(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """(B, T) generalized JSD of GKD: β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m), m = β·p_T + (1 − β)·p_S."""
    ls, lt = F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1)
    lm = (beta * lt.exp() + (1 - beta) * ls.exp()).log()
    return beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)


@pytest.mark.parametrize("selector", SELECTORS)
def test_gkd_loss_is_the_masked_mean_and_only_kept_positions_get_gradient(same_vocab_pair, tmp_path, selector):
    trainer = gkd_trainer(same_vocab_pair, tmp_path / "gkd", selector)
    model = trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    loss, out = trainer.compute_loss(model, batch, return_outputs=True)
    out.logits.retain_grad()
    loss.backward()

    with torch.no_grad():  # by hand: the two models, ta_opd_mask, the JSD averaged over what it keeps
        s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = trainer.teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    response = batch["labels"][:, 1:] != -100
    keep = ta_opd_mask(s, t, response, budget=BUDGET, selector=selector)
    assert 0 < keep.sum() <= response.sum() and not (keep & ~response).any()
    assert selector == "all" or keep.sum() < response.sum()  # else the gradient check below proves nothing
    expected = (jsd(s, t, 0.5) * keep).sum() / keep.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    got = out.logits.grad[:, :-1].abs().sum(-1) > 0  # (B, T): which positions' logits moved the loss
    assert torch.equal(got, keep)
    assert trainer.selection_log[-1]["kept"] == keep.sum()


def test_distillation_loss_is_the_masked_mean_and_only_kept_positions_get_gradient(same_vocab_pair, tmp_path):
    trainer = distillation_trainer(same_vocab_pair, tmp_path / "distil")
    model = trainer.model.train()
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS[:2]])
    completion = inputs["completion_mask"].bool()  # (2, C)
    n = completion.shape[1]

    hidden = {}  # the backbone's last hidden states: position i feeds only position i's logits
    hook = model.model.norm.register_forward_hook(lambda m, a, out: hidden.update(h=out) or out.retain_grad())
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    hook.remove()

    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        s = model(input_ids=ids, attention_mask=att).logits[:, -(n + 1) : -1]  # (2, C, V)
        t = trainer.teacher_model(input_ids=ids, attention_mask=att).logits[:, -(n + 1) : -1]
    keep = ta_opd_mask(s, t, completion, budget=BUDGET)
    assert torch.equal(inputs["tool_mask"].bool(), keep) and inputs["num_items_in_batch"] == keep.sum()
    ls, lt = F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1)
    reverse_kl = (ls.exp() * (ls - lt)).sum(-1)  # beta 1: KL(p_S ‖ p_T)
    assert loss.item() == pytest.approx(((reverse_kl * keep).sum() / keep.sum()).item(), rel=1e-5)

    got = hidden["h"].grad[:, -(n + 1) : -1].abs().sum(-1) > 0  # (2, C)
    assert torch.equal(got, keep)
    assert hidden["h"].grad[:, : -(n + 1)].abs().sum() == 0  # nor anything in the prompt


def test_selection_settings_are_checked():
    with pytest.raises(InputError, match="budget"):
        Selection(budget=0)
    with pytest.raises(InputError, match="selector"):
        Selection(selector="teachabilty")
