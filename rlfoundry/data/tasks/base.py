"""The task interface."""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass, field

ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S)

HELD_OUT_ONE_IN = 10
"""One question in HELD_OUT_ONE_IN, chosen by a hash of its text, is held out: training data
(pre-training, SFT, RL prompts) never contains it, held-out sets contain nothing else. Seeds alone
do not keep sets apart where a level has few distinct questions (Countdown level 2: ~12K; 19% of
a 100-problem held-out draw had been among the 3000 pre-training problems, 11% among the RL prompts)."""


HELD_OUT_SEED = 10_000
"""Held-out sets (`rlfoundry eval`, RL's evaluation, the benchmarks' task prompts) draw with seed
HELD_OUT_SEED + their own seed."""


def is_held_out(question: str) -> bool:
    """Whether a question belongs to the held-out share (stable across runs and machines)."""
    return zlib.crc32(question.encode()) % HELD_OUT_ONE_IN == 0


@dataclass
class Problem:
    task: str
    level: int
    question: str            # what the user asks
    answer: str              # the reference answer (what a checker compares against)
    solution: str            # a worked solution ending in <answer>...</answer> (for SFT / pre-training)
    metadata: dict = field(default_factory=dict)


class Task:
    """A family of problems with `levels` difficulty levels (1 = easiest)."""

    name = ""
    levels = 1

    def make(self, level: int, rng: random.Random) -> Problem:
        raise NotImplementedError

    def score(self, response: str, problem: Problem) -> float:
        """1.0 for a correct final answer in <answer>...</answer>, else 0.0."""
        raise NotImplementedError

    def hindsight(self, response: str, metadata: dict) -> dict | None:
        """The metadata (with "question") of a problem that `response`, wrong for the problem of
        `metadata`, answers rightly; None where there is none (the default: no relabelling)."""
        return None

    # ---------------------------------------------------------------- shared helpers
    def problems(self, n: int, level: int, seed: int = 0, held_out: bool = False) -> list[Problem]:
        """n problems of a level drawn with `seed` (repeats possible), from the training share of
        the questions, or with `held_out` from the held-out share (`is_held_out`)."""
        if not 1 <= level <= self.levels:
            raise ValueError(f"{self.name}: level must be in 1..{self.levels}, got {level}")
        rng = random.Random(f"{self.name}:{level}:{seed}")
        out: list[Problem] = []
        for draws in range(1, 100 * n + 10_000 + 1):
            if len(out) == n:
                break
            p = self.make(level, rng)
            if is_held_out(p.question) == held_out:
                out.append(p)
        if len(out) < n:  # a level with (almost) no questions in the asked share would loop forever
            share = "held-out" if held_out else "training"
            raise ValueError(f"{self.name}: level {level} gave {len(out)} of {n} {share} problems in {draws} draws; "
                             f"its questions are too few for a {share} share (is_held_out: one in {HELD_OUT_ONE_IN})")
        return out

    @staticmethod
    def final_answer(response: str) -> str | None:
        """The content of the last <answer>...</answer> in a response, or None."""
        found = ANSWER_RE.findall(response)
        return found[-1].strip() if found else None

    def pretrain_text(self, p: Problem) -> str:
        return f"Question: {p.question}\nSolution: {p.solution}\n"

    def sft_messages(self, p: Problem) -> list[dict]:
        return [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.solution}]

    def rl_record(self, p: Problem) -> dict:
        """A prompt record in slime's format: prompt (as messages), label, metadata."""
        return {"prompt": [{"role": "user", "content": p.question}], "label": p.answer,
                "metadata": {"task": p.task, "level": p.level, **p.metadata}}
