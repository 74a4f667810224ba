"""Generation functions: how a prompt becomes a sample.

The default sends each engine its share of a round's groups in batched requests (every prompt its
seed; a group's n samples share the prompt's prefill): `RolloutWorker.generate`.
A custom function (`rollout.generate_fn: package.module.function`) is called once per sample:

    async def generate(ctx: GenerateContext, sample: Sample, sampling: dict) -> Sample | list[Sample]

`sample` holds the prompt (prompt_ids, label, metadata, group_id, index); the function fills
response_ids, logprobs (0.0 where the policy did not generate the token), loss_mask (0 for tokens
it did not generate, e.g. tool output in a multi-turn rollout), status and text, and returns it (or
several samples). `sampling` has max_new_tokens, temperature, top_p, stop_token_ids and seed.
`ctx.generate(input_ids, **sampling)` calls the engines through the router with token ids in.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

from rlfoundry.rl.sample import Sample, Status


@dataclass
class GenerateContext:
    client: object          # a RolloutClient (SGLangClient to the router)
    tokenizer: object
    eos_token_ids: list
    executor: object        # thread pool for the blocking HTTP calls

    async def generate(self, input_ids: list[int], client=None, **sampling):
        """One engine call (n=1 unless given): a list of rlfoundry.rollout.client.Generation.
        `client` overrides the router client (e.g. one engine)."""
        sampling.setdefault("n", 1)
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, functools.partial((client or self.client).generate, list(input_ids), **sampling))


def finish_status(reason: str) -> Status:
    return {"stop": Status.COMPLETED, "length": Status.TRUNCATED}.get(reason, Status.ABORTED)


async def single_turn(ctx: GenerateContext, sample: Sample, sampling: dict) -> Sample:
    """The default, per sample: one generation continuing the prompt."""
    g = (await ctx.generate(sample.prompt_ids, **sampling))[0]
    sample.response_ids, sample.logprobs = g.output_ids, g.logprobs
    sample.loss_mask = [1] * len(g.output_ids)
    sample.status = finish_status(g.finish_reason)
    sample.routed_experts = g.routed_experts
    sample.text = ctx.tokenizer.decode(g.output_ids, skip_special_tokens=True)
    return sample
