"""Where the train-inference log-prob mismatch comes from: engine and trainer against an fp64 reference.

Generates one RL step's worth of samples (Countdown levels 2 and 3 in the chat template, n samples
per prompt at temperature 1) with the engine, recomputes their log-probs as the RL trainer does
(training mode, autograd on, padded micro-batches), and scores both against the same model cast to
fp64. If one side were much further from fp64 than the other, that side would hold the fix; if both
are about as far, the mismatch is fp32 rounding on both sides (a batched decode and a full forward
summing in different orders) and only higher precision or batch-invariant kernels on both would
remove it.

    .venv/bin/python benchmarks/bench_mismatch.py [--model examples/tiny/model] [--prompts 32 --n 8]
                                                  [--compile-decode] [--exact] [--batch-invariant]
                                                  [--max-batch 64 --engine-threads N --trainer-threads N]

`--exact` measures RL's `exact: true`: the engine holds an fp64 copy of the weights, the trainer
computes in fp64 from its fp32 weights (`ComputeIn`), both round log-probs to fp32.
`--batch-invariant` measures RL's `batch_invariant: true`: fp32, both models batch-invariant.

(`--model RUN_DIR/hf` measures a trained policy: its sharper logits show larger differences.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rlfoundry.buffer import PromptDataset  # noqa: E402
from rlfoundry.data.tokenizer import eos_token_ids, load_tokenizer  # noqa: E402
from rlfoundry.model import load_pretrained  # noqa: E402
from rlfoundry.model.glm4_moe import ComputeIn, cast_model  # noqa: E402
from rlfoundry.rl.policy import make_batches, sequence_logits, sequence_logprobs  # noqa: E402
from rlfoundry.rl.sample import Sample  # noqa: E402
from rlfoundry.rollout.engine import Engine, SamplingParams  # noqa: E402


def describe(name: str, d: torch.Tensor) -> None:
    print(f"{name:<34} max {d.max():.2e}  mean {d.mean():.2e}  tokens > 1e-5: {int((d > 1e-5).sum())}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "examples/tiny/model"))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=64, help="sequences the engine decodes at once")
    ap.add_argument("--engine-threads", type=int, default=0, help="torch threads while generating (0: torch's default)")
    ap.add_argument("--trainer-threads", type=int, default=0, help="torch threads while recomputing (0: torch's default)")
    ap.add_argument("--compile-decode", action="store_true", help="the engine decodes through torch.compile")
    ap.add_argument("--exact", action="store_true", help="RL's exact mode: fp64 arithmetic on both sides")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="fp32, both models batch-invariant (RL's batch_invariant)")
    ap.add_argument("--no-share-prompts", action="store_true",
                    help="the trainer computes one row per sample (RL default: each group's prompt once)")
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    if tok is None:
        sys.exit(f"{args.model}: no tokenizer (a chat-template checkpoint is needed for task prompts)")
    half = args.prompts // 2
    sets = [PromptDataset.load(f"task:countdown:{level}", n_per_level=k, seed=20_000)
            for level, k in ((2, half), (3, args.prompts - half))]
    prompts = [ds.token_ids(i, tok) for ds in sets for i in range(len(ds))]

    engine_model = load_pretrained(args.model, dtype=torch.float64 if args.exact else torch.float32)
    if args.batch_invariant:
        engine_model.set_batch_invariant()
    engine = Engine(engine_model, max_batch=args.max_batch,
                    eos_token_ids=eos_token_ids(tok), seed=0, compile_decode=args.compile_decode)
    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.engine_threads or default_threads)
    outs = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, n=args.n))
    samples = [Sample(prompt_ids=list(p), response_ids=list(o.output_ids), logprobs=list(o.logprobs),
                      loss_mask=[1] * len(o.output_ids)) for p, group in zip(prompts, outs) for o in group]
    batches = make_batches(samples, [0.0] * len(samples), args.micro_batch, "token-mean",
                           share_prompts=not args.no_share_prompts)

    torch.set_num_threads(args.trainer_threads or default_threads)
    trainer = load_pretrained(args.model).train()
    if args.batch_invariant:
        trainer.set_batch_invariant()
    if args.exact:
        trainer = ComputeIn(trainer, torch.float64)
    ref = cast_model(load_pretrained(args.model), torch.float64).eval()
    diffs: dict[str, list[torch.Tensor]] = {"engine - trainer": [], "engine - fp64": [], "trainer - fp64": []}
    for b in batches:
        mask = b.response_mask[:, 1:].bool()
        train_lp = sequence_logprobs(trainer, b, 1.0)[0].detach()   # autograd on, as in the RL step
        with torch.no_grad():  # unrounded fp64 log-probs (sequence_logprobs rounds to fp32)
            ref_logits = sequence_logits(ref, b)
            ref_lp = ref_logits.log_softmax(-1).gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
        engine_lp = b.engine_logprobs[:, 1:]
        diffs["engine - trainer"].append((engine_lp - train_lp)[mask].abs())
        diffs["engine - fp64"].append((engine_lp.double() - ref_lp)[mask].abs())
        diffs["trainer - fp64"].append((train_lp.double() - ref_lp)[mask].abs())
    n_tokens = sum(int(b.response_mask.sum()) for b in batches)
    print(f"{args.model}: {len(samples)} samples, {n_tokens} generated tokens, fp32 weights, "
          f"{'fp64 arithmetic (exact)' if args.exact else 'fp32 arithmetic'}, temperature 1, "
          f"{'compiled' if args.compile_decode else 'eager'} decode")
    for name, parts in diffs.items():
        describe(f"|log-prob difference| {name}", torch.cat(parts))
    same = torch.cat(diffs["engine - trainer"]).eq(0).float().mean()
    print(f"engine and trainer log-probs equal bit for bit: {same:.2%} of tokens")


if __name__ == "__main__":
    main()
