"""How the RL trainer lays out a step's samples, timed on stored steps of an RL run: the layout
before session 34 (groups in the order drawn, hindsight-relabelled samples in micro-batches of
their own, one row each) against the current one (`TrainerWorker.train`'s: each relabelled sample
in its group's packed row, groups shortest row first), taking turns in one process. Each side
builds its micro-batches with `make_batches` and runs `policy_loss` forward and backward on the
model of the run's config, one trainer thread. Prints positions computed, median seconds and the
ratio.

    .venv/bin/python benchmarks/bench_rl_packing.py RUN_DIR [--steps 100 150 200 250] [--reps 8]

RUN_DIR: any `rlfoundry rl` run of the tiny model (e.g. runs/demo34); the relabelled samples are
made from its stored groups with the run's `algorithm.hindsight` (2 if it had none).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rlfoundry.buffer.buffer import Buffer  # noqa: E402
from rlfoundry.rl.config import load_rl_config  # noqa: E402
from rlfoundry.rl.policy import make_batches, policy_loss  # noqa: E402
from rlfoundry.rl.workers import TrainerWorker, _after_their_groups, _shortest_first  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 150, 200, 250])
    ap.add_argument("--reps", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_rl_config(str(args.run / "config.yaml"), ["num_trainers=1"])
    if not cfg.algorithm.hindsight:  # a run without relabelling: its config with lambda 2
        cfg = load_rl_config(str(args.run / "config.yaml"), ["num_trainers=1", "algorithm.hindsight=2.0"])
    lam = cfg.algorithm.hindsight
    algo = cfg.algorithm
    worker = TrainerWorker(cfg, str(args.run / "bench_rl_packing"))
    buffer = Buffer(args.run / "buffer.sqlite")
    steps = []
    for step in args.steps:
        groups = buffer.groups(step, ("trained",))
        if not groups:
            sys.exit(f"{args.run}: no trained groups at step {step}")
        # the advantages do not change the cost; the relabelled samples' is lambda, as in training
        steps.append(([(s, 0.5) for g in groups for s in g], [(s, lam) for s in worker._hindsight(groups)]))

    def batches(pairs: list) -> list:
        return make_batches([s for s, _ in pairs], [a for _, a in pairs], algo.micro_batch_size, algo.aggregation,
                            share_prompts=algo.share_prompts) if pairs else []

    # each timed run builds its own layout's micro-batches only, as the trainer does every step
    layouts = {"before": lambda part, relabelled: batches(part) + batches(relabelled),
               "now": lambda part, relabelled: batches(_shortest_first(_after_their_groups(part, relabelled),
                                                                       algo.share_prompts))}

    def run(name: str) -> float:
        t0 = time.perf_counter()
        for part, relabelled in steps:
            for b in layouts[name](part, relabelled):
                loss, _ = policy_loss(worker.policy, b, algo, cfg.rollout.temperature)
                (loss * b.weight).backward()
        worker.model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    positions = {k: sum(b.num_tokens for part, relabelled in steps for b in layout(part, relabelled))
                 for k, layout in layouts.items()}
    n_rel = sum(len(r) for _, r in steps)
    n = sum(len(p) for p, _ in steps)
    print(f"{len(steps)} steps of {args.run}: {n} samples, {n_rel} relabelled (lambda {lam})")
    run("before"), run("now")  # warm-up
    times: dict[str, list[float]] = {"before": [], "now": []}
    for _ in range(args.reps):
        for k in times:
            times[k].append(run(k))
    for k, v in times.items():
        print(f"{k:>6}: {positions[k]:6d} positions, {statistics.median(v):.3f} s (median of {len(v)})")
    print(f"now / before: positions {positions['now'] / positions['before']:.3f}, "
          f"time {statistics.median(times['now']) / statistics.median(times['before']):.3f}")


if __name__ == "__main__":
    main()
