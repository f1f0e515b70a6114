"""The slime post-process hook on stand-in samples shaped like slime.utils.types.Sample, with the
teacher's reply laid out as SGLang returns it: the loss_mask it sets is ta_opd_mask's, signals
from top-K lists, C exact when the teacher was asked at the student's ids and a lower bound when not
(the module default); lists shorter than the selection's K are refused, the reward function asks for
the selection's K, and a per-sample-mean loss is warned about once."""

from __future__ import annotations

import asyncio
import sys
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from teachdiag.errors import InputError
from teachdiag.integrations.slime import (Selection, make_post_process, make_reward_func, post_process_rewards,
                                          teacher_payload)
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


def make_batch(seed: int = 0, exact: bool = True, k: int = K):
    """Samples with the student's and the teacher's top-k lists, and the (B, T, V) logits they came from."""
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
        student = [entries(ls[j], ls[j].topk(k).indices) for j in range(r)]
        # input positions 0 .. p + r − 1; the last r predict the response, the first has no log-probability
        top = [None] + [entries(torch.zeros(V), range(k))] * (p - 1) + [entries(lt[j], lt[j].topk(k).indices)
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
    make_post_process(Selection(top_k=K))(ARGS, [samples[:2], samples[2:]])  # slime may nest the batch
    p, r = PROMPTS[2], RESPONSES[2]
    want = torch.tensor([e[0] for e in samples[2].reward["meta_info"]["input_token_logprobs"][p:]])
    assert torch.equal(samples[2].teacher_log_probs, want.float()) and len(want) == r
    assert samples[0].loss_mask[1:3] == [0, 0] and samples[1].loss_mask == [0] * RESPONSES[1]
    assert all(len(x.loss_mask) == x.response_length and sum(x.loss_mask) >= (not x.remove_sample) for x in samples)


def test_reward_key_and_missing_or_short_lists():
    samples, *_ = make_batch(seed=3)
    for x in samples:
        x.reward = {"teacher": x.reward}
    hook = make_post_process(Selection(top_k=K))
    hook(SimpleNamespace(reward_key="teacher"), samples)
    with pytest.raises(InputError, match="top_logprobs_num >= 16"):  # lists of K = 4 for a selection reading 16
        post_process_rewards(SimpleNamespace(reward_key="teacher"), samples)
    samples[0].metadata = {}
    with pytest.raises(InputError, match="student_top_logprobs"):
        hook(SimpleNamespace(reward_key="teacher"), samples)
    with pytest.raises(InputError, match="signals"):
        make_post_process(Selection(signals="full"))


def test_the_module_defaults_read_c_as_the_lower_bound():
    """post_process_rewards: K = 16 and C from the top-K lists alone, even when the reply has more."""
    samples, s, t, response = make_batch(seed=4, k=16)
    post_process_rewards(ARGS, samples)
    assert torch.equal(masks(samples), ta_opd_mask(s, t, response, budget=0.05, k=16, signals="topk_lb"))


def test_a_sample_mean_loss_is_warned_about_once():
    hook = make_post_process(Selection(top_k=K))
    for per_token in (True, None):  # set, or an args without the flag: nothing to say
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hook(SimpleNamespace(reward_key=None, calculate_per_token_loss=per_token), make_batch()[0])
    with pytest.warns(UserWarning, match="--calculate-per-token-loss"):
        hook(SimpleNamespace(reward_key=None, calculate_per_token_loss=False), make_batch()[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per hook
        hook(SimpleNamespace(reward_key=None, calculate_per_token_loss=False), make_batch()[0])


def test_teacher_payload_asks_for_the_top_k_and_for_exact_c_the_student_ids():
    samples, *_ = make_batch()
    payload = teacher_payload(samples[0], K)
    assert payload["input_ids"] == samples[0].tokens and payload["top_logprobs_num"] == K
    assert payload["logprob_start_len"] == 0 and payload["sampling_params"]["max_new_tokens"] == 0
    assert "token_ids_logprob" not in payload  # C as the lower bound: nothing beyond the top-K
    ids = {e[1] for entry in samples[0].metadata["student_top_logprobs"] for e in entry}
    assert teacher_payload(samples[0], K, exact=True)["token_ids_logprob"] == sorted(ids)
    assert "token_ids_logprob" not in teacher_payload(Sample([1, 2], 1), K, exact=True)


@pytest.mark.parametrize("signals", ["topk_lb", "topk"])
def test_the_reward_function_asks_for_what_its_selection_reads(monkeypatch, signals):
    posted = []

    class Session:  # aiohttp.ClientSession as reward_func uses it
        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        def post(self, url, json):
            posted.append((url, json))
            return Reply()

    class Reply:
        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        def raise_for_status(self):
            pass

        async def json(self):
            return {"meta_info": {}}

    monkeypatch.setitem(sys.modules, "aiohttp", SimpleNamespace(ClientSession=Session))
    samples, *_ = make_batch()
    reward_func = make_reward_func(Selection(top_k=7, signals=signals))
    assert asyncio.run(reward_func(SimpleNamespace(rm_url="http://teacher"), samples[0])) == {"meta_info": {}}
    (url, payload), = posted
    assert url == "http://teacher" and payload["top_logprobs_num"] == 7
    assert ("token_ids_logprob" in payload) == (signals == "topk")
