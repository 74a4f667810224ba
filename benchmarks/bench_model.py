"""Forward+backward training throughput: rlfoundry's GLM-4.5 model vs transformers' Glm4MoeForCausalLM.

Same configuration, same weights, same batch, interleaved in one run, in fp32 and under bf16 autocast
(`torch.autocast("cpu", torch.bfloat16)`, what `train.bf16` runs; fp32 weights, gradients and loss);
prints tokens/s of each, the ratio, and the achieved FLOP/s as a fraction of this CPU's dense matmul
FLOP/s in that precision (measured here with torch.mm on square matrices). transformers runs with its
defaults (SDPA attention, grouped_mm experts). A third row runs our model under torch.compile, as the
trainer does with `train.compile: inductor` (the grouped expert GEMMs stay opaque custom ops);
transformers' model does not compile in fp32 with its grouped_mm experts, so it has no such row.
Under autocast transformers' experts multiply in fp32 (its grouped_mm casts the input to the fp32
weights' dtype); the bf16 table adds a row where they multiply in bf16 as ours do
(`experts_in_autocast_dtype`), so that the ratio is also given like for like (it is slower here:
oneDNN compiles a bf16 kernel for every new per-expert row count, which our padding avoids).

    make bench            # or: .venv/bin/python benchmarks/bench_model.py [--batch 8 --seq 256 --iters 10]
                          #     [--precision fp32|bf16|both] [--no-compile]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rlfoundry.model import Glm4MoeForCausalLM, ModelConfig  # noqa: E402

BENCH_CONFIG = dict(
    vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
    head_dim=32, intermediate_size=768, moe_intermediate_size=128, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=4, first_k_dense_replace=1, routed_scaling_factor=2.5, use_qk_norm=True,
    attention_bias=True, rope_theta=10000.0, max_position_embeddings=4096, num_nextn_predict_layers=0,
)


def train_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """6 x (matmul parameters used per token, output head included) + causal attention (6 * T * H * Dh
    per layer: QK^T and AV, forward and backward, halved by the causal mask)."""
    counts = cfg.param_counts()
    matmul_active = counts["active"] + counts["output_head"]
    attn = 6 * seq * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    return 6 * matmul_active + attn


def peak_matmul_flops(n: int = 1024, iters: int = 20, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    return 2 * n ** 3 * iters / (time.perf_counter() - t)


def step(model, ids, bf16: bool = False) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)


@contextlib.contextmanager
def experts_in_autocast_dtype(enabled: bool):
    """transformers' grouped_mm experts cast their input to the weights' dtype, so under autocast
    (fp32 weights) they multiply in fp32. With `enabled`, they multiply in the autocast dtype
    instead, as ours do: a like-for-like bf16 row."""
    import transformers.integrations.moe as hf_moe

    if not enabled:
        yield
        return
    original = hf_moe._grouped_mm

    def grouped_mm(input, weight, offs):
        dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
        return F.grouped_mm(input.to(dt), weight.to(dt), offs=offs)

    hf_moe._grouped_mm = grouped_mm
    try:
        yield
    finally:
        hf_moe._grouped_mm = original


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    ap.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both",
                    help="fp32, bf16 autocast, or both side by side (default)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import transformers
    import transformers.integrations.moe as hf_moe
    from transformers import Glm4MoeConfig
    from transformers import Glm4MoeForCausalLM as HFGlm4Moe

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = ModelConfig(**BENCH_CONFIG)
    ours = Glm4MoeForCausalLM(cfg).train()
    d = cfg.to_hf_dict()
    d.pop("architectures"), d.pop("model_type")
    hf = HFGlm4Moe(Glm4MoeConfig(**d)).train()
    hf.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() < 1e-4, "models differ"

    precisions = {"fp32": [False], "bf16": [True], "both": [False, True]}[args.precision]
    models = {"rlfoundry": ours, "transformers": hf}
    if not args.no_compile:
        models["rlfoundry+compile"] = torch.compile(ours)
        for bf16 in precisions:  # autocast is part of the traced graph: one compile per precision
            t = time.perf_counter()
            step(models["rlfoundry+compile"], ids, bf16)
            print(f"torch.compile of our model ({'bf16 autocast' if bf16 else 'fp32'}): "
                  f"{time.perf_counter() - t:.0f} s (once)")
    runners = [(name, model, bf16) for bf16 in precisions for name, model in models.items()]
    if True in precisions and hasattr(hf_moe, "_grouped_mm"):
        runners.append(("transformers, bf16 experts", hf, True))
    times = {(name, bf16): [] for name, _, bf16 in runners}
    for i in range(args.warmup + args.iters):
        # a new batch every iteration, as in training: the tokens each expert gets (the shapes of
        # its GEMMs) change from step to step (repeated shapes would flatter bf16, whose CPU GEMMs
        # are compiled per shape by oneDNN: ~0.5 ms for each new one)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(i))
        for name, model, bf16 in runners:  # interleaved: all see the same machine load and batch
            t = time.perf_counter()
            with experts_in_autocast_dtype(name == "transformers, bf16 experts"):
                step(model, ids, bf16)
            if i >= args.warmup:
                times[name, bf16].append(time.perf_counter() - t)

    tokens = args.batch * args.seq
    fpt = train_flops_per_token(cfg, args.seq)
    counts = cfg.param_counts()
    print(f"config: {counts['total'] / 1e6:.1f}M params ({counts['active'] / 1e6:.1f}M active), "
          f"batch {args.batch} x {args.seq} tokens, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    for bf16 in precisions:
        dtype = torch.bfloat16 if bf16 else torch.float32
        peak = peak_matmul_flops(dtype=dtype)
        what = "bf16 autocast (fp32 weights)" if bf16 else "fp32"
        print(f"\n{what}: dense {'bf16' if bf16 else 'fp32'} matmul peak of this CPU (torch.mm 1024^3): "
              f"{peak / 1e9:.1f} GFLOP/s")
        print(f"{'implementation':<27} {'median s/step':>14} {'tokens/s':>10} {'GFLOP/s':>9} {'of peak':>8}")
        tps = {}
        for name in [n for n, _, b in runners if b == bf16]:
            med = statistics.median(times[name, bf16])
            tps[name] = tokens / med
            print(f"{name:<27} {med:>14.4f} {tps[name]:>10.0f} {tps[name] * fpt / 1e9:>9.1f} "
                  f"{tps[name] * fpt / peak:>8.1%}")
        peers = [n for n in tps if n.startswith("transformers")]
        for name in tps:
            for peer in peers if name.startswith("rlfoundry") else []:
                print(f"ratio {name} / {peer} ({what}): {tps[name] / tps[peer]:.2f}x")


if __name__ == "__main__":
    main()
