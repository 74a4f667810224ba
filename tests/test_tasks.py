"""Built-in tasks: problems are deterministic per seed, solutions score 1, wrong answers 0."""

import pytest

from rlfoundry.data.tasks import TASKS, Countdown, get_task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_reference_solutions_score_one_and_wrong_answers_zero(name):
    task = get_task(name)
    for level in range(1, task.levels + 1):
        problems = task.problems(20, level, seed=1)
        assert problems == task.problems(20, level, seed=1)            # deterministic
        assert problems != task.problems(20, level, seed=2)
        for p in problems:
            assert task.score(p.solution, p) == 1.0, p
            assert task.score("no answer here", p) == 0.0
            assert task.score(f"<answer>{int(p.answer) + 1}</answer>", p) == 0.0
        record = task.rl_record(problems[0])
        assert record["label"] == problems[0].answer and record["prompt"][0]["role"] == "user"
    with pytest.raises(ValueError, match="level must be in"):
        task.problems(1, task.levels + 1)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_held_out_questions_never_appear_in_training_draws(name):
    """One question in HELD_OUT_ONE_IN (by hash) is held out: any number of training draws, of any
    seed, shares no question with any held-out draw, and each share is about its expected size."""
    from rlfoundry.data.tasks.base import HELD_OUT_ONE_IN, is_held_out

    task = get_task(name)
    for level in range(1, task.levels + 1):
        train = {p.question for seed in (0, 1, 1000) for p in task.problems(500, level, seed=seed)}
        held = task.problems(200, level, seed=10_000, held_out=True)
        assert not train & {p.question for p in held}
        assert all(is_held_out(p.question) for p in held) and not any(map(is_held_out, train))
    import random

    rng = random.Random(0)
    drawn = [task.make(task.levels, rng).question for _ in range(2000)]
    assert abs(sum(map(is_held_out, drawn)) / len(drawn) - 1 / HELD_OUT_ONE_IN) < 0.03


def test_a_level_without_held_out_questions_is_an_error_not_a_hang():
    from rlfoundry.data.tasks.base import Problem, Task, is_held_out

    class OneQuestion(Task):
        name, levels = "one", 1

        def make(self, level, rng):
            return Problem("one", level, "q0", "0", "<answer>0</answer>")

    assert not is_held_out("q0")
    assert len(OneQuestion().problems(3, 1)) == 3
    with pytest.raises(ValueError, match="one: level 1 gave 0 of 2 held-out problems"):
        OneQuestion().problems(2, 1, held_out=True)


def test_arithmetic_checks_by_value():
    task = get_task("arithmetic")
    p = task.problems(1, 2, seed=3)[0]
    assert task.score(f"thinking... <answer>1</answer> no wait <answer>{p.answer}</answer>", p) == 1.0
    assert p.metadata["a"] + p.metadata["b"] == int(p.answer)


def test_countdown_accepts_any_valid_expression_and_rejects_cheats():
    task = Countdown()
    p = task.problems(1, 2, seed=0)[0]
    a, b, c = p.metadata["numbers"]
    target = p.metadata["target"]
    assert task.score(f"<answer>{target}</answer>", p) == float(target in (a, b, c))  # a bare number only if given
    assert task.score("<answer>__import__('os')</answer>", p) == 0.0
    assert task.score(f"<answer>{a} + {a} + {a} + {a} + {a}</answer>", p) == float(
        5 * a == target and p.metadata["numbers"].count(a) >= 5)
    alt = type(p)(p.task, p.level, p.question, p.answer, p.solution, {"numbers": [2, 3, 4], "target": 10})
    assert task.score("<answer>2 * 3 + 4</answer>", alt) == 1.0
    assert task.score("<answer>4 * 3 - 2</answer>", alt) == 1.0
    assert task.score("<answer>2 * 5</answer>", alt) == 0.0       # 5 is not given
    assert Countdown.solvable([2, 3, 4], 10) and not Countdown.solvable([1, 1], 50)
    import warnings

    with warnings.catch_warnings(record=True) as seen:  # a response Python's parser warns about
        warnings.simplefilter("always")                   # scores 0, quietly
        assert task.score("<answer>3if 4</answer>", alt) == 0.0
    assert not seen


def test_countdown_hindsight_relabels_a_wrong_answer_as_the_right_one_for_the_value_it_reaches():
    """Hindsight relabelling (algorithm.hindsight): a well-formed wrong answer becomes the right
    answer to the problem with the same numbers whose target is its value — which then scores 1 —
    and nothing else is relabelled."""
    task = Countdown()
    meta = {"task": "countdown", "level": 2, "numbers": [4, 2, 2], "target": 8,
            "question": Countdown.question([4, 2, 2], 8)}
    new = task.hindsight("<answer>(2 * 4 + 2)</answer>", meta)
    assert new == {**meta, "target": 10, "question": "Using the numbers [4, 2, 2], each at most once, and + - *, make 10."}
    p = task.problems(1, 2, seed=0)[0]
    assert p.question == Countdown.question(p.metadata["numbers"], p.metadata["target"])  # the same wording
    relabelled = type(p)(p.task, p.level, new["question"], "10", "", new)
    assert task.score("<answer>(2 * 4 + 2)</answer>", relabelled) == 1.0
    assert task.hindsight("<answer>2 * 4</answer>", meta) is None           # right: nothing to relabel
    assert task.hindsight("<answer>4 * 4 - 2</answer>", meta) is None       # a number not given twice
    assert task.hindsight("<answer>2 - 4</answer>", meta) is None           # out of the task's range
    assert task.hindsight("<answer>4 ** 2</answer>", meta) is None          # malformed
    assert task.hindsight("no answer", meta) is None
    assert get_task("arithmetic").hindsight("<answer>3</answer>", {"task": "arithmetic"}) is None  # no relabelling
