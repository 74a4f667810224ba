"""Rewards: `async def reward(ctx, sample) -> float | dict[str, float]` (or a group form
`async def reward(ctx, samples) -> list[...]` marked with `@group_reward`).

Built in (by name): "task" (the built-in tasks' checkers), "exact_match", "math" (math-verify, with a
timeout that works off the main thread), "code" (the response's code run against the label's tests
in a sandboxed subprocess), "remote" (a reward model over HTTP). Anything else is a dotted path to
your own function, `package.module.function` or `package.module:function`.

A dict result names components; its "reward" key (or else the sum of the components) is the scalar
the advantage uses. `combine` adds the format penalty and DAPO's overlong penalty.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from rlfoundry.rewards.code import run_code_tests
from rlfoundry.rewards.math import math_verify_score
from rlfoundry.rl.sample import Sample

RewardFn = Callable[["RewardContext", Sample], Awaitable[Any]]


@dataclass
class RewardContext:
    """What a reward function may use."""
    remote_url: str = ""
    """URL of a reward model for "remote" (POST {prompt_ids, response, label, metadata} -> {"reward": x})."""
    timeout_s: float = 10.0
    """Time limit of one math check, code run or remote call."""
    memory_mb: int = 512
    """Memory limit of sandboxed code."""
    extra: dict = field(default_factory=dict)
    """Free-form settings for custom functions (the config's reward.extra)."""


def group_reward(fn):
    """Mark an async function as a group reward: it receives the list of a prompt's samples."""
    fn.is_group_reward = True
    return fn


async def task_reward(ctx: RewardContext, sample: Sample) -> dict:
    """The built-in task's checker (the sample's metadata names the task and holds the problem)."""
    from rlfoundry.data.tasks import Problem, get_task

    meta = dict(sample.metadata)
    task = get_task(meta.pop("task"))
    problem = Problem(task.name, meta.pop("level", 0), meta.pop("question", ""), str(sample.label), "", meta)
    return {"correct": task.score(sample.text, problem)}


async def exact_match_reward(ctx: RewardContext, sample: Sample) -> dict:
    """1 when the final answer (in <answer>...</answer>, else the whole response) equals the label."""
    from rlfoundry.data.tasks.base import Task

    got = Task.final_answer(sample.text)
    got = sample.text.strip() if got is None else got
    return {"correct": float(got == str(sample.label).strip())}


async def math_reward(ctx: RewardContext, sample: Sample) -> dict:
    return {"correct": await asyncio.to_thread(math_verify_score, sample.text, str(sample.label), ctx.timeout_s)}


async def code_reward(ctx: RewardContext, sample: Sample) -> dict:
    """1 when the response's last ```python block passes the label's test code."""
    ok = await asyncio.to_thread(run_code_tests, sample.text, str(sample.label), ctx.timeout_s, ctx.memory_mb)
    return {"correct": float(ok)}


async def remote_reward(ctx: RewardContext, sample: Sample) -> dict:
    if not ctx.remote_url:
        raise ValueError("reward 'remote' needs reward.remote_url")

    def call() -> float:
        body = json.dumps({"prompt_ids": sample.prompt_ids, "response": sample.text, "label": sample.label,
                           "metadata": sample.metadata}).encode()
        req = urllib.request.Request(ctx.remote_url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=ctx.timeout_s) as r:
            return float(json.loads(r.read())["reward"])

    return {"reward": await asyncio.to_thread(call)}


BUILTIN: dict[str, RewardFn] = {"task": task_reward, "exact_match": exact_match_reward, "math": math_reward,
                                "code": code_reward, "remote": remote_reward}


def load_function(spec: str, kind: str = "function"):
    """A callable from `package.module.name` or `package.module:name`; errors name the spec."""
    module, sep, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module or not name:
        raise ValueError(f"{kind} {spec!r}: expected package.module.function or package.module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{kind} {spec!r}: cannot load it ({e})") from None
    if not callable(fn):
        raise ValueError(f"{kind} {spec!r} is not callable")
    return fn


def load_reward(spec: str) -> RewardFn:
    fn = BUILTIN.get(spec) or load_function(spec, "reward")
    if not asyncio.iscoroutinefunction(fn):
        raise ValueError(f"reward {spec!r} must be an async function (async def reward(ctx, sample))")
    return fn


def has_answer_format(text: str) -> bool:
    from rlfoundry.data.tasks.base import ANSWER_RE

    return ANSWER_RE.search(text) is not None


def scalar(result: Any) -> tuple[float, dict[str, float]]:
    """(scalar reward, components) of a reward function's result."""
    if isinstance(result, dict):
        comps = {k: float(v) for k, v in result.items()}
        return comps.get("reward", sum(v for k, v in comps.items() if k != "reward")), comps
    return float(result), {"reward": float(result)}


async def score_samples(fn: RewardFn, ctx: RewardContext, samples: list[Sample], format_penalty: float = 0.0,
                        overlong: tuple[int, int] | None = None) -> None:
    """Fill sample.reward and sample.rewards in place (a failing function marks the sample failed):
    the function's reward, plus `format_penalty` (<= 0) when no <answer> tag, plus the overlong penalty
    (max_len, cache_len)."""
    from rlfoundry.rl.algorithms import overlong_penalty
    from rlfoundry.rl.sample import Status

    if getattr(fn, "is_group_reward", False):
        results = await fn(ctx, samples)
    else:
        results = await asyncio.gather(*(fn(ctx, s) for s in samples), return_exceptions=True)
    for s, res in zip(samples, results):
        if isinstance(res, BaseException):
            s.status, s.reward = Status.FAILED, 0.0
            s.metadata["reward_error"] = f"{type(res).__name__}: {res}"
            continue
        value, comps = scalar(res)
        if format_penalty and not has_answer_format(s.text):
            comps["format"] = format_penalty
            value += format_penalty
        if overlong is not None:
            pen = overlong_penalty(len(s.response_ids), *overlong)
            if pen:
                comps["overlong"] = pen
                value += pen
        s.reward, s.rewards = value, comps
