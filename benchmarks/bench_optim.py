"""Muon (+AdamW for embeddings, head, biases, norms; as GLM-4.5) against AdamW alone: training loss
at equal steps on the tiny model and the same pre-training data, side by side in one run; writes
benchmarks/muon_vs_adamw.png and prints the final losses and their ratio.

    .venv/bin/python benchmarks/bench_optim.py [--steps 150]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rlfoundry.data.datasets import DataStats  # noqa: E402
from rlfoundry.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from rlfoundry.model import Glm4MoeForCausalLM, ModelConfig  # noqa: E402
from rlfoundry.train.stages import StageConfig, _texts, batches_for_step, build_rows  # noqa: E402
from rlfoundry.train.trainer import TrainConfig, Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    cfg = StageConfig(stage="pretrain", seq_len=256, batch_size=16, micro_batch_size=16)
    cfg.data.examples_per_level = 1000
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(_texts(cfg, DataStats()), 512, tmp)
        tok = load_tokenizer(tmp)
        rows, _ = build_rows(cfg, tok)
    curves = {}
    # the same learning rate for both: Muon's update RMS is matched to AdamW's (0.2), so it carries over;
    # no per-optimizer tuning was done
    for name, lr in (("muon", 2e-3), ("adamw", 2e-3)):
        torch.manual_seed(0)
        model = Glm4MoeForCausalLM(ModelConfig.from_preset("tiny"))
        model.init_weights(seed=0)
        trainer = Trainer(model, TrainConfig(optimizer=name, lr=lr, final_lr=lr / 10, warmup_steps=10,
                                             total_steps=args.steps))
        curves[name] = [trainer.train_step(batches_for_step(rows, s, cfg))["loss"] for s in range(args.steps)]
        print(f"{name:>6}: loss at step {args.steps} = {sum(curves[name][-10:]) / 10:.4f} (mean of the last 10)")
    ratio = (sum(curves["adamw"][-10:]) / 10) / (sum(curves["muon"][-10:]) / 10)
    print(f"AdamW / Muon final loss ratio: {ratio:.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        ax.plot(range(1, len(c) + 1), c, label={"muon": "Muon + AdamW (GLM-4.5)", "adamw": "AdamW"}[name])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("tiny GLM-4.5, pre-training on the built-in tasks")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(ROOT / "benchmarks" / "muon_vs_adamw.png", dpi=100)


if __name__ == "__main__":
    main()
