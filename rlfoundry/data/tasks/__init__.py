"""Built-in verifiable tasks with difficulty levels.

Each task makes problems (prompt + answer) at a level, checks a model's response against the answer
(the reward), and renders problems as pre-training text, SFT conversations and RL prompts.
`TASKS` maps the names that `rlfoundry eval --task NAME` accepts to the task objects.
"""

from .arithmetic import Arithmetic
from .base import Problem, Task
from .countdown import Countdown

TASKS: dict[str, Task] = {t.name: t for t in (Arithmetic(), Countdown())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


__all__ = ["Arithmetic", "Countdown", "Problem", "TASKS", "Task", "get_task"]
