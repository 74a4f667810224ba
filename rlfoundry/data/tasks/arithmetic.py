"""Multi-digit arithmetic: level L adds (levels 1-3) or multiplies (levels 4-5) numbers of more
digits. The worked solution writes the column-wise addition from the right (the carries a small
model needs to see); multiplication is answered directly, which is why it is hard."""

from __future__ import annotations

import random

from .base import Problem, Task

# level -> (operation, digits of each operand)
LEVELS = {1: ("+", 1), 2: ("+", 2), 3: ("+", 3), 4: ("*", 2), 5: ("*", 3)}


class Arithmetic(Task):
    name = "arithmetic"
    levels = len(LEVELS)

    def make(self, level: int, rng: random.Random) -> Problem:
        op, digits = LEVELS[level]
        lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        result = a + b if op == "+" else a * b
        if op == "+":
            steps, carry = [], 0
            da, db = str(a)[::-1], str(b)[::-1]
            for i in range(max(len(da), len(db))):
                x = int(da[i]) if i < len(da) else 0
                y = int(db[i]) if i < len(db) else 0
                s = x + y + carry
                steps.append(f"{x}+{y}+{carry}={s}")
                carry = s // 10
            work = ", ".join(steps) + ". "
        else:
            work = ""
        return Problem(self.name, level, f"What is {a} {op} {b}?", str(result),
                       f"{work}<answer>{result}</answer>", {"a": a, "b": b, "op": op})

    def score(self, response: str, problem: Problem) -> float:
        got = self.final_answer(response)
        return float(got is not None and got.replace(",", "").lstrip("+") == problem.answer)
