"""`rlfoundry eval`: accuracy of a checkpoint on a built-in task, generating with our engine."""

from __future__ import annotations

from pathlib import Path


from rlfoundry.data.tasks import get_task
from rlfoundry.data.tasks.base import HELD_OUT_SEED
from rlfoundry.data.tokenizer import eos_token_ids, load_tokenizer
from rlfoundry.model import load_pretrained
from rlfoundry.rollout.engine import Engine, SamplingParams


def evaluate(model_path: str | Path, task_name: str, levels: list[int] | None = None, n: int = 100, seed: int = 0,
             max_new_tokens: int = 96, temperature: float = 0.0, engine: Engine | None = None,
             tokenizer=None) -> dict:
    """Greedy (by default) accuracy per level; `engine`/`tokenizer` reuse loaded ones."""
    task = get_task(task_name)
    tokenizer = tokenizer or load_tokenizer(model_path)
    if tokenizer is None:
        raise ValueError(f"{model_path}: no tokenizer")
    if engine is None:
        engine = Engine(load_pretrained(model_path), max_batch=64, eos_token_ids=eos_token_ids(tokenizer))
    per_level = {}
    for level in levels or range(1, task.levels + 1):
        problems = task.problems(n, level, seed=HELD_OUT_SEED + seed, held_out=True)
        prompts = [tokenizer.encode(tokenizer.apply_chat_template(task.sft_messages(p)[:1], add_generation_prompt=True,
                                                                  tokenize=False), add_special_tokens=False)
                   for p in problems]
        params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
        outs = engine.generate(prompts, params)
        scores = [task.score(tokenizer.decode(o[0].output_ids, skip_special_tokens=True), p)
                  for o, p in zip(outs, problems)]
        per_level[level] = sum(scores) / len(scores)
    return {"task": task_name, "n": n, "seed": seed, "accuracy": sum(per_level.values()) / len(per_level),
            "per_level": per_level}
