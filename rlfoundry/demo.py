"""The embedded default job, until the RL demo lands: build the tiny GLM-4.5 model, save it as a
Hugging Face checkpoint, check it against transformers, and decode a ragged batch with the KV cache.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from rlfoundry.model import Glm4MoeForCausalLM, KVCache, ModelConfig, load_pretrained, save_pretrained


@torch.no_grad()
def greedy_decode(model: Glm4MoeForCausalLM, prompts: list[list[int]], max_new_tokens: int,
                  progress: Progress | None = None) -> list[list[int]]:
    """Greedy continuation of prompts of different lengths: one ragged prefill, then one token per
    step for the whole batch, all through the KV cache."""
    B = len(prompts)
    cache = KVCache.for_model(model.config, num_slots=B, max_len=max(map(len, prompts)) + max_new_tokens,
                              dtype=model.model.embed_tokens.weight.dtype)
    lens = torch.tensor([len(p) for p in prompts])
    batch = torch.zeros(B, int(lens.max()), dtype=torch.long)
    for b, p in enumerate(prompts):
        batch[b, : len(p)] = torch.tensor(p)
    logits = model(batch, cache=cache, input_lens=lens).logits
    next_ids = logits[torch.arange(B), lens - 1].argmax(-1)
    out = [[int(t)] for t in next_ids]
    task = progress.add_task("decoding", total=max_new_tokens) if progress else None
    for _ in range(max_new_tokens - 1):
        next_ids = model(next_ids[:, None], cache=cache).logits[:, -1].argmax(-1)
        for b, t in enumerate(next_ids.tolist()):
            out[b].append(t)
        if progress:
            progress.advance(task)
    return out


def run_demo(out_dir: Path, seed: int = 0) -> int:
    console = Console()
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny")
    model = Glm4MoeForCausalLM(cfg).eval()
    model.init_weights(seed=seed)
    counts = cfg.param_counts(include_mtp=True)
    console.print(f"[bold]tiny GLM-4.5[/] {counts['total'] / 1e6:.2f}M parameters "
                  f"({cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, "
                  f"QK-Norm, partial RoPE, 1 MTP layer)")

    ckpt = save_pretrained(model, out_dir / "model")
    loaded = load_pretrained(ckpt)
    console.print(f"saved and reloaded the Hugging Face checkpoint at {ckpt}")

    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in (5, 17, 9, 30)]
    ids = torch.tensor([prompts[1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers

        transformers.logging.set_verbosity_error()  # it lists the MTP tensors, which it does not model
        transformers.logging.disable_progress_bar()
        hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (hf(ids).logits - loaded(ids).logits).abs().max().item()
    console.print(f"transformers' Glm4MoeForCausalLM on the same checkpoint: max |logit difference| = {diff:.2e}")

    new_tokens = 64
    with Progress(console=console, transient=True) as progress:
        t0 = time.perf_counter()
        outputs = greedy_decode(loaded, prompts, new_tokens, progress)
        seconds = time.perf_counter() - t0
    with torch.no_grad():  # the cache path must agree with recomputing everything from scratch
        full = torch.tensor([prompts[0] + outputs[0][:-1]])
        recomputed = loaded(full).logits[0, len(prompts[0]) - 1:].argmax(-1).tolist()
    ok = recomputed == outputs[0] and diff <= 1e-5
    summary = {"params": counts["total"], "hf_max_logit_diff": diff, "batch": len(prompts),
               "new_tokens_per_sequence": new_tokens,
               "decode_tokens_per_s": round(len(prompts) * new_tokens / seconds, 1),
               "kv_cache_matches_full_forward": recomputed == outputs[0]}
    (out_dir / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"greedy decoding, ragged batch of {len(prompts)}: {summary['decode_tokens_per_s']} tokens/s; "
                  f"KV cache == full forward: {summary['kv_cache_matches_full_forward']}")
    console.print(f"first continuation: {outputs[0][:16]} ...")
    console.print(f"[bold {'green' if ok else 'red'}]{'OK' if ok else 'MISMATCH'}[/] — summary in {out_dir / 'demo.json'}")
    return 0 if ok else 1
