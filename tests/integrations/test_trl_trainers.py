"""TA-OPD in TRL's GKDTrainer and DistillationTrainer, end to end on tiny random models on CPU: three
steps run and log their selection; the loss is a hand-built masked mean over exactly the positions
ta_opd_mask keeps, for every selector, with gradient accumulation too; only those positions get a
gradient; and the Distillation selection, scored from hidden states a few positions at a time in
eval mode, is that of whole logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402  (TRL's own dependency)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402
from trl.experimental.gkd import GKDConfig  # noqa: E402

from teachdiag.errors import InputError  # noqa: E402
from teachdiag.integrations.trl import Selection, TAOPDDistillationTrainer, TAOPDGKDTrainer  # noqa: E402
from teachdiag.scores import SELECTORS  # noqa: E402
from teachdiag.selectors import response_signals, ta_opd_mask  # noqa: E402
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


def gkd_trainer(pair, out, selector="teachability", steps=3, accumulation=1):
    teacher, student = pair
    tok = AutoTokenizer.from_pretrained(student)
    ds = Dataset.from_dict({"prompt_ids": [tok(p)["input_ids"] for p in PROMPTS],
                            "completion_ids": [tok(p[::-1])["input_ids"] for p in PROMPTS]})
    args = GKDConfig(**common_args(out, steps, accumulation), max_new_tokens=6, lmbda=1.0, beta=0.5, temperature=1.0)
    return TAOPDGKDTrainer(model=load(student), teacher_model=load(teacher), args=args, train_dataset=ds,
                           processing_class=tok, data_collator=collate(tok),
                           selection=Selection(selector=selector, budget=BUDGET))


def distillation_trainer(pair, out, steps=3, accumulation=1, selector="teachability"):
    teacher, student = pair
    args = DistillationConfig(**common_args(out, steps, accumulation), max_completion_length=6, beta=1.0,
                              temperature=1.0)
    return TAOPDDistillationTrainer(model=load(student), teacher_model=load(teacher), args=args,
                                    train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                                    processing_class=AutoTokenizer.from_pretrained(student),
                                    selection=Selection(selector=selector, budget=BUDGET))


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


def reverse_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B, T) KL(p_S ‖ p_T): DistillationTrainer's divergence at beta 1."""
    ls, lt = F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1)
    return (ls.exp() * (ls - lt)).sum(-1)


def completion_logits(model, batch: dict) -> torch.Tensor:
    """(B, C, V) logits predicting the completion tokens of a DistillationTrainer batch."""
    n = batch["completion_ids"].shape[1]
    with torch.no_grad():
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        return model(input_ids=ids, attention_mask=att).logits[:, -(n + 1) : -1]


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


@pytest.mark.parametrize("selector", SELECTORS)
def test_distillation_loss_is_the_masked_mean_and_only_kept_positions_get_gradient(same_vocab_pair, tmp_path,
                                                                                   selector):
    trainer = distillation_trainer(same_vocab_pair, tmp_path / "distil", selector=selector)
    model = trainer.model.train()
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS[:2]])
    completion = inputs["completion_mask"].bool()  # (2, C)
    n = completion.shape[1]

    hidden = {}  # the backbone's last hidden states: position i feeds only position i's logits
    hook = model.model.norm.register_forward_hook(lambda m, a, out: hidden.update(h=out) or out.retain_grad())
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    hook.remove()

    s, t = completion_logits(model, inputs), completion_logits(trainer.teacher_model, inputs)  # (2, C, V)
    keep = ta_opd_mask(s, t, completion, budget=BUDGET, selector=selector)
    assert torch.equal(inputs["tool_mask"].bool(), keep) and inputs["num_items_in_batch"] == keep.sum()
    assert selector == "all" or keep.sum() < completion.sum()  # else the gradient check below proves nothing
    assert loss.item() == pytest.approx(((reverse_kl(s, t) * keep).sum() / keep.sum()).item(), rel=1e-5)

    got = hidden["h"].grad[:, -(n + 1) : -1].abs().sum(-1) > 0  # (2, C)
    assert torch.equal(got, keep)
    assert hidden["h"].grad[:, : -(n + 1)].abs().sum() == 0  # nor anything in the prompt


def test_selection_settings_are_checked():
    with pytest.raises(InputError, match="budget"):
        Selection(budget=0)
    with pytest.raises(InputError, match="selector"):
        Selection(selector="teachabilty")


def test_gkd_training_step_returns_the_micro_batch_mean_over_the_accumulation_steps(same_vocab_pair, tmp_path):
    """loss_is_scaled_for_ga = False: Trainer divides each micro-batch's kept mean by the accumulation steps."""
    trainer = gkd_trainer(same_vocab_pair, tmp_path / "gkd", steps=1, accumulation=2)
    theta0, teacher = load(same_vocab_pair[1]), trainer.teacher_model  # the student both micro-batches saw
    seen, step = [], trainer.training_step

    def record(model, inputs, num_items_in_batch=None):
        loss = step(model, inputs, num_items_in_batch)  # GKD puts its on-policy batch into `inputs`
        seen.append(({k: inputs[k].clone() for k in ("input_ids", "attention_mask", "labels")}, loss.item()))
        return loss

    trainer.training_step = record
    trainer.train()
    assert len(seen) == 2
    for batch, loss in seen:
        with torch.no_grad():
            s, t = (m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                    for m in (theta0, teacher))
        keep = ta_opd_mask(s, t, batch["labels"][:, 1:] != -100, budget=BUDGET)
        mean = (jsd(s, t, 0.5) * keep).sum() / keep.sum()
        assert loss == pytest.approx(mean.item() / 2, rel=1e-5)


def test_distillation_micro_batch_losses_sum_to_the_masked_mean_of_the_generation_batch(same_vocab_pair, tmp_path):
    """num_items_in_batch = the generation batch's kept count: the accumulated loss is its kept mean."""
    trainer = distillation_trainer(same_vocab_pair, tmp_path / "distil", steps=1, accumulation=2)
    theta0 = load(same_vocab_pair[1])
    seen, compute = [], trainer.compute_loss

    def record(model, inputs, *args, **kwargs):
        loss = compute(model, inputs, *args, **kwargs)
        seen.append((inputs, loss.item()))
        return loss

    trainer.compute_loss = record
    trainer.train()  # one optimizer step over a generation batch of 2 micro-batches of 2 rows
    assert len(seen) == 2
    batch = {k: torch.cat([seen[0][0][k], seen[1][0][k]]) for k in
             ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "tool_mask")}  # (4, ·)
    s, t = completion_logits(theta0, batch), completion_logits(trainer.teacher_model, batch)
    keep = batch["tool_mask"].bool()
    assert torch.equal(keep, ta_opd_mask(s, t, batch["completion_mask"].bool(), budget=BUDGET))
    assert seen[0][1] + seen[1][1] == pytest.approx(((reverse_kl(s, t) * keep).sum() / keep.sum()).item(), rel=1e-5)


def test_scoring_in_chunks_of_positions_equals_scoring_whole_logits(same_vocab_pair, tmp_path):
    trainer = distillation_trainer(same_vocab_pair, tmp_path / "distil")
    model = trainer.model.train()
    seen = []  # whether each scoring forward ran in eval mode (no dropout)
    hidden = trainer._get_last_hidden_state
    trainer._get_last_hidden_state = lambda m, *a, **k: seen.append(m.training) or hidden(m, *a, **k)
    out = DistillationTrainer._generate_and_score_completions(trainer, [{"prompt": p} for p in PROMPTS[:4]])

    def slabs(chunk):
        trainer.score_chunk = chunk
        return trainer._scored_slabs(out)

    whole, chunked = slabs(10**6), slabs(1)  # 2 slabs of 2 rows: per_device_train_batch_size
    assert seen and not any(seen) and model.training  # scored in eval mode, then put back
    completion = out["completion_mask"].bool()  # (4, C)
    s, t = completion_logits(model, out), completion_logits(trainer.teacher_model, out)  # (4, C, V)
    for (a, ra), (b, rb), rows in zip(whole, chunked, (slice(0, 2), slice(2, 4))):
        full = response_signals(s[rows], t[rows], completion[rows], trainer.selection.top_k)
        assert torch.equal(ra, completion[rows]) and torch.equal(rb, completion[rows])
        assert a.keys() == b.keys() == full.keys()
        for k in a:  # float32 logits: a row's matmul may round differently in another shape
            assert np.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k
            assert np.allclose(a[k], full[k], rtol=1e-5, atol=1e-7), k
    expected = ta_opd_mask(s, t, completion, budget=BUDGET)
    assert torch.equal(trainer.select(whole, completion), expected)
    assert torch.equal(trainer.select(chunked, completion), expected)


def test_distillation_under_fsdp_or_deepspeed_is_refused(same_vocab_pair, tmp_path):
    trainer = distillation_trainer(same_vocab_pair, tmp_path / "distil")
    trainer._refuse_sharded()  # single process: accepted
    for flag in ("is_fsdp_enabled", "is_deepspeed_enabled"):
        setattr(trainer, flag, True)  # as Trainer sets them from the accelerator's plugins
        with pytest.raises(InputError, match="DDP only"):
            trainer._refuse_sharded()
        setattr(trainer, flag, False)
