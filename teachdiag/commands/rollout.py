"""Sample student responses once and freeze them as contexts (`teachdiag rollout`).

    teachdiag rollout --student smollm2-135m-pruned --prompts teachdiag/demo/data/prompts.jsonl --out rollouts.jsonl
    teachdiag rollout --prompts teachdiag/demo/data/prompts.jsonl --out r.jsonl --teacher-prompts --max-new-tokens 192

    from teachdiag.commands.rollout import RolloutConfig, run_rollout
    run_rollout(RolloutConfig(student="path/to/model", prompts="p.jsonl", out="r.jsonl"))

Prompt records (JSONL, one object a line): `id`, exactly one of `prompt` (str) or `messages`
([{"role", "content"}]), optional `teacher_prompt` / `teacher_messages` (the teacher's privileged
view), optional `answer` (kept in meta). Other fields are ignored.

Output records are the frozen-contexts format:
`{"id", "prompt_ids", "response_ids", ["teacher_prompt_ids"], "meta"}`. `response_ids` keeps the
end-of-sequence token when the model emitted one (the student did predict it, so it is a position
like any other) and `meta.finish_reason` says "eos" or "length" (cut at --max-new-tokens).

`meta.response_text` is the decoded response (special tokens kept), for reading a file by eye.

Why the seed is set per batch, inside a forked RNG: the same seed then gives the same rollouts on
the same machine whatever ran before in the process, and a library caller's global RNG is left
untouched. Different batch sizes give different (equally valid) samples. Batches are fixed by
the prompt lengths before sampling starts, so a `--resume`d run samples what the uninterrupted
run would have.

Crash safety, as `teachdiag probe`: each finished batch is appended to <out>.partial, flushed and
fsynced; --out itself appears only when every batch is done, rewritten atomically in input order,
so a killed rollout leaves nothing that passes for finished contexts. An existing non-empty --out
(or .partial) is refused unless --overwrite (start again) or --resume (skip the ids already
written, after cutting a torn last line; a record whose id left --prompts or whose prompt changed
is refused before any sampling). One rollout at a time writes an --out: a second one is refused in
one line naming the first one's pid (a flock on <folder>/.<out name>.lock). Progress: a bar on a terminal; off one (SLURM, nohup), a plain line
every 30 s on stderr. The last line says how many records were written where.

The run record, <out>.run.json (e.g. rollouts.jsonl.run.json), says what made the file: the run
header (command line, options, device), the student as every run record gives a model (path,
config and weights sha256, dtype on disk: provenance.model_record), the prompts file's sha256,
the sampling options, and "complete": false while sampling, true once --out is in place (then
n_records). A --resume whose student's weights differ from the record's is refused; a file an
older version wrote, with no record beside it, is resumed by its records' meta alone. Every file
is written through the run output (runfolder.RunOutput).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from teachdiag import __version__
from teachdiag.contexts import encode_prompt
from teachdiag.config import DeviceOptions, require
from teachdiag.errors import InputError
from teachdiag.progress import progress
from teachdiag.flags import opt
from teachdiag.generation import generate_batch, read_prompts, stop_ids
from teachdiag.provenance import command_header, file_sha256, model_record
from teachdiag.runfolder import RunOutput, releases_locks

DEFAULT_STUDENT = "smollm2-135m-pruned"
from teachdiag.demo import DEMO_PROMPTS  # noqa: E402


@dataclass
class RolloutConfig(DeviceOptions):
    """Options of `teachdiag rollout` (field foo_bar is the flag --foo-bar)."""

    student: str = opt("student model: a short name (see teachdiag.demo.zoo), a local folder or a hub id", DEFAULT_STUDENT)
    prompts: str = opt("prompt records, JSONL: id, prompt or messages, optional teacher_prompt / "
                "teacher_messages and answer", str(DEMO_PROMPTS))
    out: str = opt("output JSONL of frozen contexts (prompt_ids, response_ids, meta)", "rollouts.jsonl")
    teacher_prompts: bool = opt("also write teacher_prompt_ids from each record's teacher_prompt / "
                "teacher_messages (the teacher's privileged view); every record must have one", False)
    max_new_tokens: int = opt("longest response, in tokens; longer ones are cut (finish_reason 'length')", 256)
    temperature: float = opt("sampling temperature; 1.0 samples the student's own distribution (on-policy), "
                "0 is greedy", 1.0)
    top_p: float = opt("nucleus sampling mass; 1.0 turns it off", 1.0)
    samples: int = opt("responses per prompt; ids get a suffix -s0, -s1, ... when more than one", 1)
    seed: int = opt("random seed: same seed, same rollouts on the "
                                                   "same machine and batch size", 0)
    batch_size: int = opt("prompts generated together (left-padded); reduce if you run out of memory", 16)
    overwrite: bool = opt("replace an existing non-empty --out", False)
    resume: bool = opt("continue an interrupted rollout in --out: keep its records, sample the rest "
                       "(same options)", False)
    trust_remote_code: bool = opt("allow model folders whose config loads custom code (only if you trust it)", False)


# ---------------------------------------------------------------------------------------------
# reading prompt records


def _validate(cfg: RolloutConfig) -> None:
    require([(cfg.max_new_tokens >= 1, "--max-new-tokens", "must be at least 1"),
             (cfg.temperature >= 0, "--temperature", "must be >= 0"),
             (0 < cfg.top_p <= 1, "--top-p", "must be in (0, 1]"),
             (cfg.samples >= 1, "--samples", "must be at least 1"),
             (cfg.batch_size >= 1, "--batch-size", "must be at least 1")])


# options that must match for --resume to continue a file (as written in each record's meta)
RESUME_META = ("model", "temperature", "top_p", "max_new_tokens", "samples", "batch_size", "seed",
               "tokenizer_fingerprint")


def partial_path(out: str | Path) -> Path:
    """Where an unfinished rollout grows: <out>.partial. --out itself appears only when every
    record is written, so a killed rollout never leaves a file that passes for finished contexts."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _existing(cfg: RolloutConfig, meta: dict, output: RunOutput) -> tuple[Path | None, list[tuple[int, dict]]]:
    """(the file a --resume continues, its whole records with their line numbers), after cutting a
    torn last line; refuse what probe refuses. The file is <out>.partial, or --out itself when a
    finished file (or one an older version left unfinished) is resumed."""
    out, partial = Path(cfg.out), partial_path(cfg.out)
    if out.exists() and not out.is_file():
        raise InputError("exists and is not a file", file=str(out), field="--out")
    occupied = [p for p in (out, partial) if p.is_file() and p.stat().st_size > 0]
    if not cfg.resume:
        if occupied and not cfg.overwrite:
            raise InputError("exists and is not empty; pass --overwrite to replace it or --resume to "
                             "continue it", file=str(occupied[0]), field="--out")
        return None, []
    source = partial if partial.is_file() else out
    if not source.is_file():
        raise InputError("nothing to resume (no such file)", file=str(out), field="--resume")
    data = source.read_bytes()
    keep, found = 0, []
    for line_no, line in enumerate(data.splitlines(keepends=True), start=1):
        try:
            rec = json.loads(line)
            if not line.endswith(b"\n") or not isinstance(rec, dict):
                break  # a torn last line can still parse (a number cut short): redo it
        except (ValueError, RecursionError):
            break
        for key in RESUME_META:
            if not isinstance(rec.get("meta"), dict) or rec["meta"].get(key) != meta[key]:
                raise InputError(f"option {key} differs from the rollout being resumed "
                                 f"({(rec.get('meta') or {}).get(key)!r} vs {meta[key]!r})",
                                 file=str(source), line=line_no, field="--resume")
        found.append((line_no, rec))
        keep += len(line)
    if keep < len(data):
        output.cut(source, keep)
    return source, found


def _check_resumed(found: list[tuple[int, dict]], source: Path, expected: dict[str, dict], prompts: str) -> None:
    """Every record already written must be one this run would write, from the same prompt: an id no
    longer in --prompts, or a prompt edited since, is refused before any sampling (not kept stale)."""
    seen: dict[str, int] = {}
    for line_no, rec in found:
        rid = rec.get("id") if isinstance(rec, dict) else None
        where = {"file": str(source), "line": line_no}
        if not isinstance(rid, str) or rid not in expected:  # a list or object id would not even hash
            raise InputError(f"id {rid!r} is not in {prompts} (any more); start again with --overwrite",
                             field="id", **where)
        if rid in seen:
            raise InputError(f"id {rid!r} is written twice (first on line {seen[rid]}); start again with --overwrite",
                             field="id", **where)
        seen[rid] = line_no
        want = expected[rid]
        for key in ("prompt_ids", "teacher_prompt_ids", "answer"):
            got = rec.get(key) if key != "answer" else (rec.get("meta") or {}).get("answer")
            if got != want[key]:
                raise InputError(f"{rid!r} was sampled from another prompt than {prompts}:{want['line']} now "
                                 "gives; start again with --overwrite", field=key if key != "answer" else "meta.answer",
                                 **where)


@releases_locks  # the file lock is let go when it ends, however
def run_rollout(cfg: RolloutConfig, argv: list[str] | None = None) -> Path:
    """Sample `cfg.samples` responses per prompt record and write frozen contexts to `cfg.out`.

    Prompts are batched by length to save padding; each finished batch is appended to
    `cfg.out` (see the module docstring for --overwrite / --resume) and the finished file is
    rewritten in input order (sample 0, 1, ... of each prompt). <out>.run.json records the run.
    """
    from teachdiag.models import load_model, load_tokenizer, resolve_device
    from teachdiag.tokenizers import tokenizer_fingerprint

    _validate(cfg)
    records = read_prompts(cfg.prompts, need_teacher=cfg.teacher_prompts)
    out_path = Path(cfg.out)
    output = RunOutput.beside(out_path)  # writable, locked: before <out> or <out>.partial is read
    device = resolve_device(cfg.device)
    tok = load_tokenizer(cfg.student, "student", trust_remote_code=cfg.trust_remote_code)
    sampling = {"model": cfg.student, "temperature": cfg.temperature, "top_p": cfg.top_p,
                "max_new_tokens": cfg.max_new_tokens, "samples": cfg.samples,
                "batch_size": cfg.batch_size, "seed": cfg.seed,
                "tokenizer_fingerprint": tokenizer_fingerprint(tok)}
    prompt_ids = [encode_prompt(tok, r["student"], cfg.prompts, r["line"],
                                "prompt" if isinstance(r["student"], str) else "messages")
                  for r in records]
    teacher_ids = [encode_prompt(tok, r["teacher"], cfg.prompts, r["line"],
                                 "teacher_prompt" if isinstance(r["teacher"], str) else "teacher_messages")
                   if cfg.teacher_prompts else None for r in records]

    # work items (record index, sample index) and their ids, checked before any sampling
    items = [(i, s) for i in range(len(records)) for s in range(cfg.samples)]
    rid = {(i, s): records[i]["id"] if cfg.samples == 1 else f"{records[i]['id']}-s{s}" for i, s in items}
    seen: dict[str, int] = {}
    for it in items:
        if rid[it] in seen:
            raise InputError(f"id {rid[it]!r} occurs twice once sample suffixes are added",
                             cfg.prompts, records[it[0]]["line"], "id")
        seen[rid[it]] = it[0]
    source, found = _existing(cfg, sampling, output)
    expected = {rid[(i, s)]: {"prompt_ids": prompt_ids[i], "line": records[i]["line"], "answer": records[i]["answer"],
                              "teacher_prompt_ids": teacher_ids[i]} for i, s in items}
    _check_resumed(found, source, expected, cfg.prompts)
    done = {rec["id"] for _, rec in found}
    partial = partial_path(cfg.out)
    model = load_model(cfg.student, "student", dtype="float32", device=device,
                       trust_remote_code=cfg.trust_remote_code)
    record = {"teachdiag": __version__, **command_header("rollout", argv, asdict(cfg), device),
              "student": model_record(cfg.student, model, "float32"),
              "prompts": {"path": str(cfg.prompts), "sha256": file_sha256(cfg.prompts), "n_records": len(records)},
              "sampling": sampling}
    if cfg.resume:  # the records' meta names the model; the run record pins its weights (a folder retrained in place)
        old = output.previous()
        if old is not None and isinstance(old.get("student"), dict):
            output.check_models({"student": old["student"]}, {"student": record["student"]})
    if not cfg.resume:  # --overwrite, or a new file: only once the model has loaded
        output.write(partial, "")
        output.remove(out_path)
    elif source == out_path:  # resumed from --out itself: it grows as <out>.partial until done
        output.move(out_path, partial)
    output.start(record)
    eos_ids, pad_id = stop_ids(model, tok)
    chat = bool(getattr(tok, "chat_template", None))

    # longest prompts first so batches pad little; batch b keeps its seed whatever is resumed
    order = sorted(items, key=lambda it: (-len(prompt_ids[it[0]]), it))
    batches = [order[k:k + cfg.batch_size] for k in range(0, len(order), cfg.batch_size)]
    bar, t_start, n_tokens = progress(sum(rid[it] not in done for it in items), "rollout", "resp", cfg.quiet), time.time(), 0
    for b, batch in enumerate(batches):
        if all(rid[it] in done for it in batch):
            continue
        outs = generate_batch(model, [prompt_ids[i] for i, _ in batch],
                              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              top_p=cfg.top_p, eos_ids=eos_ids, pad_id=pad_id,
                              seed=cfg.seed * 1_000_003 + b, vocab=len(tok))
        lines = []
        for (i, s), (resp, finish) in zip(batch, outs):
            if rid[(i, s)] in done:  # written before a crash tore the rest of this batch
                continue
            rec = records[i]
            meta = {**sampling, "sample": s, "chat_template": chat, "finish_reason": finish,
                    "n_response_tokens": len(resp), "response_text": tok.decode(resp)}
            if rec["answer"] is not None:
                meta["answer"] = rec["answer"]
            out = {"id": rid[(i, s)], "prompt_ids": prompt_ids[i], "response_ids": resp}
            if cfg.teacher_prompts:
                out["teacher_prompt_ids"] = teacher_ids[i]
            out["meta"] = meta
            lines.append(json.dumps(out) + "\n")
        output.append(partial, "".join(lines), "the batches written so far are kept; free space or fix "
                                               "permissions, then rerun with --resume")
        n_tokens += sum(len(r) for r, _ in outs)
        bar.set_postfix_str(f"{n_tokens / max(time.time() - t_start, 1e-9):.1f} tok/s")
        bar.update(len(lines))
    bar.close()

    # input order, written whole and renamed into place
    rank = {rid[it]: k for k, it in enumerate(items)}
    lines = [line for line in partial.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    lines.sort(key=lambda line: rank[json.loads(line)["id"]])
    with output.faults(f"every record is kept in {partial}; free space, then rerun with --resume"):
        output.write(out_path, "".join(lines))
        output.remove(partial)
        output.finish(dict(record, n_records=len(lines)))  # last: --out is whole
    print(f"wrote {len(lines)} records to {out_path}")
    return out_path
