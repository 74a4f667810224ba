"""Countdown: combine the given numbers with + - * (each used at most once) to reach the target.
A search task: the answer is any expression that evaluates to the target; level L gives L+1
numbers (levels 1-4), so the search space grows quickly."""

from __future__ import annotations

import ast
import itertools
import random
import warnings
from collections import Counter

from .base import Problem, Task


def _eval(expr: str) -> tuple[int, list[int]] | None:
    """Value and the integer literals of an expression of +, -, * and parentheses; None if it is
    anything else (nothing is executed: the tree is walked by hand)."""
    try:
        with warnings.catch_warnings():  # a response like "3if" warns before it fails to parse
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return None
    nums: list[int] = []

    def walk(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            nums.append(node.value)
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            left, right = walk(node.left), walk(node.right)
            if left is None or right is None:
                return None
            return left + right if isinstance(node.op, ast.Add) else (
                left - right if isinstance(node.op, ast.Sub) else left * right)
        return None

    value = walk(tree)
    return None if value is None else (value, nums)


class Countdown(Task):
    name = "countdown"
    levels = 4

    def make(self, level: int, rng: random.Random) -> Problem:
        n = level + 1
        while True:
            nums = [rng.randint(1, 12) for _ in range(n)]
            ops = [rng.choice("+-*") for _ in range(n - 1)]
            order = nums[:]
            rng.shuffle(order)
            expr = str(order[0])
            for op, x in zip(ops, order[1:]):
                expr = f"({expr} {op} {x})" if op != "*" else f"{expr} * {x}"
            value = _eval(expr)[0]
            if 0 < value <= 200:
                break
        question = self.question(nums, value)
        return Problem(self.name, level, question, str(value), f"<answer>{expr}</answer>",
                       {"numbers": nums, "target": value})

    def _reached(self, response: str, numbers: list[int]) -> int | None:
        """The value of the response's final answer, or None when it is malformed or uses numbers
        it was not given."""
        got = self.final_answer(response)
        result = None if got is None else _eval(got)
        if result is None or Counter(result[1]) - Counter(numbers):
            return None
        return result[0]

    def score(self, response: str, problem: Problem) -> float:
        return float(self._reached(response, problem.metadata["numbers"]) == problem.metadata["target"])

    def hindsight(self, response: str, metadata: dict) -> dict | None:
        """Hindsight relabelling (Andrychowicz et al., 2017, "Hindsight Experience Replay"): a
        well-formed answer that misses the target is a right answer to the problem whose target is
        the value it reaches. Returns that problem's metadata (same numbers, target = the value), or
        None when the answer is right, malformed, uses numbers it was not given, or reaches a value
        outside the task's range (1 - 200)."""
        value = self._reached(response, metadata["numbers"])
        if value is None or value == metadata["target"] or not 0 < value <= 200:
            return None
        return {**metadata, "target": value, "question": self.question(metadata["numbers"], value)}

    @staticmethod
    def question(numbers: list[int], target: int) -> str:
        return f"Using the numbers {numbers}, each at most once, and + - *, make {target}."

    @staticmethod
    def solvable(numbers: list[int], target: int) -> bool:
        """Whether some expression of a subset of `numbers` makes `target` (exhaustive search)."""
        def values(nums):
            if len(nums) == 1:
                yield nums[0]
                return
            for i in range(1, len(nums)):
                for left in set(values(nums[:i])):
                    for right in set(values(nums[i:])):
                        yield from (left + right, left - right, left * right)
        return any(target in set(values(list(perm)))
                   for k in range(1, len(numbers) + 1) for perm in itertools.permutations(numbers, k))
