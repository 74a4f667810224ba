"""What batch invariance costs: plain fp32 against `set_batch_invariant()`, side by side in one run.

The two halves of an RL step on the shipped model, each timed in alternating rounds so that the
machine's drift hits both alike: the engine generating one step's samples (Countdown levels 2 and
3 in the chat template, n per prompt at temperature 1), and the RL loss's forward and backward on
them as the trainer runs it (micro-batches, shared prompts). Prints the medians and the ratio
invariant / plain of each, and the train-inference mismatch of each mode.

    .venv/bin/python benchmarks/bench_batch_invariant.py [--prompts 64 --n 8 --rounds 3 --threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rlfoundry.buffer import PromptDataset  # noqa: E402
from rlfoundry.data.tokenizer import eos_token_ids, load_tokenizer  # noqa: E402
from rlfoundry.model import load_pretrained  # noqa: E402
from rlfoundry.rl.policy import make_batches, sequence_logprobs  # noqa: E402
from rlfoundry.rl.sample import Sample  # noqa: E402
from rlfoundry.rollout.engine import Engine, SamplingParams  # noqa: E402

MODEL = str(Path(__file__).resolve().parents[1] / "examples/tiny/model")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the demo's engines and trainers: 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    half = args.prompts // 2
    sets = [PromptDataset.load(f"task:countdown:{level}", n_per_level=k, seed=20_000)
            for level, k in ((2, half), (3, args.prompts - half))]
    prompts = [ds.token_ids(i, tok) for ds in sets for i in range(len(ds))]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=64, n=args.n)
    modes = {"plain": False, "invariant": True}
    engines = {m: Engine(load_pretrained(args.model), max_batch=args.prompts * args.n,
                         eos_token_ids=eos_token_ids(tok), seed=0, batch_invariant=inv) for m, inv in modes.items()}
    trainers = {m: (load_pretrained(args.model).set_batch_invariant() if inv else load_pretrained(args.model)).train()
                for m, inv in modes.items()}
    gen: dict[str, list[float]] = {m: [] for m in modes}
    train: dict[str, list[float]] = {m: [] for m in modes}
    mismatch: dict[str, float] = {}
    for _ in range(args.rounds):
        for m in modes:
            t0 = time.perf_counter()
            outs = engines[m].generate(prompts, sampling)
            gen[m].append(time.perf_counter() - t0)
            samples = [Sample(prompt_ids=list(p), response_ids=list(o.output_ids), logprobs=list(o.logprobs),
                              loss_mask=[1] * len(o.output_ids)) for p, g in zip(prompts, outs) for o in g]
            batches = make_batches(samples, [1.0] * len(samples), args.micro_batch, "token-mean", share_prompts=True)
            t0 = time.perf_counter()
            worst = 0.0
            for b in batches:
                lp = sequence_logprobs(trainers[m], b, 1.0)[0]
                (lp * b.response_mask[:, 1:]).sum().backward()
                mask = b.response_mask[:, 1:].bool()
                worst = max(worst, float((lp.detach() - b.engine_logprobs[:, 1:])[mask].abs().max()))
            train[m].append(time.perf_counter() - t0)
            mismatch[m] = max(mismatch.get(m, 0.0), worst)
    n = args.prompts * args.n
    print(f"{args.model}: {args.prompts} prompts x {args.n} samples, {args.rounds} rounds, {args.threads} thread(s)")
    for what, times in (("generate", gen), ("RL loss fwd+bwd", train)):
        p, i = statistics.median(times["plain"]), statistics.median(times["invariant"])
        print(f"{what:<16} plain {p:.2f} s ({1e3 * p / n:.2f} ms a sample)  invariant {i:.2f} s "
              f"({1e3 * i / n:.2f} ms a sample)  ratio {i / p:.2f}x")
    print(f"largest train-inference mismatch: plain {mismatch['plain']:.1e}, invariant {mismatch['invariant']:.1e}")


if __name__ == "__main__":
    main()
