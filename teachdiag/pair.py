"""The teacher/student pair, opened one way by every command that loads both (probe, calibrate,
train, viability).

    from teachdiag.pair import open_pair, read_inputs
    inputs = read_inputs(cfg)            # contexts as ids + tokenizers: cheap, checked before models load
    pair = open_pair(cfg, device, inputs)
    pair.teacher, pair.student           # teacher in cfg.dtype, student in float32, both on device
    pair.contexts, pair.tokenizer, pair.match, pair.vocab, pair.keep
    record = pair.header("probe", argv, asdict(cfg))   # run.json's opening fields, weight hashes included

`cfg` is any command config with PairOptions and ContextOptions fields (config.py). Splitting
read_inputs from open_pair lets a command refuse a bad --out or a record without an answer
before it spends minutes loading weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from teachdiag.contexts import Context
from teachdiag.models import load_inputs, load_models
from teachdiag.probe.signals import keep_mask
from teachdiag.provenance import run_header
from teachdiag.tokenizers import TokenizerMatch

Inputs = tuple[list[Context], object, TokenizerMatch]  # (contexts, student tokenizer, tokenizer match)


def read_inputs(cfg) -> Inputs:
    """The contexts as token ids, the student's tokenizer and how the teacher's matches it
    (models.load_inputs: refuses a pair whose regular vocabularies differ)."""
    return load_inputs(cfg)


@dataclass
class Pair:
    teacher: torch.nn.Module
    student: torch.nn.Module
    contexts: list[Context]
    tokenizer: object  # the student's
    match: TokenizerMatch
    keep: torch.Tensor | None  # bool (vocab,): ids both tokenizers agree on; None when they are identical
    device: torch.device
    cfg: object

    @property
    def vocab(self) -> int:
        """The longer tokenizer's size: every id of either is below it (logits are cut there)."""
        return self.match.vocab

    def header(self, command: str, argv: list[str] | None, options: dict) -> dict:
        """The opening fields of the command's run record: command line, options, device, both models
        (path, config and weights sha256, dtype on disk), the tokenizer match and the contexts file."""
        return run_header(command, argv, options, self.device, self.cfg, self.teacher, self.student, self.match,
                          self.contexts)


def open_pair(cfg, device: torch.device, inputs: Inputs | None = None) -> Pair:
    """Load both models for `cfg` (reading the inputs first unless given) and check them against the
    tokenizers and the contexts (vocabulary rows, token ids, lengths)."""
    ctxs, tok, match = inputs if inputs is not None else read_inputs(cfg)
    teacher, student = load_models(cfg, device, ctxs, match.vocab)
    return Pair(teacher, student, ctxs, tok, match, keep_mask(match.shared_ids, match.vocab, device), device, cfg)
