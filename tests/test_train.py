"""`teachdiag train` and the TA-OPD mask: a trainer step against a hand-written AdamW step, the
budget rule on planted scores, the selector scores against the float64 reference, and resume;
the `position` selector."""

import copy
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import write_contexts
from reference import ref_signals
from teachdiag.cli import main
from teachdiag.contexts import load_contexts
from teachdiag.selectors import budget_mask, selector_scores, ta_opd_mask
from teachdiag.train import TrainConfig, make_optimizer, train_step

VOCAB = 68


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hand_loss(student, teacher, ctx, loss):
    """Per-position OPD losses of a context from full-sequence forwards, float64 (V,) by hand."""
    s_ids = ctx.prompt_ids + ctx.response_ids
    t_ids = ctx.teacher_view + ctx.response_ids
    zs = student(input_ids=torch.tensor([s_ids])).logits[0, len(ctx.prompt_ids) - 1 : -1, :VOCAB].double()
    with torch.no_grad():
        zt = teacher(input_ids=torch.tensor([t_ids])).logits[0, len(ctx.teacher_view) - 1 : -1, :VOCAB].double()
    ls, lt = zs.log_softmax(-1), zt.log_softmax(-1)
    y = torch.tensor(ctx.response_ids)[:, None]
    if loss == "reverse_kl":
        return (ls.exp() * (ls - lt)).sum(-1)
    lps, lpt = ls.gather(1, y)[:, 0], lt.gather(1, y)[:, 0]
    return -(lpt - lps).detach() * lps


@pytest.mark.parametrize("loss", ["sampled_token", "reverse_kl"])
@pytest.mark.parametrize("select", ["all", "teachability"])
def test_train_step_equals_hand_written_adamw(tmp_path, pair, loss, select):
    ctxs = load_contexts(write_contexts(tmp_path / "c.jsonl", n=4))
    teacher, student = load(pair[0]), load(pair[1])
    ref = copy.deepcopy(student)
    cfg = TrainConfig(lr=1e-3, beta1=0.9, beta2=0.98, weight_decay=0.1)
    opt = make_optimizer(student, cfg)
    row = train_step(student, teacher, ctxs, [0, 1, 2, 3], VOCAB, loss=loss, select=select, budget=0.25,
                     top_k=16, optimizer=opt, device="cpu")
    # the mask the trainer used, from the selector on planted-free reference signals
    n = [len(c.response_ids) for c in ctxs]
    if select == "all":
        kept = [np.ones(k, bool) for k in n]
    else:
        sig = {k: [] for k in ("topk_entropy", "union_fkl", "compat_mass", "fkl")}
        with torch.no_grad():
            for c in ctxs:
                s_ids, t_ids = c.prompt_ids + c.response_ids, c.teacher_view + c.response_ids
                zs = ref(input_ids=torch.tensor([s_ids])).logits[0, len(c.prompt_ids) - 1 : -1, :VOCAB]
                zt = teacher(input_ids=torch.tensor([t_ids])).logits[0, len(c.teacher_view) - 1 : -1, :VOCAB]
                for j in range(len(c.response_ids)):
                    r = ref_signals(zs[j].numpy(), zt[j].numpy(), c.response_ids[j], 16)
                    for k in sig:
                        sig[k].append(r[k])
        flat = {k: np.array(v) for k, v in sig.items()}
        keep = budget_mask(selector_scores(flat, "teachability"), np.repeat(np.arange(4), n), 0.25)
        kept = np.split(keep, np.cumsum(n)[:-1])
    want = sum(n) if select == "all" else max(round(0.25 * sum(n)), 4)
    assert row["kept"] == sum(int(k.sum()) for k in kept) == want
    # hand-written first AdamW step: θ1 = θ0(1 − lr·wd) − lr·g/(|g| + eps)  (m̂ = g, v̂ = g²)
    params = list(ref.parameters())
    for p in params:
        p.requires_grad_(True)
    total = sum((hand_loss(ref, teacher, c, loss)[torch.from_numpy(k)]).sum() for c, k in zip(ctxs, kept))
    grads = torch.autograd.grad(total / row["kept"], params)
    assert row["loss"] == pytest.approx(float(total) / row["kept"], rel=1e-5)
    for p, g, (name, q) in zip(params, grads, student.named_parameters()):
        want = p.detach().double() * (1 - 1e-3 * 0.1) - 1e-3 * g.double() / (g.double().abs() + 1e-8)
        # g/(|g|+eps) is ±1 except where |g| ~ eps: compare where the gradient is well above float noise
        big = g.abs() > 1e-6
        torch.testing.assert_close(q.detach().double()[big], want[big], rtol=1e-6, atol=1e-7, msg=name)


def test_budget_mask_keeps_the_budget_ties_earlier_and_one_per_sample():
    scores = np.array([5.0, 5.0, 1.0, 0.0, 0.5, 9.0, 9.0, 2.0, 2.0, 3.0])
    sample = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    keep = budget_mask(scores, sample, 0.5)  # round(5) positions
    # each sample's best: 0 (tie with 1 -> earlier), 4, 5 (tie with 6 -> earlier), 9; then the best left: 6
    assert keep.nonzero()[0].tolist() == [0, 4, 5, 6, 9]
    keep = budget_mask(scores, sample, 0.1)  # round(1) < 4 samples: one each
    assert keep.nonzero()[0].tolist() == [0, 4, 5, 9]
    keep = budget_mask(scores, sample, 0.8)  # 8: ties at 2.0 go to the earlier of 7 and 8, 3 stays out
    assert keep.sum() == 8 and not keep[3] and not keep[2]
    with pytest.raises(ValueError):
        budget_mask(scores, sample, 0.0)


def test_ta_opd_mask_on_trainer_style_tensors():
    torch.manual_seed(0)
    s, t = torch.randn(3, 7, 40) * 3, torch.randn(3, 7, 40) * 3
    mask = torch.ones(3, 7)
    mask[1, 4:] = 0  # a shorter response
    keep = ta_opd_mask(s, t, mask, budget=0.2, selector="teachability", k=4)
    assert keep.shape == (3, 7) and not keep[1, 4:].any()
    assert int(keep.sum()) == round(0.2 * 18) and all(keep[b].any() for b in range(3))
    sig = {k: [] for k in ("topk_entropy", "union_fkl", "compat_mass", "fkl")}
    for b, j in mask.nonzero().tolist():
        r = ref_signals(s[b, j].numpy(), t[b, j].numpy(), 0, 4)
        for k in sig:
            sig[k].append(r[k])
    d = np.array(sig["union_fkl"])
    c = np.array(sig["compat_mass"])
    norm = lambda x: np.clip((x - np.quantile(x, 0.05)) / (np.quantile(x, 0.95) - np.quantile(x, 0.05)), 0, 1)  # noqa: E731
    want = budget_mask(norm(d) * norm(c), mask.nonzero()[:, 0].numpy(), 0.2)
    assert keep[mask.bool()].numpy().tolist() == want.tolist()


def test_train_cli_reduces_loss_writes_a_loadable_model_and_resumes(tmp_path, pair):
    contexts = write_contexts(tmp_path / "c.jsonl", n=6)
    args = ["train", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts), "--device", "cpu",
            "--quiet", "--loss", "reverse_kl", "--lr", "3e-3", "--batch", "6"]
    assert main([*args, "--out", str(tmp_path / "a"), "--steps", "6"]) == 0
    log = np.genfromtxt(tmp_path / "a" / "train_log.csv", delimiter=",", names=True)
    assert log["loss"][-1] < log["loss"][0] and log["mean_fkl"][-1] < log["mean_fkl"][0]
    model = load(tmp_path / "a" / "model")
    # resume: 3 steps, then 3 more, equals 6 in one go (same batches, AdamW state restored)
    assert main([*args, "--out", str(tmp_path / "b"), "--steps", "3"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--steps", "6", "--resume"]) == 0
    resumed = load(tmp_path / "b" / "model")
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert main([*args, "--out", str(tmp_path / "a"), "--steps", "2"]) == 2  # not empty: refused
    assert main([*args, "--out", str(tmp_path / "c"), "--budget", "0"]) == 2
    assert not math.isnan(log["seconds"].sum())


def test_on_policy_samples_fresh_responses_each_step(tmp_path, pair):
    from test_rollout import write_prompts

    prompts = write_prompts(tmp_path / "p.jsonl")
    args = ["train", "--teacher", pair[0], "--student", pair[1], "--prompts", prompts, "--on-policy",
            "--device", "cpu", "--quiet", "--lr", "1e-3", "--batch", "3", "--max-new-tokens", "6"]
    assert main([*args, "--out", str(tmp_path / "a"), "--steps", "2"]) == 0
    log = np.genfromtxt(tmp_path / "a" / "train_log.csv", delimiter=",", names=True)
    assert len(log) == 2 and (log["positions"] >= 3).all() and (log["positions"] <= 18).all()
    assert main([*args, "--out", str(tmp_path / "b"), "--steps", "2", "--contexts", prompts]) == 2


def test_resume_drops_log_rows_after_the_last_save_and_bad_options_fail_early(tmp_path, pair):
    contexts = write_contexts(tmp_path / "c.jsonl", n=4)
    args = ["train", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts), "--device", "cpu",
            "--quiet", "--lr", "1e-3", "--batch", "2", "--out", str(tmp_path / "a")]
    assert main([*args, "--steps", "3"]) == 0
    with open(tmp_path / "a" / "train_log.csv", "a") as f:  # a step logged, then killed before its save
        f.write("4,0.5,3,3,0.9,1.0\n")
    assert main([*args, "--steps", "5", "--resume"]) == 0
    log = np.genfromtxt(tmp_path / "a" / "train_log.csv", delimiter=",", names=True)
    assert log["step"].tolist() == [1, 2, 3, 4, 5] and log["loss"][3] != 0.5
    assert not any(p.name.endswith((".tmp", ".old", ".new")) for p in (tmp_path / "a").iterdir())
    for flag, value in (("--lr", "-1e-6"), ("--beta2", "1.5"), ("--temperature", "-1"), ("--weight-decay", "-0.1")):
        assert main([*args[:-1], str(tmp_path / flag), "--steps", "1", flag, value]) == 2


def test_budget_rule_is_the_analysis_rule():
    from teachdiag.analysis.selection import paper_budget_size

    scores = np.arange(150.0)
    for rho in (0.01, 0.03, 0.05, 0.07, 0.1):  # 0.07 · 150 = 10.500000000000002: 10, not 11
        keep = budget_mask(scores, np.zeros(150, int), rho)
        assert keep.sum() == paper_budget_size(150, rho) == round(round(rho * 150, 9))


def test_position_selector_keeps_the_latest_positions():
    # responses of 4 and 10 tokens: each one's last token first, then the largest (t + 0.5)/L
    signals = {"fkl": np.zeros(14), "position": np.r_[np.arange(4), np.arange(10)],
               "response_length": np.r_[np.full(4, 4), np.full(10, 10)]}
    sample = np.r_[np.zeros(4, int), np.ones(10, int)]
    keep = budget_mask(selector_scores(signals, "position"), sample, 5 / 14)  # 5 kept
    # the rest after 3 and 13: 12 (0.85), 11 (0.75), then 10 (0.65) beats t = 2 of 4 (0.625)
    assert keep.nonzero()[0].tolist() == [3, 10, 11, 12, 13]
    # the TA-OPD mask on a right- and a left-padded row: the end of each response, whatever the padding
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]])
    s = torch.randn(2, 8, 12)
    got = ta_opd_mask(s, s.clone(), mask, budget=0.4, selector="position", k=4)  # round(0.4 · 10) = 4
    assert got.nonzero().tolist() == [[0, 4], [0, 5], [1, 6], [1, 7]]
