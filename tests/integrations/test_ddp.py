"""TA-OPD and the live monitor under DDP: 2 ranks on CPU (gloo) train 3 steps of
TAOPDDistillationTrainer with a MonitorCallback; each rank selects on its own generation batch,
every rank scores the bank at each check (none is left waiting at the all-reduce) and rank 0 alone writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import write_contexts

pytest.importorskip("trl")

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_two_ranks_select_on_their_own_batches_and_rank_zero_writes_the_monitor(tmp_path):
    from trl_pair import save_same_vocab_pair

    save_same_vocab_pair(tmp_path)
    write_contexts(tmp_path / "bank.jsonl", n=4)
    path = os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    got = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(HERE / "ddp_run.py"), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    ranks = sorted((json.loads(f.read_text()) for f in tmp_path.glob("rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["processes"] == 2 for r in ranks)
    for r in ranks:  # 3 steps, each selected over that rank's 2 prompts × 6 completion tokens at most
        assert [x["step"] for x in r["log"]] == [1, 2, 3]
        assert all(1 <= x["kept"] < x["positions"] <= 12 for x in r["log"])
    traj = pd.read_csv(tmp_path / "run" / "monitor" / "trajectory.csv")
    assert traj["step"].tolist() == [1, 2, 3] and (traj["gain_fkl"] != 0).all()
