"""Loading models: PEFT adapters merged, the run record's weights provenance, hub ids offline."""

import hashlib
import json
import sys
import time

import pandas as pd
import pytest
import torch

from teachdiag.cli import main
from teachdiag.errors import InputError
from teachdiag.models import load_model, load_tokenizer
from teachdiag.provenance import model_record
from teachdiag.table import read_tokens


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def adapter(pair, tmp_path_factory):
    """(adapter folder, merged folder) for a LoRA on the pair's student, B not zero."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("adapter")
    student = pair[1]
    base = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    torch.manual_seed(0)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))  # random A and B: a real change
    lora.save_pretrained(root / "lora")  # adapter_config.json names the base folder
    merged = lora.merge_and_unload()
    merged.save_pretrained(root / "merged")
    AutoTokenizer.from_pretrained(student).save_pretrained(root / "merged")
    return str(root / "lora"), str(root / "merged")


def probe(teacher, student, contexts, out, *extra):
    return main(["probe", "--teacher", teacher, "--student", student, "--contexts", str(contexts),
                 "--out", str(out), "--device", "cpu", "--quiet", "--positions", "6", *extra])


def test_adapter_probes_like_its_merged_model(pair, adapter, contexts, tmp_path):
    lora, merged = adapter
    assert json.loads(open(f"{lora}/adapter_config.json").read())["base_model_name_or_path"] == pair[1]
    assert probe(pair[0], lora, contexts, tmp_path / "a") == 0
    assert probe(pair[0], merged, contexts, tmp_path / "m") == 0
    a, m = read_tokens(tmp_path / "a/tokens.csv"), read_tokens(tmp_path / "m/tokens.csv")
    pd.testing.assert_frame_equal(a, m, check_exact=False, rtol=1e-5, atol=1e-7)
    base = read_tokens(tmp_path / "a/tokens.csv")  # the adapter did change the student
    assert probe(*pair, contexts, tmp_path / "b") == 0
    assert not (read_tokens(tmp_path / "b/tokens.csv")["fkl"] == base["fkl"]).all()
    rec = json.loads((tmp_path / "a/run.json").read_text())["student"]
    assert rec["adapter"]["sha256"] == sha256(f"{lora}/adapter_model.safetensors")
    assert rec["adapter"]["base"] == pair[1]
    assert rec["adapter"]["base_weights_sha256"] == json.loads(
        (tmp_path / "b/run.json").read_text())["student"]["weights_sha256"]


def test_adapter_base_flag_and_missing_peft(pair, adapter, monkeypatch, tmp_path):
    lora, _ = adapter
    cfg = json.loads(open(f"{lora}/adapter_config.json").read())
    moved = tmp_path / "lora_nobase"
    moved.mkdir()
    (moved / "adapter_model.safetensors").write_bytes(open(f"{lora}/adapter_model.safetensors", "rb").read())
    (moved / "adapter_config.json").write_text(json.dumps(dict(cfg, base_model_name_or_path=None)))
    with pytest.raises(InputError, match="pass --student-base"):
        load_model(str(moved))
    assert load_model(str(moved), base=pair[1]).teachdiag_source["adapter"]["base"] == pair[1]
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(InputError, match=r"pip install teachdiag\[adapters\]"):
        load_model(lora)


def test_bfloat16_folder_records_its_dtype_and_hash(pair, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(pair[1], dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    with safe_open(str(tmp_path / "bf16/model.safetensors"), "pt") as f:  # independent reference
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    fp32 = model_record(pair[1], load_model(pair[1]), "float32")
    bf16 = model_record(str(tmp_path / "bf16"), load_model(str(tmp_path / "bf16")), "float32")
    assert (fp32["source_dtype"], fp32["upcast"]) == ("float32", False)
    assert (bf16["source_dtype"], bf16["upcast"]) == ("bfloat16", True)
    assert fp32["config_sha256"] == bf16["config_sha256"]  # why the config hash alone is not enough
    assert fp32["weights_sha256"] != bf16["weights_sha256"]
    assert bf16["weight_files"] == ["model.safetensors"]
    assert fp32["teachdiag"]["version"] and "git_commit" in fp32["teachdiag"]


@pytest.mark.parametrize("offline", [False, True])
def test_unreachable_hub_id_fails_fast(monkeypatch, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    t0 = time.time()
    for load in (load_tokenizer, load_model):
        with pytest.raises(InputError, match="pass a local folder") as e:
            load("nonexistent-org/nonexistent-model")
        assert "nonexistent-org/nonexistent-model" in str(e.value)
    assert time.time() - t0 < 10
