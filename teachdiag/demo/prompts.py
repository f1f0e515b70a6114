"""Seeded arithmetic word problems with worked solutions (the demo prompt set).

    python -m teachdiag.demo.prompts --n 300 --seed 0 --out teachdiag/demo/data/prompts.jsonl

Each JSONL record is a prompt record for `teachdiag rollout`:

    {"id": "arith-0-0000", "kind": "shopping_change",
     "prompt": "<question + answer-format instruction>",     # the student's view
     "teacher_prompt": "<question + worked solution + instruction>",  # the teacher's privileged view
     "answer": "14"}

Why generate instead of shipping a benchmark: the project needs prompts that are licence-clean,
offline, small, and whose answers anyone can check. Every step of a worked solution is one
equation `a op b = c` with op in + − × ÷, so a checker can recompute the whole solution
(`check_solution`); the last step's result is the answer. Same seed → same file, on any machine
(only Python's `random.Random` is used).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from teachdiag.flags import opt, parse_config

INSTRUCTION = 'Solve it step by step, then finish with "The answer is N." where N is a number.'
SOLUTION_HEADER = "A worked solution, for reference:"

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jamal", "Kira",
         "Liam", "Maya", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera",
         "Wen", "Yusuf", "Zoe"]
ITEMS = [("notebook", "notebooks"), ("pen", "pens"), ("mug", "mugs"), ("ticket", "tickets"),
         ("sandwich", "sandwiches"), ("book", "books"), ("plant", "plants"), ("toy car", "toy cars")]
THINGS = ["marbles", "stickers", "apples", "cards", "stamps", "shells", "pencils", "cookies"]
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("crate", "crates")]


@dataclass(frozen=True)
class Problem:
    """One word problem: `steps` are (a, op, b, result) with op in '+-*/'; answer = last result."""

    kind: str
    question: str
    steps: tuple[tuple[int, str, int, int], ...]
    unit: str = ""

    @property
    def answer(self) -> int:
        return self.steps[-1][3]


OPS = {"+": ("+", lambda a, b: a + b), "-": ("−", lambda a, b: a - b),
       "*": ("×", lambda a, b: a * b), "/": ("÷", lambda a, b: a // b)}


def _step(a: int, op: str, b: int) -> tuple[int, str, int, int]:
    if op == "/":
        assert b != 0 and a % b == 0, (a, b)
    return (a, op, b, OPS[op][1](a, b))


# ---------------------------------------------------------------------------------------------
# templates: each takes a Random and returns a Problem; all numbers are positive integers


def shopping_change(r: random.Random) -> Problem:
    name, (_, many) = r.choice(NAMES), r.choice(ITEMS)
    n, price = r.randint(2, 9), r.randint(2, 15)
    cost = n * price
    bill = next(b for b in (10, 20, 50, 100, 200) if b > cost)
    q = (f"{name} buys {n} {many} at ${price} each and pays with a ${bill} bill. "
         f"How much change does {name} get, in dollars?")
    return Problem("shopping_change", q, (_step(n, "*", price), _step(bill, "-", cost)), "dollars")


def two_items(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    (a1, am), (b1, bm) = r.sample(ITEMS, 2)
    na, pa, nb, pb = r.randint(2, 8), r.randint(2, 12), r.randint(2, 8), r.randint(2, 12)
    q = (f"{name} buys {na} {am} for ${pa} each and {nb} {bm} for ${pb} each. "
         f"How many dollars does {name} spend in total?")
    s1, s2 = _step(na, "*", pa), _step(nb, "*", pb)
    return Problem("two_items", q, (s1, s2, _step(s1[3], "+", s2[3])), "dollars")


def give_away(r: random.Random) -> Problem:
    name, thing = r.choice(NAMES), r.choice(THINGS)
    k, each = r.randint(2, 6), r.randint(2, 9)
    start = k * each + r.randint(1, 40)
    q = (f"{name} has {start} {thing} and gives {each} to each of {k} friends. "
         f"How many {thing} does {name} have left?")
    return Problem("give_away", q, (_step(k, "*", each), _step(start, "-", k * each)), thing)


def travel_distance(r: random.Random) -> Problem:
    speed, hours = r.choice(range(30, 125, 5)), r.randint(2, 6)
    extra = r.randint(5, 60)
    q = (f"A train travels at {speed} km per hour for {hours} hours, then another {extra} km. "
         "How many kilometres does it travel in total?")
    return Problem("travel_distance", q, (_step(speed, "*", hours), _step(speed * hours, "+", extra)),
                   "km")


def rectangle_perimeter(r: random.Random) -> Problem:
    w, l = r.randint(3, 30), r.randint(3, 40)
    q = f"A garden is {w} metres wide and {l} metres long. What is its perimeter in metres?"
    return Problem("rectangle_perimeter", q, (_step(w, "+", l), _step(2, "*", w + l)), "metres")


def rectangle_area_cost(r: random.Random) -> Problem:
    w, l, price = r.randint(2, 12), r.randint(2, 15), r.randint(2, 9)
    q = (f"A room is {w} metres by {l} metres. Carpet costs ${price} per square metre. "
         "How many dollars does carpet for the whole room cost?")
    return Problem("rectangle_area_cost", q, (_step(w, "*", l), _step(w * l, "*", price)), "dollars")


def ages(r: random.Random) -> Problem:
    a, b = r.sample(NAMES, 2)
    age, k, years = r.randint(3, 12), r.randint(2, 4), r.randint(2, 15)
    q = (f"{a} is {age} years old. {b} is {k} times as old as {a}. "
         f"How old will {b} be in {years} years?")
    return Problem("ages", q, (_step(age, "*", k), _step(age * k, "+", years)), "years")


def packing(r: random.Random) -> Problem:
    thing, (one, many) = r.choice(THINGS), r.choice(CONTAINERS)
    per, full, loose = r.randint(3, 12), r.randint(3, 15), r.randint(1, 9)
    total = per * full
    q = (f"There are {total} {thing}. They are packed {per} to a {one}. "
         f"Then {loose} more full {many} arrive. How many full {many} are there now?")
    return Problem("packing", q, (_step(total, "/", per), _step(full, "+", loose)), many)


def savings(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    weekly, weeks = r.randint(3, 25), r.randint(3, 12)
    spend = r.randint(1, weekly * weeks - 1)
    q = (f"{name} saves ${weekly} every week for {weeks} weeks, then spends ${spend} on a gift. "
         f"How many dollars does {name} have left?")
    return Problem("savings", q, (_step(weekly, "*", weeks), _step(weekly * weeks, "-", spend)),
                   "dollars")


def reading(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    per_day, days = r.randint(5, 30), r.randint(2, 9)
    pages = per_day * days + r.randint(10, 200)
    q = (f"A book has {pages} pages. {name} reads {per_day} pages a day for {days} days. "
         "How many pages are left to read?")
    return Problem("reading", q, (_step(per_day, "*", days), _step(pages, "-", per_day * days)),
                   "pages")


def schedule(r: random.Random) -> Problem:
    lessons, length = r.randint(2, 6), r.choice(range(20, 65, 5))
    blen = r.choice((5, 10, 15))
    q = (f"A school day has {lessons} lessons of {length} minutes each, with a {blen}-minute "
         "break between consecutive lessons. How many minutes long is the day from the start of "
         "the first lesson to the end of the last?")
    s1, s2 = _step(lessons, "*", length), _step(lessons, "-", 1)  # s2: the number of breaks
    s3 = _step(s2[3], "*", blen)
    return Problem("schedule", q, (s1, s2, s3, _step(s1[3], "+", s3[3])), "minutes")


def discount(r: random.Random) -> Problem:
    pct = r.choice((10, 20, 25, 50))
    price = r.randint(2, 30) * (100 // _gcd(100, pct))
    item = r.choice(("jacket", "bike", "lamp", "chair", "guitar", "backpack"))
    q = f"A {item} costs ${price}. It is on sale for {pct}% off. What is the sale price in dollars?"
    s1 = _step(price, "*", pct)
    s2 = _step(s1[3], "/", 100)
    return Problem("discount", q, (s1, s2, _step(price, "-", s2[3])), "dollars")


def temperature(r: random.Random) -> Problem:
    start, up, down = r.randint(1, 20), r.randint(2, 15), r.randint(1, 10)
    q = (f"In the morning it is {start} degrees. By noon the temperature rises by {up} degrees, "
         f"and by night it falls by {down} degrees. What is the temperature at night, in degrees?")
    return Problem("temperature", q, (_step(start, "+", up), _step(start + up, "-", down)),
                   "degrees")


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


TEMPLATES: list[Callable[[random.Random], Problem]] = [
    shopping_change, two_items, give_away, travel_distance, rectangle_perimeter,
    rectangle_area_cost, ages, packing, savings, reading, schedule, discount, temperature]


# one-step problems with numbers below 20: the self-distillation setting's student is the 135M
# teacher model itself, which solves none of 64 two-step problems above at temperature 1; these it
# solves 30% of the time at temperature 0.3, so whether a branch stays viable varies (`teachdiag viability`)

def buy_more(r: random.Random) -> Problem:
    name, thing = r.choice(NAMES), r.choice(THINGS)
    a, b = r.randint(2, 9), r.randint(2, 9)
    return Problem("buy_more", f"{name} has {a} {thing} and buys {b} more. How many {thing} does {name} have?",
                   (_step(a, "+", b),), thing)


def give_some(r: random.Random) -> Problem:
    name, thing = r.choice(NAMES), r.choice(THINGS)
    b = r.randint(2, 9)
    a = b + r.randint(2, 9)
    return Problem("give_some", f"{name} has {a} {thing} and gives {b} away. How many {thing} does {name} have left?",
                   (_step(a, "-", b),), thing)


EASY_TEMPLATES: list[Callable[[random.Random], Problem]] = [buy_more, give_some]
LEVELS = ("two_step", "one_step")


# ---------------------------------------------------------------------------------------------
# rendering and checking


def solution_text(p: Problem) -> str:
    """The worked solution: one equation per line, then 'The answer is N.'"""
    lines = [f"Step {i}: {a} {OPS[op][0]} {b} = {c}" for i, (a, op, b, c) in enumerate(p.steps, 1)]
    return "\n".join(lines + [f"The answer is {p.answer}."])


def to_record(p: Problem, rid: str, instruction: str = INSTRUCTION) -> dict:
    """The JSONL record: the student sees the question, the teacher also a worked solution."""
    tail = f"\n\n{instruction}" if instruction else ""
    return {"id": rid, "kind": p.kind,
            "prompt": f"{p.question}\n{instruction}" if instruction else p.question,
            "teacher_prompt": f"{p.question}\n\n{SOLUTION_HEADER}\n{solution_text(p)}{tail}",
            "answer": str(p.answer)}


_EQ = re.compile(r"(-?\d+) ([+−×÷]) (-?\d+) = (-?\d+)")
_SYM = {"+": "+", "−": "-", "×": "*", "÷": "/"}


def check_solution(text: str) -> int:
    """Recompute every `a op b = c` in a worked solution; return the final answer.

    Raises ValueError when an equation is wrong, ÷ is inexact, or the stated answer differs from
    the last equation's result.
    """
    eqs = _EQ.findall(text)
    if not eqs:
        raise ValueError("no equations found")
    for a, sym, b, c in eqs:
        a_, b_, c_ = int(a), int(b), int(c)
        op = _SYM[sym]
        if op == "/" and (b_ == 0 or a_ % b_):
            raise ValueError(f"inexact division {a} ÷ {b}")
        if OPS[op][1](a_, b_) != c_:
            raise ValueError(f"wrong step {a} {sym} {b} = {c}")
    stated = re.search(r"The answer is (-?\d+)\.", text)
    if stated is None or int(stated.group(1)) != int(eqs[-1][3]):
        raise ValueError("stated answer differs from the last step")
    return int(stated.group(1))


def generate(n: int, seed: int = 0, level: str = "two_step") -> list[dict]:
    """`n` distinct problems (no repeated question), ids `arith-{seed}-{i:04d}`.

    Templates take turns in a seeded shuffled order, so the kinds are balanced. level "one_step":
    the one-step templates, ids `easy-{seed}-{i:04d}`, asked without the step-by-step instruction
    (the 135M model answers them in a sentence).
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; one of {LEVELS}")
    templates, prefix = (TEMPLATES, "arith") if level == "two_step" else (EASY_TEMPLATES, "easy")
    instruction = INSTRUCTION if level == "two_step" else ""
    r = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    order: list[Callable[[random.Random], Problem]] = []
    tries = 0
    while len(out) < n:
        if not order:
            order = templates[:]
            r.shuffle(order)
        p = order.pop()(r)
        tries += 1
        if tries > 100 * n + 1000:
            raise RuntimeError(f"could not make {n} distinct problems")
        if p.question in seen:
            continue
        seen.add(p.question)
        out.append(to_record(p, f"{prefix}-{seed}-{len(out):04d}", instruction))
    return out


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


@dataclass
class PromptsConfig:
    """Options of `python -m teachdiag.demo.prompts` (field foo_bar is the flag --foo-bar)."""

    n: int = opt("number of problems", 300)
    seed: int = opt("random seed (same seed, same file)", 0)
    level: str = opt("two_step (the distillation demo) or one_step (the self-distillation demo)", "two_step",
                     choices=list(LEVELS))
    out: str = opt("output JSONL path", "teachdiag/demo/data/prompts.jsonl")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(PromptsConfig, argv, prog="python -m teachdiag.demo.prompts",
                       description=__doc__.split("\n")[0])
    path = write_jsonl(generate(cfg.n, cfg.seed, cfg.level), cfg.out)
    print(f"wrote {cfg.n} problems to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
