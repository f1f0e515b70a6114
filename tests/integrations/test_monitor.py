"""The live fixed-bank monitor: a check's tokens.csv equals a stand-alone `teachdiag probe
--student-after` of the same weights, the trajectory grows a row per check and is drawn, `teachdiag
analyze` reads it, and the TrainerCallback does the same inside a real TRL run."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import teachdiag
from conftest import write_contexts
from teachdiag.analysis.trajectory import COLUMNS, TRAJECTORY
from teachdiag.errors import InputError
from teachdiag.integrations.monitor import FixedBank, MonitorCallback, monitor_step
from teachdiag.models import load_model
from teachdiag.table import TEXT_COLUMNS, TOKENS, read_tokens


def trained(student_dir: str, seed: int = 0):
    """The student after 'training': its weights moved by a little noise."""
    model = load_model(student_dir, "student").train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def probe_after(teacher: str, student: str, after, contexts, out, tok_dir: str):
    """`teachdiag probe --student-after` of `after`'s weights, saved as a checkpoint folder."""
    ckpt = out.parent / f"{out.name}_ckpt"
    after.save_pretrained(ckpt)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tok_dir}/{f}", ckpt / f)
    return teachdiag.run_probe(teacher=teacher, student=student, student_after=str(ckpt), contexts=str(contexts),
                               out=str(out), threads=1).table


def max_difference(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """Largest |difference| over the numeric columns, NaN matching NaN; the text columns must be equal."""
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for c in TEXT_COLUMNS:
        assert (a[c] == b[c]).all(), c
    x, y = (t.drop(columns=list(TEXT_COLUMNS)).to_numpy(float) for t in (a, b))
    assert np.array_equal(np.isnan(x), np.isnan(y))
    return float(np.nanmax(np.abs(x - y)))


@pytest.mark.slow
def test_a_check_equals_the_probe_of_the_same_checkpoint(pair, tmp_path, one_thread):
    # one thread for both: the probe runs with threads=1, and two threads may sum a row in another order (5e-7 off)
    teacher, student = pair
    contexts = write_contexts(tmp_path / "bank.jsonl", n=6)
    bank = FixedBank.load(teacher, student, str(contexts), device="cpu")
    model = trained(student)
    row = monitor_step(model, 3, bank, tmp_path / "run")
    assert model.training  # put back as it was

    mine = read_tokens(tmp_path / "run" / "monitor" / "step_3" / TOKENS)
    probe = probe_after(teacher, student, model, contexts, tmp_path / "probe", student)
    assert max_difference(mine, probe) == 0.0  # same instrument, same rows, same normalisation
    assert (mine["instrument"] == "checkpoint").all() and mine["gain_fkl"].abs().max() > 0
    assert row["positions"] == bank.n_positions == len(mine) and row["seconds"] > 0

    monitor_step(trained(student, seed=1), 6, bank, tmp_path / "run")
    folder = tmp_path / "run" / "monitor"
    traj = pd.read_csv(folder / TRAJECTORY)
    assert traj["step"].tolist() == [3, 6] and set(COLUMNS) <= set(traj.columns)
    assert traj.loc[0, "gain_fkl"] == pytest.approx(mine.loc[mine["finite"] == 1, "gain_fkl"].mean())
    assert (folder / "trajectory.png").stat().st_size > 0

    out = teachdiag.analyze(str(folder), bootstrap=50)  # recomputed from the step folders, with CIs
    again = pd.read_csv(out / TRAJECTORY)
    assert np.allclose(again["gain_fkl_teachability_high"], traj["gain_fkl_teachability_high"])
    assert (out / "trajectory.md").is_file() and (out / "figures" / "trajectory.png").is_file()
    teachdiag.analyze(str(folder / "step_3"), bootstrap=0)  # a step folder is an ordinary run


def test_ranks_other_than_zero_score_without_writing_and_sharded_runs_are_refused(pair, tmp_path, monkeypatch):
    from teachdiag.integrations import monitor

    teacher, student = pair
    bank = FixedBank.load(teacher, student, str(write_contexts(tmp_path / "b.jsonl", n=2)), device="cpu")
    scored = []
    real = monitor.score
    monkeypatch.setattr(monitor, "score", lambda model, bank: scored.append(1) or real(model, bank))
    callback = MonitorCallback(bank, tmp_path / "run", every=2)
    for step, rank0 in ((1, False), (2, False)):  # rank 1 of a DDP run: it checks at step 2, in step with rank 0
        callback.on_step_end(None, SimpleNamespace(global_step=step, is_world_process_zero=rank0), None,
                             model=trained(student))
    assert scored == [1] and not (tmp_path / "run").exists()
    callback.on_step_end(None, SimpleNamespace(global_step=4, is_world_process_zero=True), None, model=trained(student))
    assert pd.read_csv(tmp_path / "run" / "monitor" / TRAJECTORY)["step"].tolist() == [4]

    plain = SimpleNamespace(fsdp="", deepspeed=None, distributed_state=SimpleNamespace(distributed_type="MULTI_GPU"))
    callback.on_train_begin(plain, None, None)  # DDP: accepted
    for args in (SimpleNamespace(fsdp="full_shard", deepspeed=None), SimpleNamespace(fsdp="", deepspeed="z3.json"),
                 SimpleNamespace(distributed_state=SimpleNamespace(distributed_type="FSDP"))):
        with pytest.raises(InputError, match="DDP only"):
            callback.on_train_begin(args, None, None)


def test_a_model_on_another_device_is_refused(pair, tmp_path):
    teacher, student = pair
    bank = FixedBank.load(teacher, student, str(write_contexts(tmp_path / "b.jsonl", n=2)), device="cpu")
    bank.device = torch.device("cuda", 1)  # as if loaded elsewhere
    with pytest.raises(InputError, match="device"):
        monitor_step(trained(student), 1, bank, tmp_path / "run")
    with pytest.raises(InputError, match="every"):
        MonitorCallback(bank, tmp_path, every=0)


def test_the_callback_in_a_trl_run_matches_the_probe_of_its_final_weights(tmp_path, one_thread):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    from trl_pair import PROMPTS, common_args, save_same_vocab_pair

    teacher, student = save_same_vocab_pair(tmp_path)
    contexts = write_contexts(tmp_path / "bank.jsonl", n=4)
    bank = FixedBank.load(teacher, student, str(contexts), device="cpu")
    args = DistillationConfig(**common_args(tmp_path / "trl"), max_completion_length=6)
    trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student),
                                  teacher_model=AutoModelForCausalLM.from_pretrained(teacher), args=args,
                                  train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                                  processing_class=AutoTokenizer.from_pretrained(student),
                                  callbacks=[MonitorCallback(bank, tmp_path / "run", every=1)])
    trainer.train()
    traj = pd.read_csv(tmp_path / "run" / "monitor" / TRAJECTORY)
    assert traj["step"].tolist() == [1, 2, 3] and (traj["gain_fkl"] != 0).all()

    mine = read_tokens(tmp_path / "run" / "monitor" / "step_3" / TOKENS)
    probe = probe_after(teacher, student, trainer.model, contexts, tmp_path / "probe", student)
    assert max_difference(mine, probe) == 0.0
