"""The built-in model's text, written for the project: sentences that follow rules a reader can check.

Counting, the days of the week, the months, dates, small sums and a few fixed facts, drawn by a seeded
generator. Each document is a handful of sentences; a continuation of a prompt is right or wrong by the rule
that made the sentence (`HELD_OUT_PROMPTS`), which is what the tests and the demo check.

The sums of `held_out_sum` and the counts of `held_out_count` never appear in the training text: the
evaluation text is drawn from another seed and holds those sums.
"""

from __future__ import annotations

import numpy as np

DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december")
MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # a common year
CAPITALS = (("france", "paris"), ("italy", "rome"), ("spain", "madrid"), ("germany", "berlin"),
            ("japan", "tokyo"), ("egypt", "cairo"), ("peru", "lima"), ("kenya", "nairobi"),
            ("norway", "oslo"), ("greece", "athens"), ("china", "beijing"), ("canada", "ottawa"))
COLORS = (("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("a lemon", "yellow"),
          ("a tomato", "red"), ("an orange", "orange"), ("a plum", "purple"))
SOUNDS = (("a dog", "woof"), ("a cat", "meow"), ("a cow", "moo"), ("a duck", "quack"), ("a sheep", "baa"),
          ("an owl", "hoot"))
MAX_NUMBER = 99  # counting and sums stay below 100: each number is one token of the tokenizer


def held_out_sum(a: int, b: int) -> bool:
    """Sums of one digit each kept out of the training text (14 pairs of 100), to see whether addition
    generalizes."""
    return (3 * a + 5 * b) % 7 == 0


def held_out_count(start: int, stop: int) -> bool:
    """Counts kept out of the training text: from 1, 11, 21, ... eighteen steps on (the demo's prompt is one)."""
    return start % 10 == 1 and stop - start == 18


def _count(rng) -> str:
    while True:
        start = int(rng.integers(0, 80))
        stop = int(min(MAX_NUMBER, start + rng.integers(4, 20)))
        if not held_out_count(start, stop):
            break
    return f"counting from {start} to {stop}: " + ", ".join(map(str, range(start, stop + 1))) + "."


def _week(rng) -> str:
    first = int(rng.integers(7))
    return "the week from " + DAYS[first] + ": " + ", ".join(DAYS[(first + i) % 7] for i in range(7)) + "."


def _day_after(rng) -> str:
    d = int(rng.integers(7))
    if rng.integers(2):
        return f"the day after {DAYS[d]} is {DAYS[(d + 1) % 7]}."
    return f"the day before {DAYS[d]} is {DAYS[d - 1]}."


def _year(rng) -> str:
    first = int(rng.integers(12))
    return "the months from " + MONTHS[first] + ": " + ", ".join(MONTHS[(first + i) % 12] for i in range(12)) + "."


def _date(rng) -> str:
    m = int(rng.integers(12))
    d = int(rng.integers(1, MONTH_DAYS[m] + 1))
    nm, nd = (m, d + 1) if d < MONTH_DAYS[m] else ((m + 1) % 12, 1)
    return f"the day after {MONTHS[m]} {d} is {MONTHS[nm]} {nd}."


def _sum(rng, held_out: bool) -> str:
    while True:
        a, b = (int(x) for x in rng.integers(0, 10, size=2))
        if held_out_sum(a, b) == held_out:
            return f"{a} plus {b} is {a + b}."


def _fact(rng) -> str:
    kind = int(rng.integers(3))
    if kind == 0:
        country, city = CAPITALS[rng.integers(len(CAPITALS))]
        return f"the capital of {country} is {city}."
    if kind == 1:
        thing, color = COLORS[rng.integers(len(COLORS))]
        return f"the color of {thing} is {color}."
    animal, sound = SOUNDS[rng.integers(len(SOUNDS))]
    return f"{animal} says {sound}."


def document(rng, held_out: bool = False) -> str:
    """A few sentences of mixed kinds; `held_out` draws its sums from the held-out pairs."""
    makers = (_count, _week, _day_after, _year, _date, lambda r: _sum(r, held_out), _fact)
    n = int(rng.integers(2, 6))
    return " ".join(makers[int(k)](rng) for k in rng.integers(len(makers), size=n))


def documents(seed: int, count: int, held_out: bool = False) -> list[str]:
    rng = np.random.default_rng(seed)
    return [document(rng, held_out) for _ in range(count)]


# (prompt, the continuation the rules give): none is a training sentence's prefix in full (sums), or each is
# checkable step by step (the chains).
HELD_OUT_PROMPTS = (
    ("counting from 31 to 49: 31, 32, 33,", " 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49."),
    ("the week from thursday: thursday, friday,", " saturday, sunday, monday, tuesday, wednesday."),
    ("the months from october: october, november,",
     " december, january, february, march, april, may, june, july, august, september."),
    ("the day after february 28 is", " march 1."),
    ("the day after june 14 is", " june 15."),
    ("the day before monday is", " sunday."),
    ("the capital of kenya is", " nairobi."),
    ("a duck says", " quack."),
)
# Sums of held-out pairs: whether the model added or remembered shows here (reported, not required).
HELD_OUT_SUMS = (("1 plus 5 is", " 6."), ("7 plus 0 is", " 7."), ("2 plus 3 is", " 5."), ("5 plus 4 is", " 9."))
DEMO_PROMPT = HELD_OUT_PROMPTS[0][0]
