"""rlfoundry's RL loop against TRL's GRPOTrainer (transformers' Glm4MoeForCausalLM), side by side in
one run: the same checkpoint (the shipped tiny model), prompts (Countdown level 2, in the same order),
group size, response length, learning rate, clip range and number of steps. Prints samples/s of
each and the ratio, and plots training reward against wall-clock time for both
(benchmarks/rl_vs_trl.png).

    .venv/bin/pip install trl            # not a dependency of rlfoundry
    .venv/bin/python benchmarks/bench_rl_vs_trl.py [--steps 8] [--prompts 8] [--group 8] [--compile-decode] [--compile-train] [--exact]
        [--engines 1] [--trainers 1]

rlfoundry runs `--engines` engine servers behind the router and `--trainers` data-parallel
trainers, the machine's cores shared out among the engines and among the trainers (the demo's
layout on 2 cores is 2 and 2, see examples/tiny/rl.yaml); TRL runs in its one process.

Timing: for TRL, the wall time of trainer.train(); for rlfoundry, the sum of its steps (rollout,
reward, train, weight sync). Each saves one checkpoint that it can resume from (model, optimizer,
schedule) after its last step, inside that time: rlfoundry always does, so TRL does too
(`save_steps` = the step count). The start-up of each (TRL building its trainer, Ray and the engine
server starting) is reported separately.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "examples" / "tiny" / "model"


def countdown_reward(completions, label, metadata, **_):
    """TRL reward function: the built-in Countdown checker on the completion text."""
    from rlfoundry.data.tasks import Problem, get_task

    task = get_task("countdown")
    out = []
    for c, lab, meta in zip(completions, label, metadata):
        text = c[0]["content"] if isinstance(c, list) else c
        meta = dict(meta)
        out.append(task.score(text, Problem("countdown", meta.pop("level"), "", str(lab), "", meta)))
    return out


def run_trl(args, records) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlfoundry.rollout.launch import freeze_heap

    torch.manual_seed(0)
    t_setup = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    model = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32)
    ds = Dataset.from_list([{"prompt": r.prompt, "label": r.label,
                             "metadata": {k: v for k, v in r.metadata.items() if k != "question"}} for r in records])
    n = args.prompts * args.group
    log: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "reward" in logs:
                log.append((time.perf_counter() - self.t0, logs["reward"]))

    with tempfile.TemporaryDirectory() as tmp:
        cfg = GRPOConfig(output_dir=tmp, use_cpu=True, per_device_train_batch_size=n, num_generations=args.group,
                         max_completion_length=args.max_new_tokens, temperature=1.0, learning_rate=args.lr,
                         lr_scheduler_type="constant", warmup_steps=0, beta=0.0, loss_type="dapo", epsilon=0.2,
                         epsilon_high=0.28, max_steps=args.steps, logging_steps=1, report_to="none",
                         save_strategy="steps", save_steps=args.steps, seed=0, disable_tqdm=True, shuffle_dataset=False, weight_decay=0.0,
                         adam_beta2=0.95, max_grad_norm=1.0, bf16=args.bf16)
        trainer = GRPOTrainer(model=model, reward_funcs=countdown_reward, args=cfg, train_dataset=ds,
                              processing_class=tok, callbacks=[Clock()])
        setup = time.perf_counter() - t_setup
        # start-up's heap out of the garbage collector's full passes, as rlfoundry's loop does in each
        # of its processes (`rollout.launch.freeze_heap`)
        freeze_heap()
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        saved = Path(tmp) / f"checkpoint-{args.steps}"
        assert (saved / "optimizer.pt").is_file(), f"TRL saved no resumable checkpoint at {saved}"
    return {"wall_s": wall, "setup_s": setup, "samples": args.steps * n, "curve": log}


def run_rlfoundry(args) -> dict:
    from rlfoundry.rl.config import load_rl_config
    from rlfoundry.rl.loop import run_rl

    cfg = load_rl_config(None, [
        f"steps={args.steps}", f"rollout.prompts_per_step={args.prompts}", f"rollout.n_samples_per_prompt={args.group}",
        f"rollout.max_new_tokens={args.max_new_tokens}", "data.curriculum=[{source: 'task:countdown:2'}]",
        "eval_every=0", f"checkpoint_every={args.steps}", f"train.lr={args.lr}", f"train.final_lr={args.lr}",
        "algorithm.filter_zero_variance=false", f"algorithm.micro_batch_size={args.prompts * args.group}",
        f"rollout.compile_decode={str(args.compile_decode).lower()}", f"rollout.num_engines={args.engines}",
        f"num_trainers={args.trainers}"]
        + (["train.compile=inductor"] if args.compile_train else []) + (["exact=true"] if args.exact else [])
        + (["train.bf16=true"] if args.bf16 else []))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = run_rl(cfg, Path(tmp) / "run")
        total = time.perf_counter() - t0
    steps = [m for m in result["metrics"] if "reward/mean" in m]
    wall = sum(m["time/step_s"] for m in steps)
    print("rlfoundry, seconds a step: " + "; ".join(
        f"{k} " + " ".join(f"{m.get(f'time/{k}_s', 0):.2f}" for m in steps) for k in ("step", "rollout", "generate", "train")))
    curve, t = [], 0.0
    for m in steps:
        t += m["time/step_s"]
        curve.append((t, m["reward/mean"]))
    phases = {k: sum(m.get(f"time/{k}_s", 0.0) for m in steps) / len(steps)
              for k in ("rollout", "generate", "train", "weight_sync", "checkpoint")}
    return {"wall_s": wall, "setup_s": total - wall, "samples": args.steps * args.prompts * args.group,
            "curve": curve, "phases": phases}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--engines", type=int, default=1,
                    help="rlfoundry's engine servers behind the router (the cores shared out among them)")
    ap.add_argument("--trainers", type=int, default=1, help="rlfoundry's data-parallel trainers")
    ap.add_argument("--compile-decode", action="store_true",
                    help="rlfoundry's engine decodes through torch.compile (compiled at start-up)")
    ap.add_argument("--compile-train", action="store_true",
                    help="rlfoundry's trainer runs the model through torch.compile (train.compile=inductor, "
                         "compiled at start-up)")
    ap.add_argument("--bf16", action="store_true",
                    help="both train under bf16 autocast (rlfoundry train.bf16=true, TRL bf16=True); "
                         "rlfoundry's engines still decode in fp32")
    ap.add_argument("--exact", action="store_true",
                    help="rlfoundry with exact=true (fp64 arithmetic on both sides: mismatch 0)")
    args = ap.parse_args()
    from rlfoundry.buffer import PromptDataset
    from rlfoundry.buffer.buffer import Buffer
    from rlfoundry.rl.workers import RL_TASK_SEED

    # the prompts rlfoundry's buffer draws (run seed 0: problems of seed RL_TASK_SEED, buffer order of
    # seed 0), in that order, fed to TRL unshuffled
    ds = PromptDataset.load("task:countdown:2", n_per_level=2000, seed=RL_TASK_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        order = [i for _, i in Buffer(Path(tmp) / "b.sqlite", seed=0).draw(0, "stage0", len(ds),
                                                                           args.steps * args.prompts)]
    records = [ds[i] for i in order]
    ours = run_rlfoundry(args)
    trl = run_trl(args, records)
    rows = []
    for name, r in (("rlfoundry", ours), ("TRL GRPOTrainer", trl)):
        rows.append({"name": name, "samples_per_s": r["samples"] / r["wall_s"], "wall_s": r["wall_s"],
                     "setup_s": r["setup_s"], "final_reward": r["curve"][-1][1] if r["curve"] else None})
    print(f"{args.steps} steps x {args.prompts} prompts x {args.group} samples, max {args.max_new_tokens} new tokens; "
          f"rlfoundry with {args.engines} engine(s) and {args.trainers} trainer(s), TRL in one process")
    for row in rows:
        print(f"{row['name']:16s}: {row['samples_per_s']:7.1f} samples/s  ({row['wall_s']:.1f} s training, "
              f"{row['setup_s']:.1f} s start-up)  last-step reward {row['final_reward']:.3f}")
    print("rlfoundry, mean seconds a step: " + ", ".join(f"{k} {v:.2f}" for k, v in ours["phases"].items()))
    print(f"ratio rlfoundry / TRL: {rows[0]['samples_per_s'] / rows[1]['samples_per_s']:.2f}x samples/s")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in (("rlfoundry", ours), ("TRL GRPOTrainer", trl)):
        ax.plot([t for t, _ in r["curve"]], [v for _, v in r["curve"]], "o-", label=name)
    ax.set_xlabel("wall-clock seconds (training)")
    ax.set_ylabel("mean training reward")
    ax.set_title("Countdown level 2, tiny GLM-4.5 model, same prompts and settings")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "benchmarks" / "rl_vs_trl.png", dpi=100)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
