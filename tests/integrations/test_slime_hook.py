"""The slime post-process hook on stand-in samples shaped like slime.utils.types.Sample, with the
teacher's reply laid out as SGLang returns it: the loss_mask it sets is ta_opd_mask's, signals
from top-K lists, C exact when the teacher was asked at the student's ids and a lower bound when not."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from teachdiag.errors import InputError
from teachdiag.integrations.slime import Selection, make_post_process, post_process_rewards, teacher_payload
from teachdiag.selectors import ta_opd_mask

V, K = 40, 4
PROMPTS, RESPONSES = (3, 5, 4), (6, 3, 7)


@dataclass
class Sample:  # the attributes slime's Sample has and the hook uses
    tokens: list
    response_length: int
    loss_mask: list | None = None
    reward: dict | None = None
    metadata: dict = field(default_factory=dict)
    teacher_log_probs: object = None
    remove_sample: bool = False


def entries(logp: torch.Tensor, ids) -> list:
    """SGLang's [logprob, token id, text] entries of one position."""
    return [[float(logp[i]), int(i), None] for i in ids]


def make_batch(seed: int = 0, exact: bool = True):
    """Samples with the student's and the teacher's top-K lists, and the (B, T, V) logits they came from."""
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.zeros(len(RESPONSES), max(RESPONSES), V)
    t_logits = torch.zeros_like(s_logits)
    response = torch.zeros(s_logits.shape[:2], dtype=torch.bool)
    samples = []
    for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        s_logits[b, :r] = 3 * torch.randn(r, V, generator=g)
        t_logits[b, :r] = 3 * torch.randn(r, V, generator=g)
        response[b, :r] = True
        tokens = torch.randint(0, V, (p + r,), generator=g).tolist()
        ls, lt = F.log_softmax(s_logits[b, :r].double(), -1), F.log_softmax(t_logits[b, :r].double(), -1)
        student = [entries(ls[j], ls[j].topk(K).indices) for j in range(r)]
        # input positions 0 .. p + r − 1; the last r predict the response, the first has no log-probability
        top = [None] + [entries(torch.zeros(V), range(K))] * (p - 1) + [entries(lt[j], lt[j].topk(K).indices)
                                                                        for j in range(r)]
        token = [[None, tokens[0], None]] + [[-1.0, t, None] for t in tokens[1:p]] + [
            [float(lt[j, tokens[p + j]]), tokens[p + j], None] for j in range(r)]
        meta = {"input_token_logprobs": token, "input_top_logprobs": top}
        if exact:  # the teacher asked at every id the student returned, at every position
            asked = sorted({e[1] for entry in student for e in entry})
            meta["input_token_ids_logprobs"] = [None] + [entries(torch.zeros(V), asked)] * (p - 1) + [
                entries(lt[j], asked) for j in range(r)]
        samples.append(Sample(tokens, r, reward={"meta_info": meta}, metadata={"student_top_logprobs": student}))
    return samples, s_logits, t_logits, response


def masks(samples) -> torch.Tensor:
    out = torch.zeros(len(samples), max(RESPONSES), dtype=torch.bool)
    for b, s in enumerate(samples):
        out[b, : s.response_length] = torch.tensor(s.loss_mask, dtype=torch.bool)
    return out


ARGS = SimpleNamespace(reward_key=None)


@pytest.mark.parametrize("selector", ["teachability", "entropy", "tip", "ca_softor", "position", "random"])
def test_loss_mask_is_ta_opd_mask_from_top_k_lists_with_exact_c(selector):
    samples, s, t, response = make_batch()
    hook = make_post_process(Selection(selector=selector, budget=0.2, top_k=K))
    raw, rewards = hook(ARGS, samples)
    assert raw == rewards == [0.0] * 3
    expected = ta_opd_mask(s, t, response, budget=0.2, selector=selector, k=K, signals="topk")
    assert torch.equal(masks(samples), expected)
    assert hook.log[-1]["kept"] == expected.sum() and hook.log[-1]["positions"] == sum(RESPONSES)
    assert [x.metadata["ta_opd_kept"] for x in samples] == expected.sum(1).tolist()


def test_without_the_teacher_at_the_student_ids_c_is_the_lower_bound():
    samples, s, t, response = make_batch(seed=1, exact=False)
    make_post_process(Selection(budget=0.2, top_k=K))(ARGS, samples)
    assert torch.equal(masks(samples), ta_opd_mask(s, t, response, budget=0.2, k=K, signals="topk_lb"))


def test_teacher_log_probs_as_slime_sets_them_and_masked_rows_stay_masked():
    samples, *_ = make_batch(seed=2)
    samples[0].loss_mask = [1, 0, 0, 1, 1, 1]  # e.g. tool output inside the response
    samples[1].remove_sample = True
    post_process_rewards(ARGS, [samples[:2], samples[2:]])  # slime may nest the batch
    p, r = PROMPTS[2], RESPONSES[2]
    want = torch.tensor([e[0] for e in samples[2].reward["meta_info"]["input_token_logprobs"][p:]])
    assert torch.equal(samples[2].teacher_log_probs, want.float()) and len(want) == r
    assert samples[0].loss_mask[1:3] == [0, 0] and samples[1].loss_mask == [0] * RESPONSES[1]
    assert all(len(x.loss_mask) == x.response_length and sum(x.loss_mask) >= (not x.remove_sample) for x in samples)


def test_reward_key_and_missing_lists():
    samples, *_ = make_batch(seed=3)
    for x in samples:
        x.reward = {"teacher": x.reward}
    post_process_rewards(SimpleNamespace(reward_key="teacher"), samples)
    samples[0].metadata = {}
    with pytest.raises(InputError, match="student_top_logprobs"):
        post_process_rewards(SimpleNamespace(reward_key="teacher"), samples)


def test_teacher_payload_asks_for_the_top_k_and_the_student_ids():
    samples, *_ = make_batch()
    payload = teacher_payload(samples[0], K)
    assert payload["input_ids"] == samples[0].tokens and payload["top_logprobs_num"] == K
    assert payload["logprob_start_len"] == 0 and payload["sampling_params"]["max_new_tokens"] == 0
    ids = {e[1] for entry in samples[0].metadata["student_top_logprobs"] for e in entry}
    assert payload["token_ids_logprob"] == sorted(ids)
    assert "token_ids_logprob" not in teacher_payload(Sample([1, 2], 1), K)
