"""Training throughput of the tiny GLM-4.5 model: 1 process against 2 processes with FSDP2 + expert
parallelism (rlfoundry/model/parallelize.py, gloo on CPU), the same global batch, Muon, MTP and
balance losses on; prints tokens/s of each and their ratio.

    .venv/bin/python benchmarks/bench_train.py [--steps 10] [--batch 16] [--seq 256]

On this 2-core machine the 1-process run uses both cores (2 threads) and each of the 2 processes
one, so the ratio measures the cost of the collectives, not a speed-up from more hardware.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rlfoundry.model import Glm4MoeForCausalLM, ModelConfig  # noqa: E402
from rlfoundry.train.distributed import spawn  # noqa: E402
from rlfoundry.train.trainer import Batch, TrainConfig, Trainer  # noqa: E402


def run(rank: int, world: int, steps: int, batch: int, seq: int, threads: int) -> dict:
    from rlfoundry.model.parallelize import parallelize

    torch.set_num_threads(threads)
    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(cfg)
    model.init_weights(seed=0)
    if world > 1:
        parallelize(model)
    trainer = Trainer(model, TrainConfig(total_steps=steps + 2))
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (steps + 2, batch, seq), generator=g)
    rows = slice(rank * batch // world, (rank + 1) * batch // world)
    for s in range(2):  # warm-up
        trainer.train_step([Batch(data[s, rows])])
    t0 = time.perf_counter()
    tokens = 0
    for s in range(2, steps + 2):
        tokens += trainer.train_step([Batch(data[s, rows])])["tokens"]
    return {"tokens_per_s": tokens / (time.perf_counter() - t0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    cores = torch.get_num_threads()
    one = run(0, 1, args.steps, args.batch, args.seq, cores)["tokens_per_s"]
    two = spawn(run, 2, args.steps, args.batch, args.seq, max(1, cores // 2))["tokens_per_s"]
    print(f"tiny model, global batch {args.batch} x {args.seq}, {args.steps} steps, {cores} cores")
    print(f"1 process            : {one:8.0f} tokens/s")
    print(f"2 processes FSDP2+EP : {two:8.0f} tokens/s   ({two / one:.2f}x of 1 process)")


if __name__ == "__main__":
    main()
