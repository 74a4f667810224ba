"""How a rollout round reaches the engines: one request a group through sglang-router (what the
loop did until session 53, and how slime sends its samples) against each engine's share of the
groups in one batched request (`RolloutWorker.generate` now), side by side in one run.

The demo's layout and settings (`examples/tiny/rl.yaml`: two batch-invariant engine servers of one
thread each behind the router, 8 samples a prompt at temperature 0.8, at most 64 new tokens):
rounds of `--groups` Countdown prompts of levels 2 and 3 (a demo step's first round draws ~60),
generated and scored both ways in alternating rounds, so that the machine's drift hits both alike.
Prints the median seconds a round of each and the ratio, and checks that both ways give the same
samples bit for bit (batch-invariant engines, the same seed for each group).

    .venv/bin/python benchmarks/bench_rollout_requests.py [--groups 60 --rounds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rlfoundry.buffer import PromptDataset  # noqa: E402
from rlfoundry.rl.config import load_rl_config  # noqa: E402
from rlfoundry.rl.workers import RolloutWorker  # noqa: E402

CONFIG = str(Path(__file__).resolve().parents[1] / "examples/tiny/rl.yaml")


async def per_group(worker: RolloutWorker, requests: list[dict]) -> list[list[dict]]:
    """One request a group through the router (n samples sharing its prefill), each group scored
    as soon as it returns: the loop's path until session 53."""
    r = worker.cfg.rollout
    params = dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                  n=r.n_samples_per_prompt, stop_token_ids=worker.eos)

    async def group(req: dict) -> list[dict]:
        gens = await worker.ctx.generate(req["prompt_ids"], seed=req["seed"], **params)
        return await worker._scored(worker._samples(req, gens), True)

    return list(await asyncio.gather(*(group(q) for q in requests)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--groups", type=int, default=60, help="groups a round (a demo step's first round: ~60)")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    cfg = load_rl_config(args.config, [])
    worker = RolloutWorker(cfg, tempfile.mkdtemp(prefix="bench_rollout_requests_"))
    try:
        from rlfoundry.data.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.model)
        half = args.groups // 2
        sets = [PromptDataset.load(f"task:countdown:{level}", n_per_level=args.rounds * k + k, seed=30_000)
                for level, k in ((2, half), (3, args.groups - half))]

        def round_requests(i: int) -> list[dict]:
            reqs = []
            for ds, k in zip(sets, (half, args.groups - half)):
                for j in range(i * k, (i + 1) * k):
                    reqs.append({"group_id": len(reqs), "prompt_idx": j, "prompt_ids": ds.token_ids(j, tok),
                                 "label": ds[j].label, "metadata": ds[j].metadata, "seed": 1000 * i + len(reqs),
                                 "version": 0})
            return reqs

        ways = {"one request a group, router": lambda q: per_group(worker, q),
                "batched, an engine's share": worker.generate}
        asyncio.run(worker.generate(round_requests(args.rounds)))  # warm-up
        times: dict[str, list[float]] = {w: [] for w in ways}
        same = True
        for i in range(args.rounds):
            reqs = round_requests(i)
            got = {}
            for w, fn in (ways.items() if i % 2 == 0 else reversed(ways.items())):
                t0 = time.perf_counter()
                got[w] = asyncio.run(fn(reqs))
                times[w].append(time.perf_counter() - t0)
            a, b = got.values()
            same &= [[(s["response_ids"], s["logprobs"], s["reward"]) for s in g] for g in a] == \
                    [[(s["response_ids"], s["logprobs"], s["reward"]) for s in g] for g in b]
        seqs = args.groups * cfg.rollout.n_samples_per_prompt
        print(f"{args.groups} groups x {cfg.rollout.n_samples_per_prompt} samples a round, "
              f"{cfg.rollout.num_engines} engines, {args.rounds} rounds each way, alternating")
        med = {w: statistics.median(t) for w, t in times.items()}
        for w, m in med.items():
            print(f"  {w:30s} {m:.3f} s a round (min {min(times[w]):.3f}), {1e3 * m / seqs:.3f} ms a sample")
        (a, ma), (b, mb) = med.items()
        print(f"  ratio batched / one a group: {mb / ma:.2f}x the time")
        print(f"  same samples, log-probs and rewards both ways: {same}")
    finally:
        worker.shutdown()


if __name__ == "__main__":
    main()
