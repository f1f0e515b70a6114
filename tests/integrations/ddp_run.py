"""Run by test_ddp.py under torchrun (2 ranks, gloo on CPU): TAOPDDistillationTrainer with a
MonitorCallback for 3 steps; each rank writes its selection log to <root>/rank<r>.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DistillationConfig

from teachdiag.integrations.monitor import FixedBank, MonitorCallback
from teachdiag.integrations.trl import Selection, TAOPDDistillationTrainer
from trl_pair import PROMPTS, common_args

root = Path(sys.argv[1])
teacher, student = str(root / "teacher"), str(root / "student")
bank = FixedBank.load(teacher, student, str(root / "bank.jsonl"), device="cpu")
args = DistillationConfig(**common_args(root / "trl"), max_completion_length=6)
trainer = TAOPDDistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student),
                                   teacher_model=AutoModelForCausalLM.from_pretrained(teacher), args=args,
                                   train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                                   processing_class=AutoTokenizer.from_pretrained(student),
                                   selection=Selection(budget=0.3),
                                   callbacks=[MonitorCallback(bank, root / "run", every=1)])
trainer.train()
# a file per rank: two ranks printing to one pipe can run their lines together
(root / f"rank{os.environ['RANK']}.json").write_text(json.dumps({
    "rank": int(os.environ["RANK"]), "processes": trainer.accelerator.num_processes, "log": trainer.selection_log}))
# tear gloo down explicitly, both ranks done first: left to interpreter exit, a rank could abort in
# its gloo threads' destructors ("terminate called without an active exception", SIGABRT)
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
