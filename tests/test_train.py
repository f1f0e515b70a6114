"""`teachdiag train` and the TA-OPD mask: a trainer step against a hand-written AdamW step, the
budget rule on planted scores, the selector scores against the float64 reference, and resume;
PW-OPSD's position-weighted step against the loss built by hand, and the `position` selector."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import save_pair, write_contexts
from reference import ref_signals
from reference_ta_opd import ref_keep, ref_served_row
from teachdiag.cli import main
from teachdiag.contexts import load_contexts
from teachdiag.scores import budget_count, keep_positions, paper_text_keep
from teachdiag.selectors import ta_opd_mask
from teachdiag.commands.train import TrainConfig, make_optimizer
from teachdiag.training import train_step

VOCAB = 68


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hand_loss(student, teacher, ctx, loss, keep=None, clip=0.05, temperature=1.0):
    """Per-position OPD losses of a context from full-sequence forwards, float64 (V,) by hand.
    keep: bool (VOCAB,) or None; a row whose token is outside it is garbage (callers drop it)."""
    s_ids = ctx.prompt_ids + ctx.response_ids
    t_ids = ctx.teacher_view + ctx.response_ids
    zs = student(input_ids=torch.tensor([s_ids])).logits[0, len(ctx.prompt_ids) - 1 : -1, :VOCAB].double()
    with torch.no_grad():
        zt = teacher(input_ids=torch.tensor([t_ids])).logits[0, len(ctx.teacher_view) - 1 : -1, :VOCAB].double()
    y = torch.tensor(ctx.response_ids)[:, None]
    if keep is not None:  # both renormalised on the kept ids; y as a column among them
        zs, zt, y = zs[:, keep], zt[:, keep], (keep.long().cumsum(0) - 1)[y].clamp(min=0)
    ls, lt = (zs / temperature).log_softmax(-1), (zt / temperature).log_softmax(-1)
    if loss == "reverse_kl":
        return (ls.exp() * (ls - lt)).sum(-1)
    if loss == "clipped_fkl":
        return torch.clamp(lt.exp() * (lt - ls), max=clip).sum(-1)
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
    else:  # the released TA-OPD rule on top-K signals, by the row-by-row reference
        rows = []
        with torch.no_grad():
            for b, c in enumerate(ctxs):
                s_ids, t_ids = c.prompt_ids + c.response_ids, c.teacher_view + c.response_ids
                zs = ref(input_ids=torch.tensor([s_ids])).logits[0, len(c.prompt_ids) - 1 : -1, :VOCAB]
                zt = teacher(input_ids=torch.tensor([t_ids])).logits[0, len(c.teacher_view) - 1 : -1, :VOCAB]
                for j in range(len(c.response_ids)):
                    r = ref_served_row(zs[j].numpy(), zt[j].numpy(), 16)
                    rows.append({"sample": b, "pos": j, "valid": 1, "H": r["topk_entropy"], "D": r["union_fkl"],
                                 "C": r["compat_mass"]})
        kept = np.split(np.array(ref_keep(rows, "teachability", 0.25), bool), np.cumsum(n)[:-1])
    want = sum(n) if select == "all" else math.ceil(0.25 * sum(n))  # each sample already has one here
    assert row["kept"] == sum(int(k.sum()) for k in kept) == want
    # hand-written first AdamW step: θ1 = θ0(1 − lr·wd) − lr·g/(|g| + eps)  (m̂ = g, v̂ = g²)
    params = list(ref.parameters())
    for p in params:
        p.requires_grad_(True)
    total = sum((hand_loss(ref, teacher, c, loss)[torch.from_numpy(k)]).sum() for c, k in zip(ctxs, kept))
    grads = torch.autograd.grad(total / row["kept"], params)
    assert row["loss"] == pytest.approx(total.item() / row["kept"], rel=1e-5)
    for p, g, (name, q) in zip(params, grads, student.named_parameters()):
        # the gradient the trainer stepped with, read back from AdamW's first moment (m = (1 − β1)·g),
        # against the hand-built one: equal up to float32 noise (two forward orders, ~1e-4 of the
        # tensor's largest entry), where a wrong mask or normaliser would be off by O(1)
        state = opt.state[q]
        g_t = state["exp_avg"].double() / (1 - 0.9)
        torch.testing.assert_close(g_t, g.double(), rtol=1e-3, atol=1e-3 * float(g.abs().max()), msg=name)
        # and every entry of the step, from that gradient: θ0(1 − lr·wd) − lr·m̂/(√v̂ + eps), m̂ = g, v̂ = g²
        # (near |g| ~ eps the step is steep in g, so it is checked against the trainer's own g, not ours)
        v_hat = state["exp_avg_sq"].double() / (1 - 0.98)
        want = p.detach().double() * (1 - 1e-3 * 0.1) - 1e-3 * g_t / (v_hat.sqrt() + 1e-8)
        torch.testing.assert_close(q.detach().double(), want, rtol=1e-6, atol=1e-7, msg=name)


def reference_train_step(student, teacher, ctxs, batch, vocab, *, loss, select, budget, top_k, optimizer, device,
                         seed=0, select_rule="released", select_signals="topk", keep=None, kl_clip=0.05,
                         loss_temperature=1.0, pw=None):
    """training.train_step as it was before it held one context's teacher logits at a time: every
    context's (R, V) teacher logits first, then the scores, then the losses (the reference the
    streaming step must equal)."""
    from teachdiag.probe.forward import teacher_logits
    from teachdiag.probe.signals import signals_from_logits
    from teachdiag.scores import position_weight
    from teachdiag.training import opd_loss

    views = []
    for c in batch:
        ctx = ctxs[c]
        positions = list(range(len(ctx.response_ids)))
        n = len(ctx.prompt_ids)
        ids = torch.tensor(ctx.prompt_ids + ctx.response_ids[:-1], device=device)
        at = torch.arange(n - 1, n - 1 + len(positions), device=device)
        y = torch.tensor(ctx.response_ids, device=device)
        views.append((ids, at, y, teacher_logits(teacher, ctx, positions, vocab, device)))

    def logits(ids, at):
        return student(input_ids=ids[None], logits_to_keep=at, use_cache=False).logits[0, :, :vocab].float()

    sig = {k: [] for k in ("topk_entropy", "union_fkl", "compat_mass", "fkl")}
    with torch.no_grad():
        for ids, at, y, t in views:
            s = signals_from_logits(logits(ids, at), t, y, top_k, keep=keep, mode=select_signals)
            for k in sig:
                sig[k].append(s[k].cpu().numpy())
    sample = np.concatenate([np.full(len(v[2]), i) for i, v in enumerate(views)])
    flat = {k: np.concatenate(v) for k, v in sig.items()}
    flat["position"] = np.concatenate([np.arange(len(v[2])) for v in views])
    flat["response_length"] = np.concatenate([np.full(len(v[2]), len(v[2])) for v in views])
    flat["sample"] = sample
    valid = (torch.cat([keep[v[2]] for v in views]).cpu().numpy() if loss == "sampled_token" and keep is not None
             else np.ones(len(sample), bool))
    if select_rule == "paper_text":
        kept = keep_positions(flat, select, budget, rule=select_rule, seed=seed) & valid
    else:
        kept = keep_positions(flat, select, budget, valid, rule=select_rule, seed=seed)
    n_kept = int(kept.sum())
    n_seqs = sum(bool(m.any()) for m in np.split(kept, np.cumsum([len(v[2]) for v in views])[:-1]))
    optimizer.zero_grad(set_to_none=True)
    total, a = 0.0, 0
    for ids, at, y, t in views:
        kept_here = kept[a : a + len(y)]
        mask = torch.from_numpy(kept_here).to(device)
        a += len(y)
        if not mask.any():
            continue
        with torch.enable_grad():
            per = opd_loss(logits(ids, at)[mask], t[mask], y[mask], loss, keep, kl_clip, loss_temperature)
            if pw is None:
                part = per.sum() / n_kept
            else:
                w = position_weight(np.flatnonzero(kept_here), len(y), *pw)
                part = (per * torch.from_numpy(w).to(per)).sum() / (len(y) * n_seqs)
            part.backward()
        total += part.item()
    optimizer.step()
    return {"loss": total, "kept": n_kept, "positions": len(sample), "mean_fkl": float(flat["fkl"].mean())}


STEP_CASES = {  # loss, select, options: each path of train_step (at once or two passes, cached or re-run teacher)
    "sampled_token, teachability": ("sampled_token", "teachability", {}),
    "sampled_token, all, keep": ("sampled_token", "all", {"keep": "drop"}),
    "sampled_token, position, keep, pw": ("sampled_token", "position", {"keep": "drop", "pw": (0.25, 0.3, 0.1)}),
    "reverse_kl, teachability": ("reverse_kl", "teachability", {}),
    "reverse_kl, entropy, paper_text, full": ("reverse_kl", "entropy", {"select_rule": "paper_text",
                                                                          "select_signals": "full"}),
    "clipped_fkl, all, pw": ("clipped_fkl", "all", {"pw": (0.25, 0.3, 0.1), "loss_temperature": 1.1}),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_train_step_equals_the_whole_batch_logits_algorithm_bit_for_bit(tmp_path, pair, monkeypatch, case):
    """Three AdamW steps of train_step (one context's teacher logits alive at a time) and of the
    reference that holds the batch's: the same log rows and the same weights and AdamW moments, to
    the last bit. And no teacher forward while another context's logits are still alive, with one
    teacher forward a context where the loss allows it (sampled_token, or --select all), two else."""
    import weakref

    import teachdiag.training as training

    loss, select, options = STEP_CASES[case]
    options = dict(options)
    ctxs = load_contexts(write_contexts(tmp_path / "c.jsonl", n=6))
    if options.get("keep"):  # ids 5 and 7 "disagree" between the tokenizers; context 1 samples only them
        ctxs[1].response_ids = [5, 7, 5, 5]
        keep = torch.ones(VOCAB, dtype=torch.bool)
        keep[[5, 7]] = False
        options["keep"] = keep
    teacher = load(pair[0])
    models = [load(pair[1]), load(pair[1])]
    opts = [make_optimizer(m, TrainConfig(lr=1e-3)) for m in models]
    alive, forwards = [], [0]
    real = training.teacher_logits

    def watched(*a, **k):
        assert all(r() is None for r in alive), "a context's teacher logits outlived it"
        forwards[0] += 1
        t = real(*a, **k)
        alive.append(weakref.ref(t))
        return t

    monkeypatch.setattr(training, "teacher_logits", watched)
    import teachdiag.probe.signals as signals
    # two rows a chunk: responses of 4 to 7 tokens score in several chunks of signals' float64 passes
    monkeypatch.setattr(signals, "CHUNK_BYTES", 2 * signals.LIVE * 8 * VOCAB)
    for step, batch in enumerate(([0, 1, 2], [3, 4, 5], [1, 3, 5])):
        forwards[0] = 0
        kw = dict(loss=loss, select=select, budget=0.25, top_k=16, device="cpu", seed=step, **options)
        got = train_step(models[0], teacher, ctxs, batch, VOCAB, optimizer=opts[0], **kw)
        want = reference_train_step(models[1], teacher, ctxs, batch, VOCAB, optimizer=opts[1], **kw)
        assert got == want, step
        assert forwards[0] == (3 if loss == "sampled_token" or select == "all" else 6), forwards[0]
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), name
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opts[0].state[p][k], opts[1].state[q][k]), (name, k)


def test_ta_opd_mask_on_trainer_style_tensors():
    torch.manual_seed(0)
    s, t = torch.randn(3, 7, 40) * 3, torch.randn(3, 7, 40) * 3
    mask = torch.ones(3, 7)
    mask[1, 4:] = 0  # a shorter response
    # teachdiag ≤ 0.2's mask (the paper-text rule on full-distribution signals), kept for its runs
    keep = ta_opd_mask(s, t, mask, budget=0.2, selector="teachability", k=4, rule="paper_text", signals="full")
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
    want = paper_text_keep(norm(d) * norm(c), mask.nonzero()[:, 0].numpy(), 0.2)
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


def test_paper_text_budget_is_the_paper_protocols_round():
    scores = np.arange(150.0)
    for rho in (0.01, 0.03, 0.05, 0.07, 0.1):  # 0.07 · 150 = 10.500000000000002: 10, not 11
        keep = paper_text_keep(scores, np.zeros(150, int), rho)
        assert keep.sum() == budget_count(150, rho, "round") == round(round(rho * 150, 9))


def hand_weight(t, length, w_min=0.25, tau=0.30, scale=0.10):
    return w_min + (1 - w_min) / (1 + math.exp(-((t + 0.5) / length - tau) / scale))


@pytest.mark.parametrize("case", ["clipped_fkl, all", "sampled_token, position, keep", "w = 1"])
def test_position_weighted_step_equals_the_hand_built_loss(tmp_path, pair, case):
    """One SGD step with pw on: loss (1/B') Σ_b Σ_t w_t ℓ_t m_t / L_b, its gradient and the update."""
    ctxs = load_contexts(write_contexts(tmp_path / "c.jsonl", n=4))
    teacher, student = load(pair[0]), load(pair[1])
    loss, select, pw, keep, temperature = {
        "clipped_fkl, all": ("clipped_fkl", "all", (0.25, 0.3, 0.1), None, 1.1),
        "sampled_token, position, keep": ("sampled_token", "position", (0.25, 0.3, 0.1), "drop 5", 1.0),
        "w = 1": ("reverse_kl", "all", (1.0, 0.3, 0.1), None, 1.0)}[case]
    if keep:  # context 1 samples only id 5, which the tokenizers "disagree" on: no kept position, B' = 3
        ctxs[1].response_ids = [5] * 5
        keep = torch.ones(VOCAB, dtype=torch.bool)
        keep[5] = False
    ref = copy.deepcopy(student)
    student.requires_grad_(True)
    opt = torch.optim.SGD(student.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in student.parameters()]
    row = train_step(student, teacher, ctxs, [0, 1, 2, 3], VOCAB, loss=loss, select=select, budget=0.3, top_k=16,
                     optimizer=opt, device="cpu", keep=keep, loss_temperature=temperature, pw=pw)
    # the mask by hand: `position` keeps each response's last token, then the largest (t + 0.5)/L
    n = [len(c.response_ids) for c in ctxs]
    if select == "all":
        kept = np.ones(sum(n), bool)
    else:  # the released rule: budget and ranking among the trainable rows (a token outside keep is not);
        # its budget stage already gives every sample with a trainable row a row here, so no fill
        rows = [{"sample": b, "pos": j, "valid": int(keep is None or c.response_ids[j] != 5), "H": 0.0, "D": 0.0,
                 "C": 0.0, "position": (j + 0.5) / k} for b, (c, k) in enumerate(zip(ctxs, n)) for j in range(k)]
        kept = np.array(ref_keep(rows, "position", 0.3, min_keep=0), bool)
        trainable = np.split(np.array([r["valid"] for r in rows], bool), np.cumsum(n)[:-1])
        assert all(m.any() for m, v in zip(np.split(kept, np.cumsum(n)[:-1]), trainable) if v.any())
    if keep is not None:
        kept &= np.concatenate([[y != 5 for y in c.response_ids] for c in ctxs])
    kept = np.split(kept, np.cumsum(n)[:-1])
    b_prime = sum(k.any() for k in kept)
    assert row["kept"] == sum(int(k.sum()) for k in kept) and b_prime == (3 if keep is not None else 4)
    params = list(ref.parameters())
    for p in params:
        p.requires_grad_(True)
    total = 0
    for c, k, length in zip(ctxs, kept, n):
        w = torch.tensor([hand_weight(t, length, *pw) for t in range(length)], dtype=torch.float64)
        per = hand_loss(ref, teacher, c, loss, keep=keep, temperature=temperature)
        total = total + (w * per)[torch.from_numpy(k)].sum() / length
    total = total / b_prime
    assert row["loss"] == pytest.approx(total.item(), rel=1e-5)
    grads = torch.autograd.grad(total, params)
    for (name, q), p0, g in zip(student.named_parameters(), before, grads):
        torch.testing.assert_close(q.grad, g.float(), rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(q.detach(), p0 - 1e-2 * q.grad, msg=name)  # the step took that gradient
    if case == "w = 1":  # the plain per-sequence mean of ℓ, which differs from the token mean
        per = [hand_loss(ref, teacher, c, loss).detach() for c in ctxs]
        assert row["loss"] == pytest.approx(np.mean([float(x.mean()) for x in per]), rel=1e-5)
        assert row["loss"] != pytest.approx(float(torch.cat(per).mean()), rel=1e-3)


def test_position_selector_keeps_the_latest_positions():
    # responses of 4 and 10 tokens: each one's last token first, then the largest (t + 0.5)/L
    signals = {"fkl": np.zeros(14), "position": np.r_[np.arange(4), np.arange(10)],
               "response_length": np.r_[np.full(4, 4), np.full(10, 10)]}
    sample = np.r_[np.zeros(4, int), np.ones(10, int)]
    signals["sample"] = sample
    keep = keep_positions(signals, "position", 5 / 14)  # 5 kept
    # the rest after 3 and 13: 12 (0.85), 11 (0.75), then 10 (0.65) beats t = 2 of 4 (0.625)
    assert keep.nonzero()[0].tolist() == [3, 10, 11, 12, 13]
    # the TA-OPD mask on a right- and a left-padded row: the end of each response, whatever the padding
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]])
    s = torch.randn(2, 8, 12)
    got = ta_opd_mask(s, s.clone(), mask, budget=0.4, selector="position", k=4)  # ceil(0.4 · 11) = 5
    assert got.nonzero().tolist() == [[0, 3], [0, 4], [0, 5], [1, 6], [1, 7]]


def test_train_cli_pw_opsd_runs_records_its_options_and_refuses_what_it_would_ignore(tmp_path, pair, capsys):
    contexts = write_contexts(tmp_path / "c.jsonl", n=4)
    args = ["train", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts), "--device", "cpu",
            "--quiet", "--lr", "3e-3", "--batch", "4", "--steps", "2"]
    pw = ["--loss", "clipped_fkl", "--position-weight", "--loss-temperature", "1.1", "--pw-min", "0.5"]
    assert main([*args, *pw, "--out", str(tmp_path / "a")]) == 0
    log = np.genfromtxt(tmp_path / "a" / "train_log.csv", delimiter=",", names=True)
    assert np.isfinite(log["loss"]).all() and (log["kept"] == log["positions"]).all()
    options = json.loads((tmp_path / "a" / "train.json").read_text())["options"]
    assert options["loss"] == "clipped_fkl" and options["position_weight"] is True
    assert (options["kl_clip"], options["loss_temperature"], options["pw_min"]) == (0.05, 1.1, 0.5)
    assert load(tmp_path / "a" / "model") is not None
    assert main([*args, "--position-weight", "--select", "position", "--budget", "0.3",
                 "--out", str(tmp_path / "b")]) == 0
    # a run saved before these options existed resumes (they take their defaults)
    assert main([*args, "--out", str(tmp_path / "old")]) == 0
    saved = tmp_path / "old" / "model" / "train_state" / "train.json"  # the record resume reads
    record = json.loads(saved.read_text())
    for name in ("kl_clip", "loss_temperature", "position_weight", "pw_min", "pw_tau", "pw_scale"):
        del record["options"][name]
    saved.write_text(json.dumps(record))
    assert main([*args[:-1], "3", "--out", str(tmp_path / "old"), "--resume"]) == 0
    capsys.readouterr()
    for bad in (["--kl-clip", "0.1"], ["--loss-temperature", "1.1"],  # sampled_token ignores them
                ["--pw-tau", "0.5"],  # no --position-weight
                [*pw, "--pw-min", "1.5"], [*pw, "--pw-scale", "-1"], [*pw, "--kl-clip", "0"]):
        assert main([*args, *bad, "--out", str(tmp_path / "bad")]) == 2, bad
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("teachdiag: error:"), err
    assert not (tmp_path / "bad").exists()  # refused before anything was written


class Kill(BaseException):
    """A kill -9 at an injected point: nothing after it runs (not an Exception, so nothing catches it)."""


@pytest.mark.parametrize("save_dtype", ["auto", "bfloat16"])
def test_a_kill_at_any_point_of_a_save_resumes_to_the_uninterrupted_weights(tmp_path, pair, monkeypatch, save_dtype):
    """#21.1: weights, optimizer state and step are one set. Kill the second of three saves before each
    of its renames (and while it writes), resume: the final weights and log equal one uninterrupted run.
    With a bf16 model/ the set also holds the float32 weights, which resume reads: the same float32
    weights at the end as the uninterrupted run, not the rounded ones."""
    import os

    import teachdiag.commands.train as train
    import teachdiag.training as training

    contexts = write_contexts(tmp_path / "c.jsonl", n=4)

    def run(out, resume=False):
        return train.run_train(TrainConfig(teacher=pair[0], student=pair[1], contexts=str(contexts), device="cpu",
                                           quiet=True, loss="reverse_kl", lr=3e-3, batch=2, steps=6, out=str(out),
                                           resume=resume, save_every=2, save_dtype=save_dtype))

    def weights(out):  # the float32 weights the run ended with: the master beside a bf16 model/
        model = load(out / "model")
        assert training.load_master(model, out / "model") == (save_dtype == "bfloat16")
        return model

    def log(out):  # the log without its timings
        return [line.rsplit(",", 1)[0] for line in (out / "train_log.csv").read_text().splitlines()]

    saves, renames, kill_at = [0], [0], [None]  # kill_at: (the save, the rename in it) to die before
    real_save, real_replace, real_save_file = train.save_checkpoint, os.replace, training.save_file

    def counting_save(*a, **k):
        saves[0] += 1
        renames[0] = 0
        return real_save(*a, **k)

    def replace(*a, **k):
        renames[0] += 1
        if kill_at[0] == (saves[0], renames[0]):
            raise Kill
        return real_replace(*a, **k)

    def save_file(*a, **k):  # a kill while the optimizer state is being written
        if kill_at[0] == (saves[0], 0):
            raise Kill
        return real_save_file(*a, **k)

    monkeypatch.setattr(train, "save_checkpoint", counting_save)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(training, "save_file", save_file)
    run(tmp_path / "full")
    n_renames = renames[0]  # in the last save, as in every save after the first
    assert saves[0] == 3 and n_renames >= 2
    want = weights(tmp_path / "full")
    for k in range(n_renames + 1):
        out = tmp_path / f"killed{k}"
        saves[0], kill_at[0] = 0, (2, k)
        with pytest.raises(Kill):
            run(out)
        kill_at[0] = None
        run(out, resume=True)
        got = weights(out)
        for (name, p), q in zip(want.named_parameters(), got.parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=0, msg=f"killed before rename {k}: {name}")
        assert log(out) == log(tmp_path / "full"), k
        assert json.loads((out / "train.json").read_text())["steps_done"] == 6
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "full").iterdir())


def test_resume_never_unpickles_a_weights_file_planted_in_the_folder(tmp_path, pair, monkeypatch, capsys):
    """#21.2: model/ with a booby-trapped pytorch_model.bin instead of safetensors is refused in one
    line; nothing is unpickled (not even by torch.load(weights_only=True), which would only stop it late)."""
    import pickle
    from pathlib import Path

    contexts = write_contexts(tmp_path / "c.jsonl", n=4)
    out = tmp_path / "a"
    args = ["train", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts), "--device", "cpu",
            "--quiet", "--lr", "1e-3", "--batch", "2", "--out", str(out)]
    assert main([*args, "--steps", "2"]) == 0
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for f in (out / "model").glob("*.safetensors"):
        f.unlink()
    (out / "model" / "pytorch_model.bin").write_bytes(pickle.dumps({"lm_head.weight": Trap()}))
    loads = []

    def no_load(*a, **k):
        loads.append(a)
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_load)
    capsys.readouterr()
    assert main([*args, "--steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("teachdiag: error:") and "Traceback" not in err, err
    assert "pytorch_model.bin is pickled and never loaded" in err and "--resume" in err
    assert not loads and not marker.exists()


def test_resume_without_a_complete_saved_step_is_refused_not_restarted(tmp_path, pair, capsys):
    """--resume on a folder whose saved set is damaged must not quietly train from step 0 (and so
    overwrite what the user asked to continue); --overwrite starts again and clears a 0.2 folder's state."""
    contexts = write_contexts(tmp_path / "c.jsonl", n=2)
    args = ["train", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts), "--device", "cpu",
            "--quiet", "--loss", "reverse_kl", "--lr", "1e-3", "--batch", "2", "--steps", "2", "--out", str(tmp_path / "a")]
    assert main(args) == 0
    (tmp_path / "a" / "model" / "train_state" / "train.json").write_text("{ torn")
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no complete saved step" in err, err
    (tmp_path / "a" / "optimizer.safetensors").write_text("")  # as a 0.2 folder has it
    assert main([*args, "--overwrite"]) == 0
    assert not (tmp_path / "a" / "optimizer.safetensors").exists()
    assert json.loads((tmp_path / "a" / "train.json").read_text())["steps_done"] == 2


def test_save_every_saves_every_n_steps_and_the_last(tmp_path, pair, monkeypatch):
    """--save-every N saves every N steps and the last; 0: the last only; negative: refused."""
    import teachdiag.commands.train as train

    contexts = write_contexts(tmp_path / "c.jsonl", n=4)
    saved = []
    real_save = train.save_checkpoint

    def counting_save(out, student, tok, optimizer, record, *a):
        saved.append(record["steps_done"])
        return real_save(out, student, tok, optimizer, record, *a)

    monkeypatch.setattr(train, "save_checkpoint", counting_save)
    args = ["train", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts), "--device", "cpu",
            "--quiet", "--lr", "1e-3", "--batch", "2", "--steps", "5"]
    for every, want in (("2", [2, 4, 5]), ("0", [5]), ("1", [1, 2, 3, 4, 5])):
        saved.clear()
        assert main([*args, "--save-every", every, "--out", str(tmp_path / f"every{every}")]) == 0
        assert saved == want, every
    assert main([*args, "--save-every", "-1", "--out", str(tmp_path / "bad")]) == 2


def test_a_bf16_model_folder_keeps_its_float32_weights_beside_for_resume(tmp_path, pair):
    """--save-dtype bfloat16: model/ in bf16 (tied weights once, its config saying so, loadable as θτ
    in float32), the float32 weights in train_state/, which model/'s round; the default (float32)
    keeps no second copy."""
    from safetensors import safe_open

    from teachdiag.provenance import weights_summary
    from teachdiag.training import checkpoint_bytes, load_master

    _, student = save_pair(tmp_path / "p", student_tied=True)  # lm_head and the embedding: one tensor
    contexts = write_contexts(tmp_path / "c.jsonl", n=4)
    args = ["train", "--teacher", pair[0], "--student", student, "--contexts", str(contexts), "--device", "cpu",
            "--quiet", "--lr", "1e-3", "--batch", "2", "--steps", "2"]
    assert main([*args, "--out", str(tmp_path / "f32")]) == 0
    assert not (tmp_path / "f32" / "model" / "train_state" / "weights.safetensors").exists()
    assert weights_summary(str(tmp_path / "f32" / "model"))["source_dtype"] == "float32"
    assert json.loads((tmp_path / "f32" / "train.json").read_text())["save_dtype"] == "float32"  # auto

    out = tmp_path / "bf16"
    assert main([*args, "--save-dtype", "bfloat16", "--out", str(out)]) == 0
    n_params = sum(p.numel() for p in load(student).parameters())  # the tied tensor once
    assert weights_summary(str(out / "model"))["source_dtypes"] == {"bfloat16": n_params}
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "train.json").read_text())["save_dtype"] == "bfloat16"
    rounded, master = load(out / "model"), load(out / "model")  # as probe --student-after loads it: float32
    assert load_master(master, out / "model")
    assert rounded.lm_head.weight is rounded.model.embed_tokens.weight
    off_grid = 0
    for (name, r), m in zip(rounded.named_parameters(), master.parameters()):
        assert torch.equal(r, m.to(torch.bfloat16).float()), name
        off_grid += int((r != m).sum())
    assert off_grid > n_params / 2  # the trained weights are not bf16 numbers: --resume needs the copy
    with safe_open(out / "model" / "train_state" / "weights.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    set_bytes = sum(f.stat().st_size for f in (out / "model").rglob("*.safetensors"))
    assert abs(set_bytes - checkpoint_bytes(master, torch.bfloat16)) < 0.05 * set_bytes  # headers aside


def test_a_disk_without_room_for_two_sets_is_refused_before_the_first_step(tmp_path, pair, monkeypatch, capsys):
    """A save writes the next set beside the last: a disk that cannot hold two is refused in one line
    before any step is spent, not at the second save."""
    import shutil
    from types import SimpleNamespace

    import teachdiag.commands.train as train

    contexts = write_contexts(tmp_path / "c.jsonl", n=4)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**12, used=10**12, free=1000))
    steps = []
    monkeypatch.setattr(train, "train_step", lambda *a, **k: steps.append(1))
    capsys.readouterr()
    assert main(["train", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts), "--device", "cpu",
                 "--quiet", "--batch", "2", "--steps", "2", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GB free needed for the checkpoints" in err, err
    assert not steps


def test_train_json_is_the_run_record(tmp_path, pair, monkeypatch):
    """train.json says what is training (both models' weight hashes, as every run record) from before
    the first step, "complete": false until the last step is saved; a run killed before its first
    save has saved nothing, and --resume starts it rather than refusing the folder."""
    import teachdiag.commands.train as train
    from teachdiag.provenance import weights_summary

    contexts = write_contexts(tmp_path / "c.jsonl", n=2)
    out = tmp_path / "a"
    args = ["train", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts), "--device", "cpu",
            "--quiet", "--lr", "1e-3", "--batch", "2", "--steps", "2", "--save-every", "1", "--out", str(out)]
    real_step, seen, kill = train.train_step, [], [True]

    def step(*a, **k):  # the record a reader sees at each step
        rec = json.loads((out / "train.json").read_text())
        seen.append((rec["steps_done"], rec["complete"]))
        if kill[0]:
            raise Kill
        return real_step(*a, **k)

    monkeypatch.setattr(train, "train_step", step)
    with pytest.raises(Kill):
        main(args)
    rec = json.loads((out / "train.json").read_text())
    assert seen == [(0, False)] and rec["complete"] is False and not (out / "model").exists()
    assert rec["student"]["weights_sha256"] == weights_summary(pair[1])["sha256"] is not None
    assert rec["teacher"]["weights_sha256"] == weights_summary(pair[0])["sha256"] is not None
    seen.clear()
    kill[0] = False
    assert main([*args, "--resume"]) == 0
    rec = json.loads((out / "train.json").read_text())
    assert seen == [(0, False), (1, False)] and rec["complete"] is True and rec["steps_done"] == 2
    saved = json.loads((out / "model" / "train_state" / "train.json").read_text())
    assert saved == {k: v for k, v in rec.items() if k != "complete"}  # the set's record, of those weights
