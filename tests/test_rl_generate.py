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
    """An engine's client: records the prompts and seeds of every batched request and counts the
    sequences in flight at once, each request held for 50 ms (so that a second one sent before
    it returned would be counted with it)."""

    def __init__(self):
        self.cond, self.now, self.most, self.calls = threading.Condition(), 0, 0, []

    def generate_batch(self, prompts, seeds, max_new_tokens, n=1, **sampling):
        self.calls.append((prompts, seeds))
        with self.cond:
            self.now += len(prompts) * n
            self.most = max(self.most, self.now)
            self.cond.wait(0.05)
            self.now -= len(prompts) * n
        return [[Generation(output_ids=[s % 7], logprobs=[-1.0], finish_reason="stop") for _ in range(n)]
                for s in seeds]


def test_groups_go_to_the_engines_in_batches_counted_in_sequences(tmp_path):
    """Without a custom generate function each engine takes every num_engines-th group, in batched
    requests of at most concurrency x n_samples_per_prompt / num_engines sequences (each prompt
    with its own seed), one request at a time an engine; the groups come back in the requests'
    order. Evaluation's one greedy sample a prompt fills requests of as many sequences."""
    cfg = load_rl_config(None, ["rollout.concurrency=4", "rollout.n_samples_per_prompt=8"])
    worker = RolloutWorker(cfg, str(tmp_path))
    try:
        reqs = [{"group_id": i, "prompt_idx": i, "prompt_ids": [3, 4, 5 + i], "label": "1",
                 "metadata": {"task": "countdown", "level": 1, "numbers": [1, 2], "target": 3}, "seed": 100 + i,
                 "version": 0} for i in range(64)]
        for greedy, n, per_request in ((False, None, 2), (True, 1, 16), (False, 2, 8)):
            worker.engines = engines = [_Counting(), _Counting()]  # two engines, 16 sequences each at most
            groups = asyncio.run(worker.generate(reqs, greedy, n))
            assert [len(g) for g in groups] == [n or 8] * 64
            assert [g[0]["group_id"] for g in groups] == list(range(64))
            assert all(s["response_ids"] == [(100 + i) % 7] for i, g in enumerate(groups) for s in g)
            for j, e in enumerate(engines):
                assert [len(p) for p, _ in e.calls] == [per_request] * (32 // per_request), (greedy, n)
                assert [p for call, _ in e.calls for p in call] == [q["prompt_ids"] for q in reqs[j::2]]
                assert [s for _, seeds in e.calls for s in seeds] == [q["seed"] for q in reqs[j::2]]
                assert e.most == 16, (greedy, n)  # one request in flight an engine
    finally:
        worker.shutdown()


def test_batched_requests_give_the_samples_of_one_request_a_group(tmp_path):
    """Batch-invariant engines: a group's samples are the same bits whether it reaches an engine in
    a batched request with others (each prompt its seed) or alone through the router."""
    from rlfoundry.rollout.client import RolloutClient

    cfg = load_rl_config(None, ["batch_invariant=true", "rollout.num_engines=2", "rollout.n_samples_per_prompt=4",
                                "rollout.max_new_tokens=12", "rollout.temperature=1.0"])
    worker = RolloutWorker(cfg, str(tmp_path))
    try:
        reqs = [{"group_id": i, "prompt_idx": i, "prompt_ids": [3 + i, 4, 5, 6 + 2 * i][: 2 + i % 3], "label": "1",
                 "metadata": {"task": "countdown", "level": 1, "numbers": [1, 2], "target": 3}, "seed": 7 * i,
                 "version": 0} for i in range(7)]
        batched = asyncio.run(worker.generate(reqs))
        params = dict(max_new_tokens=12, temperature=1.0, top_p=1.0, n=4, stop_token_ids=worker.eos)
        alone = [[s.to_dict() for s in worker._samples(q, worker.client.generate(q["prompt_ids"], seed=q["seed"], **params))]
                 for q in reqs]
        # the base class's form (one call a prompt, as for vLLM's servers) gives them too
        default = RolloutClient.generate_batch(worker.engines[0], [q["prompt_ids"] for q in reqs],
                                               [q["seed"] for q in reqs], **params)
    finally:
        worker.shutdown()
    key = [[(s["response_ids"], s["logprobs"]) for s in g] for g in alone]
    assert [[(s["response_ids"], s["logprobs"]) for s in g] for g in batched] == key
    assert [[(g.output_ids, g.logprobs) for g in gs] for gs in default] == key
    assert len({tuple(s["response_ids"]) for g in batched for s in g}) > 7  # sampled, not one answer
    assert all(s["reward"] is not None for g in batched for s in g)


class _Failing:
    """An engine whose batched requests fail (the server went away mid-round)."""

    def generate_batch(self, prompts, seeds, max_new_tokens, n=1, **sampling):
        raise ConnectionError("engine at http://127.0.0.1:1 went away")


def test_a_failed_batch_keeps_its_groups_as_failed_and_the_others_are_kept(tmp_path):
    """One engine's request fails: its groups come back failed (every sample, with the error, not
    scored), in their places; the other engine's groups are generated and scored as usual."""
    cfg = load_rl_config(None, ["rollout.n_samples_per_prompt=2"])
    worker = RolloutWorker(cfg, str(tmp_path))
    try:
        reqs = [{"group_id": i, "prompt_idx": i, "prompt_ids": [3, 4, 5 + i], "label": "1",
                 "metadata": {"task": "countdown", "level": 1, "numbers": [1, 2], "target": 3}, "seed": i,
                 "version": 0} for i in range(6)]
        worker.engines = [_Counting(), _Failing()]
        groups = asyncio.run(worker.generate(reqs))
    finally:
        worker.shutdown()
    assert [g[0]["group_id"] for g in groups] == list(range(6)) and all(len(g) == 2 for g in groups)
    for i, g in enumerate(groups):
        if i % 2:
            assert all(s["status"] == "failed" and "went away" in s["metadata"]["error"] and s["reward"] is None
                       for s in g)
        else:
            assert all(s["status"] == "completed" and s["reward"] is not None for s in g)


async def boom(ctx, sample: Sample, sampling: dict) -> Sample:
    raise RuntimeError("the tool server is down")


def test_a_custom_generate_function_that_raises_fails_its_group_only(tmp_path):
    cfg = load_rl_config(None, ["rollout.generate_fn=test_rl_generate.boom", "rollout.n_samples_per_prompt=3"])
    worker = RolloutWorker(cfg, str(tmp_path))
    try:
        req = {"group_id": 2, "prompt_idx": 0, "prompt_ids": [3, 4], "label": "1", "metadata": {"level": 1},
               "seed": 1, "version": 0}
        (group,) = asyncio.run(worker.generate([req]))
    finally:
        worker.shutdown()
    assert [s["index"] for s in group] == [0, 1, 2]
    assert all(s["status"] == "failed" and s["metadata"] == {"level": 1, "error": "the tool server is down"}
               and s["group_id"] == 2 for s in group)
