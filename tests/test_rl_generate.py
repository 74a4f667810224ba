"""Custom generate functions: a two-turn rollout with a tool reply in the middle, through the real
engine and sglang-router (RolloutWorker without Ray)."""

import asyncio
import threading

from rlfoundry.rl.config import load_rl_config
from rlfoundry.rl.sample import Sample
from rlfoundry.rl.workers import RolloutWorker
from rlfoundry.rollout.client import Generation

TOOL = [7, 8, 9]


async def two_turns(ctx, sample: Sample, sampling: dict) -> Sample:
    """Generate, append a 'tool reply' (not trained on), generate again."""
    first = (await ctx.generate(sample.prompt_ids, **(sampling | {"max_new_tokens": 4})))[0]
    ids = sample.prompt_ids + first.output_ids + TOOL
    second = (await ctx.generate(ids, **(sampling | {"max_new_tokens": 4})))[0]
    sample.response_ids = first.output_ids + TOOL + second.output_ids
    sample.logprobs = first.logprobs + [0.0] * len(TOOL) + second.logprobs
    sample.loss_mask = [1] * len(first.output_ids) + [0] * len(TOOL) + [1] * len(second.output_ids)
    sample.text = ctx.tokenizer.decode(sample.response_ids)
    return sample


def test_custom_multi_turn_generate(tmp_path):
    cfg = load_rl_config(None, ["rollout.generate_fn=test_rl_generate.two_turns", "rollout.n_samples_per_prompt=3"])
    worker = RolloutWorker(cfg, str(tmp_path))
    try:
        req = {"group_id": 5, "prompt_idx": 0, "prompt_ids": [3, 4, 5, 6], "label": "1",
               "metadata": {"task": "countdown", "level": 1, "numbers": [1, 2], "target": 3}, "seed": 11,
               "version": 0}
        (group,) = asyncio.run(worker.generate([req]))
    finally:
        worker.shutdown()
    assert [s["index"] for s in group] == [0, 1, 2]
    for s in group:
        n1 = s["loss_mask"].index(0)
        assert s["response_ids"][n1:n1 + 3] == TOOL and s["loss_mask"][n1:n1 + 3] == [0, 0, 0]
        assert len(s["logprobs"]) == len(s["response_ids"]) == len(s["loss_mask"])
        assert s["reward"] is not None and s["group_id"] == 5


class _Counting:
    """A client standing in for the router: counts the calls in flight at once, each held until
    `expect` are (or 5 s have passed), so that the count does not depend on the machine's speed."""

    def __init__(self, expect: int):
        self.cond, self.expect, self.now, self.most = threading.Condition(), expect, 0, 0

    def generate(self, input_ids, n=1, **sampling):
        with self.cond:
            self.now += 1
            self.most = max(self.most, self.now)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.most >= self.expect, timeout=5)
            self.now -= 1
        return [Generation(output_ids=[0], logprobs=[-1.0], finish_reason="stop") for _ in range(n)]


def test_requests_in_flight_are_counted_in_sequences(tmp_path):
    """rollout.concurrency groups of n_samples_per_prompt in flight: requests of one sample each
    (evaluation's) come in as many sequences' worth, not one request per group's place (64 at a
    time left each engine decoding 32 sequences)."""
    cfg = load_rl_config(None, ["rollout.concurrency=4", "rollout.n_samples_per_prompt=8"])
    worker = RolloutWorker(cfg, str(tmp_path))
    try:
        reqs = [{"group_id": i, "prompt_idx": i, "prompt_ids": [3, 4, 5], "label": "1",
                 "metadata": {"task": "countdown", "level": 1, "numbers": [1, 2], "target": 3}, "seed": i,
                 "version": 0} for i in range(64)]
        for greedy, n, most in ((False, None, 4), (True, 1, 32), (False, 2, 16)):
            worker.ctx.client = client = _Counting(most)
            groups = asyncio.run(worker.generate(reqs, greedy, n))
            assert [len(g) for g in groups] == [n or 8] * 64
            assert client.most == most, (greedy, n)
    finally:
        worker.shutdown()
