"""TA-OPD for slime: a reward post-process hook that sets each sample's loss_mask to the positions
the selector keeps, from the top-K log-probabilities of the SGLang teacher and of the student.

    # slime's train.py, OPD with an SGLang teacher, the teacher asked for its top-K:
    #   --custom-rm-path teachdiag.integrations.slime.reward_func
    #   --custom-reward-post-process-path teachdiag.integrations.slime.post_process_rewards
    #   --calculate-per-token-loss     (else slime averages per sample first: see "Normalisation")
    # other settings: a module of your own holding both, made from one Selection
    from teachdiag.integrations.slime import Selection, make_post_process, make_reward_func
    selection = Selection(selector="teachability", budget=0.05, top_k=16, signals="topk_lb")
    reward_func, post_process_rewards = make_reward_func(selection), make_post_process(selection)

What slime hands over, as read in THUDM/slime for this module (no slime is imported here):
- slime.utils.types.Sample: tokens (prompt + response ids), response_length, loss_mask (a list of
  response_length ints, 1 = trained on, or None = all), reward (for OPD: the teacher server's JSON
  reply, returned by the reward function), metadata (a dict), teacher_log_probs, remove_sample.
- slime.ray.rollout.RolloutManager._post_process_rewards calls the hook named by
  --custom-reward-post-process-path as hook(args, samples) with every sample of the rollout batch
  and takes (raw_rewards, rewards) back; convert_samples_to_train_data then reads each
  sample.loss_mask (None: all ones; remove_sample: all zeros) into train_data["loss_masks"], which
  the loss uses as its mask.
- slime.rollout.on_policy_distillation: reward_func posts {"input_ids": sample.tokens,
  "return_logprob": True, "logprob_start_len": 0, "sampling_params": {"max_new_tokens": 0, ...}} to
  args.rm_url; post_process_rewards sets sample.teacher_log_probs to the last response_length
  entries of meta_info["input_token_logprobs"][1:] (entry i: [logprob, token id, text] of token i;
  the first token has none) and returns rewards of 0.0: the OPD signal is the KL term.
- SGLang's /generate: "top_logprobs_num": K adds meta_info["input_top_logprobs"], per input position
  the K best [logprob, token id, text] (None at the first position), and "token_ids_logprob": ids adds
  meta_info["input_token_ids_logprobs"], the same entries for those ids at every position.
- Normalisation (slime/backends/megatron_utils/cp_utils.get_sum_of_sample_mean): by default slime's
  loss is a sum of per-sample means, each sample's masked sum divided by its own loss_mask count,
  so a sample with 1 kept position weighs as much as one with 40. Only with
  --calculate-per-token-loss is it a sum over tokens that Megatron divides by the batch's loss-token
  count: the TA-OPD loss normalised by the kept count. The hook warns once when
  args.calculate_per_token_loss is False.

This hook does what slime's OPD post-process does (teacher_log_probs, rewards 0.0), and sets
loss_mask: the teacher's top-K lists come from reward["meta_info"]["input_top_logprobs"] (ask for
them with make_reward_func's reward function, or add "top_logprobs_num" to your own payload); the
student's from sample.metadata["student_top_logprobs"], one entry per response token in SGLang's
output_top_logprobs format (a custom generate function that asks the rollout engine for
"top_logprobs_num": K stores meta_info["output_top_logprobs"] there). Both must hold at least
Selection.top_k entries per position (fewer is refused: the lists were asked for a smaller K).
H, D, C are probe/topk.served_signals of those lists. C comes two ways (Selection.signals):
- "topk_lb", the default here: the teacher's mass at the student's ids found in the teacher's own
  list, a lower bound on C (the released code without exact C). Costs nothing beyond the top-K.
- "topk", C exact: the teacher is also asked at every id the student returned (reward_func sends
  "token_ids_logprob"). SGLang takes one id list per request and answers it at every input position,
  so the reply holds L × |ids| entries, L = prompt + response tokens and |ids| the distinct ids of
  the student's top-K over the whole response (up to R·K): for a 4k-token response at K = 16,
  10^7–10^8 [logprob, id, text] entries of JSON per sample. Use it on short responses only. A reply
  without them falls back to the lower bound.
Selection runs over the whole rollout batch (integrations/select.py); rows the sample's loss_mask
already excludes (tool output) are never kept but are normalised over, and a removed sample keeps
nothing.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from teachdiag.errors import InputError
from teachdiag.integrations.select import Selection, selection_stats
from teachdiag.probe.topk import served_signals

__all__ = ["Selection", "make_post_process", "make_reward_func", "post_process_rewards", "reward_func",
           "teacher_payload"]

# the module's hooks: C as a lower bound, which needs nothing beyond the top-K lists (module docstring)
DEFAULT = Selection(signals="topk_lb")


def teacher_payload(sample, k: int, exact: bool = False) -> dict:
    """The SGLang /generate request of slime's OPD reward_func, plus the teacher's top-K
    ("top_logprobs_num"); exact=True and a sample carrying the student's lists also asks for the
    teacher's log-probabilities at every id the student returned ("token_ids_logprob", C exact, at
    the cost the module docstring states)."""
    payload = {"input_ids": list(sample.tokens), "return_logprob": True, "logprob_start_len": 0,
               "top_logprobs_num": k,
               "sampling_params": {"temperature": 0, "max_new_tokens": 0, "skip_special_tokens": False}}
    student = (getattr(sample, "metadata", None) or {}).get("student_top_logprobs")
    if exact and student:
        payload["token_ids_logprob"] = sorted({int(e[1]) for entry in student if entry for e in entry})
    return payload


def make_reward_func(selection: Selection | None = None):
    """A reward function for --custom-rm-path that asks the teacher for what `selection` reads: its
    top selection.top_k, and the student's ids too when selection.signals is "topk". It posts
    teacher_payload to args.rm_url (the SGLang teacher) and returns the JSON reply, as slime's OPD
    reward_func does."""
    sel = selection or DEFAULT

    async def reward_func(args, sample, **kwargs) -> dict:
        import aiohttp  # slime's own dependency

        payload = teacher_payload(sample, sel.top_k, exact=sel.signals == "topk")
        async with aiohttp.ClientSession() as session:
            async with session.post(args.rm_url, json=payload) as resp:
                resp.raise_for_status()
                return await resp.json()

    return reward_func


def top_lists(entries: list, k: int, field: str = "top-K lists") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (R, k) long, logprobs (R, k) float64) from R positions of SGLang [logprob, id, ...]
    entries, best first. A position with fewer than k entries is refused (InputError on `field`):
    the lists were asked for a smaller K than the selection reads."""
    n = min((sum(e[0] is not None for e in entry or ()) for entry in entries), default=k)
    if n < k:
        raise InputError(f"holds {n} log-probabilities at a position, fewer than Selection.top_k = {k}: ask "
                         f"for top_logprobs_num >= {k} (make_reward_func(selection) does)", field=field)
    ids = torch.zeros((len(entries), k), dtype=torch.long)
    logp = torch.full((len(entries), k), -math.inf, dtype=torch.float64)
    for i, entry in enumerate(entries):
        best = sorted((e for e in entry or () if e[0] is not None), key=lambda e: -e[0])[:k]
        for j, e in enumerate(best):
            logp[i, j], ids[i, j] = float(e[0]), int(e[1])
    return ids, logp


def teacher_at(entries: list, s_ids: torch.Tensor) -> torch.Tensor:
    """(R, k) float64: the teacher's log-probability at each of the student's ids, from SGLang's
    input_token_ids_logprobs entries (R positions); -inf where the teacher was not asked."""
    out = torch.full(s_ids.shape, -math.inf, dtype=torch.float64)
    for i, entry in enumerate(entries):
        got = {int(e[1]): float(e[0]) for e in entry or () if e[0] is not None}
        for j, v in enumerate(s_ids[i].tolist()):
            out[i, j] = got.get(v, -math.inf)
    return out


def teacher_reply(args, sample) -> dict:
    """The teacher server's reply the reward function stored: sample.reward, or its args.reward_key
    entry (slime's Sample.get_reward_value)."""
    key = getattr(args, "reward_key", None)
    reply = sample.reward[key] if key else sample.reward
    if not isinstance(reply, dict) or "meta_info" not in reply:
        raise InputError("holds no teacher reply (a dict with meta_info): use an OPD reward function",
                         field="Sample.reward")
    return reply


def sample_signals(meta: dict, sample, k: int, exact: bool) -> dict[str, np.ndarray]:
    """(R,) topk_entropy, union_fkl, compat_mass of one sample's R response tokens (module docstring);
    meta: the teacher reply's meta_info."""
    r = sample.response_length
    student = (sample.metadata or {}).get("student_top_logprobs")
    teacher = meta.get("input_top_logprobs")
    student_field, teacher_field = "Sample.metadata['student_top_logprobs']", "Sample.reward['meta_info']"
    if student is None or len(student) != r:
        raise InputError(f"needs the student's top-K log-probabilities of its {r} response tokens in "
                         "metadata['student_top_logprobs']", field="Sample.metadata")
    if teacher is None or len(teacher) < r:
        raise InputError("needs the teacher's top-K log-probabilities in input_top_logprobs (ask SGLang with "
                         "top_logprobs_num; make_reward_func's reward function does)", field=teacher_field)
    s_ids, s_lp = top_lists(student, k, student_field)  # (R, k): entry j predicts response token j
    t_ids, t_lp = top_lists(teacher[-r:], k, teacher_field)  # the last R input positions predict the response
    at_s = meta.get("input_token_ids_logprobs")
    t_at_s = teacher_at(at_s[-r:], s_ids) if exact and at_s is not None and len(at_s) >= r else None
    return {name: v.numpy() for name, v in served_signals(s_ids, s_lp, t_ids, t_lp, t_at_s).items()}


def teacher_log_probs(meta: dict, response_length: int) -> torch.Tensor:
    """slime's OPD: the teacher's log-probabilities of the response tokens, float32 (R,)."""
    entries = meta["input_token_logprobs"][1:]  # the first token has none
    return torch.tensor([e[0] for e in entries], dtype=torch.float32)[-response_length:]


def make_post_process(selection: Selection | None = None):
    """A post-process hook hook(args, samples) -> (raw_rewards, rewards) for slime with these
    settings (module docstring). hook.log: one dict per rollout batch (kept, positions, ...)."""
    sel = selection or DEFAULT
    if sel.signals == "full":
        raise InputError("slime's teacher gives top-K lists, not full distributions: use topk or topk_lb",
                         field="signals")

    def hook(args, samples):
        if getattr(args, "calculate_per_token_loss", None) is False and not hook.warned:
            hook.warned = True
            warnings.warn("slime averages each sample's loss over its own kept positions before summing "
                          "samples, so a sample with 1 kept position weighs as much as one with 40; pass "
                          "--calculate-per-token-loss for the loss normalised by the batch's kept count",
                          stacklevel=2)
        while samples and isinstance(samples[0], list):  # slime may pass list[list[Sample]]
            samples = [s for group in samples for s in group]
        sigs, valid = [], []
        for b, sample in enumerate(samples):
            meta = teacher_reply(args, sample)["meta_info"]
            sample.teacher_log_probs = teacher_log_probs(meta, sample.response_length)
            sig = sample_signals(meta, sample, sel.top_k, exact=sel.signals == "topk")
            r = sample.response_length
            sig |= {"sample": np.full(r, b), "position": np.arange(r), "response_length": np.full(r, r)}
            sigs.append(sig)
            mask = np.ones(r, bool) if sample.loss_mask is None else np.asarray(sample.loss_mask, bool)
            valid.append(mask & (not getattr(sample, "remove_sample", False)))
        sig = {name: np.concatenate([s[name] for s in sigs]) for name in sigs[0]} if sigs else {}
        ok = np.concatenate(valid) if valid else np.zeros(0, bool)
        keep = sel.keep(sig, ok) if sigs else ok
        stats = selection_stats(sig, keep, ok, sel) if sigs else {}
        hook.log.append(stats)
        start = 0
        for sample in samples:  # each sample's rows, in order
            r = sample.response_length
            sample.loss_mask = keep[start : start + r].astype(int).tolist()
            sample.metadata = {**(sample.metadata or {}), "ta_opd_kept": int(keep[start : start + r].sum())}
            start += r
        rewards = [0.0] * len(samples)  # OPD: the learning signal is the KL term, as in slime's hook
        return rewards, rewards

    hook.log, hook.warned = [], False
    return hook


# the defaults: teachability, ρ = 0.05, K = 16, C from the top-K lists alone (a lower bound)
reward_func = make_reward_func(DEFAULT)
post_process_rewards = make_post_process(DEFAULT)
