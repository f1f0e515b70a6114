"""The demo prompt generator: seeded, distinct, and every answer recomputable from its question."""

import json
import re
from collections import Counter

import pytest

from teachdiag.demo import prompts
from teachdiag.demo.prompts import check_solution, generate

from teachdiag.demo import DEMO_PROMPTS as DATA


def numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def question(rec: dict) -> str:
    return rec["prompt"].split("\n")[0]


def test_same_seed_same_records_other_seed_differs():
    assert generate(50, seed=3) == generate(50, seed=3)
    assert [r["prompt"] for r in generate(50, seed=3)] != [r["prompt"] for r in generate(50, seed=4)]
    assert generate(80, seed=3)[:50] == generate(50, seed=3)  # a longer run extends a shorter one


def test_records_shape_distinct_and_balanced():
    recs = generate(260, seed=0)
    assert [r["id"] for r in recs] == [f"arith-0-{i:04d}" for i in range(260)]
    assert len({question(r) for r in recs}) == 260
    for r in recs:
        assert set(r) == {"id", "kind", "prompt", "teacher_prompt", "answer"}
        assert r["teacher_prompt"].startswith(question(r))
        assert prompts.SOLUTION_HEADER in r["teacher_prompt"] and prompts.SOLUTION_HEADER not in r["prompt"]
        assert not re.search(r"answer is \d", r["prompt"])  # the student's view never leaks it
    counts = Counter(r["kind"] for r in recs)
    assert set(counts) == {t.__name__ for t in prompts.TEMPLATES}
    assert max(counts.values()) - min(counts.values()) <= 3  # duplicates are skipped


def test_every_solution_recomputes_to_the_answer_from_the_question():
    for r in generate(300, seed=7):
        solution = r["teacher_prompt"].split(prompts.SOLUTION_HEADER)[1]
        assert check_solution(solution) == int(r["answer"]) >= 0
        # each operand is a number of the question, an earlier step's result, or a constant
        given, results = set(numbers(question(r))), set()
        for a, _, b, c in re.findall(r"(\d+) ([+−×÷]) (\d+) = (\d+)", solution):
            for x in (int(a), int(b)):
                assert x in given or x in results or x in (1, 2, 100), (r["id"], x)
            results.add(int(c))


@pytest.mark.parametrize("kind,recompute", [
    ("shopping_change", lambda n: n[2] - n[0] * n[1]),          # n items at $p, bill
    ("two_items", lambda n: n[0] * n[1] + n[2] * n[3]),
    ("rectangle_perimeter", lambda n: 2 * (n[0] + n[1])),
    ("ages", lambda n: n[0] * n[1] + n[2]),
    ("discount", lambda n: n[0] - n[0] * n[1] // 100),
    ("temperature", lambda n: n[0] + n[1] - n[2]),
    ("schedule", lambda n: n[0] * n[1] + (n[0] - 1) * n[2]),
])
def test_answers_recomputed_independently_from_question_numbers(kind, recompute):
    recs = [r for r in generate(300, seed=11) if r["kind"] == kind]
    assert recs
    for r in recs:
        assert recompute(numbers(question(r))) == int(r["answer"]), r


def test_checker_rejects_wrong_solutions():
    with pytest.raises(ValueError):
        check_solution("Step 1: 3 × 4 = 13\nThe answer is 13.")
    with pytest.raises(ValueError):
        check_solution("Step 1: 7 ÷ 2 = 3\nThe answer is 3.")
    with pytest.raises(ValueError):
        check_solution("Step 1: 3 + 4 = 7\nThe answer is 8.")
    assert check_solution("Step 1: 3 + 4 = 7\nStep 2: 7 × 2 = 14\nThe answer is 14.") == 14


def test_cli_writes_jsonl(tmp_path):
    out = tmp_path / "p.jsonl"
    assert prompts.main(["--n", "12", "--seed", "5", "--out", str(out)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == generate(12, seed=5)


def test_committed_demo_prompts_are_reproducible():
    if not DATA.is_file():
        pytest.skip("teachdiag/demo/data/prompts.jsonl not present")
    assert [json.loads(line) for line in DATA.read_text().splitlines()] == generate(300, seed=0)
