"""The trainer's side of RL: samples -> padded micro-batches -> the policy loss of one micro-batch.

Log-probs are recomputed by the trainer for exactly the tokens the engine generated, in fp32 after
the same temperature, and compared with the engine's (the train-inference mismatch, logged every
step). With one optimizer step per rollout the trainer's log-probs are also the "old" ones (ratio 1,
the gradient of the PPO objective at the sampling policy); with more, a no-grad pass first records
them. Micro-batches carry their share of the step's loss so that token-mean over the whole rollout
is exact under gradient accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlfoundry.rl.algorithms import (aggregate, entropy_from_logits, gspo_loss, kl_penalty, ppo_clip_loss,
                                     tis_weights, token_logprobs)
from rlfoundry.rl.sample import Sample


@dataclass
class RLBatch:
    input_ids: Tensor        # [B, T] prompt + response, right-padded
    attention_mask: Tensor   # [B, T]
    response_mask: Tensor    # [B, T] 1 on trained response tokens
    engine_logprobs: Tensor  # [B, T] at the response tokens' positions
    advantages: Tensor       # [B]
    weight: float            # the micro-batch's share of the step's loss
    old_logprobs: Tensor | None = None  # [B, T-1], when updates_per_rollout > 1
    ref_logprobs: Tensor | None = None  # [B, T-1], when kl_coef > 0
    routed_experts: Tensor | None = None  # [B, T, L_moe, K], routing replay


def make_batches(samples: list[Sample], advantages: list[float], micro_batch_size: int, aggregation: str,
                 pad_id: int = 0, routing_replay: bool = False) -> list[RLBatch]:
    """Pad samples into micro-batches of at most `micro_batch_size` (in the given order)."""
    total_tokens = sum(sum(s.loss_mask) for s in samples)
    out = []
    for start in range(0, len(samples), micro_batch_size):
        chunk = samples[start:start + micro_batch_size]
        T = max(len(s.tokens) for s in chunk)
        B = len(chunk)
        ids = torch.full((B, T), pad_id, dtype=torch.long)
        attn = torch.zeros(B, T, dtype=torch.long)
        resp = torch.zeros(B, T, dtype=torch.long)
        elp = torch.zeros(B, T, dtype=torch.float32)
        routed = None
        for b, s in enumerate(chunk):
            P, R = len(s.prompt_ids), len(s.response_ids)
            ids[b, :P + R] = torch.tensor(s.tokens)
            attn[b, :P + R] = 1
            resp[b, P:P + R] = torch.tensor(s.loss_mask[:R])
            elp[b, P:P + R] = torch.tensor(s.logprobs[:R], dtype=torch.float32)
            if routing_replay and s.routed_experts is not None:
                r = torch.tensor(s.routed_experts)
                if routed is None:
                    routed = torch.zeros(B, T, *r.shape[1:], dtype=torch.long)
                routed[b, :r.shape[0]] = r
        if aggregation == "token-mean":
            weight = float(resp.sum()) / max(total_tokens, 1)
        else:
            weight = B / len(samples)
        out.append(RLBatch(ids, attn, resp, elp, torch.tensor(advantages[start:start + B], dtype=torch.float32),
                           weight, routed_experts=routed))
    return out


def sequence_logprobs(model, batch: RLBatch, temperature: float) -> tuple[Tensor, Tensor]:
    """(log-probs [B, T-1] of tokens 1..T-1, logits [B, T-1, V]) under the model."""
    for t in (batch.input_ids, batch.attention_mask, batch.routed_experts):
        if t is not None:  # RL batches change shape every step: a compiled model (train.compile)
            torch._dynamo.maybe_mark_dynamic(t, 0)  # traces one graph with symbolic sizes at once,
            torch._dynamo.maybe_mark_dynamic(t, 1)  # not a static one first (a second compile)
    out = model(batch.input_ids, attention_mask=batch.attention_mask, routed_experts=batch.routed_experts)
    logits = out.logits[:, :-1]
    return token_logprobs(logits, batch.input_ids[:, 1:], temperature), logits


def policy_loss(model, batch: RLBatch, algo, temperature: float) -> tuple[Tensor, dict]:
    """The RL loss of one micro-batch and its metrics (see rlfoundry.rl.algorithms for the math)."""
    logp, logits = sequence_logprobs(model, batch, temperature)
    mask = batch.response_mask[:, 1:].float()
    engine = batch.engine_logprobs[:, 1:]
    old = batch.old_logprobs if batch.old_logprobs is not None else logp.detach()
    if algo.policy_loss == "gspo":
        loss_t, clipped = gspo_loss(logp, old, batch.advantages, mask, algo.eps_low, algo.eps_high)
    else:
        loss_t, clipped = ppo_clip_loss(logp, old, batch.advantages, algo.eps_low, algo.eps_high,
                                        algo.dual_clip or None)
    if algo.tis_cap:
        loss_t = loss_t * tis_weights(old, engine, algo.tis_cap)
    agg = "seq-mean-token-mean" if algo.policy_loss == "gspo" else algo.aggregation
    pg = aggregate(loss_t, mask, agg)
    loss = pg
    n = mask.sum().clamp(min=1)
    diff = (old - engine).abs() * mask  # the trainer's log-probs under the weights that generated the samples
    metrics = {"pg_loss": pg.item(), "clip_frac": float((clipped.float() * mask).sum() / n),
               "mismatch_mean": float(diff.sum() / n), "mismatch_max": float(diff.max()) if mask.any() else 0.0,
               "logprob_mean": float((logp.detach() * mask).sum() / n)}
    if algo.entropy_coef:
        ent = aggregate(entropy_from_logits(logits), mask, agg)
        loss = loss - algo.entropy_coef * ent
        metrics["entropy"] = ent.item()
    else:
        with torch.no_grad():
            metrics["entropy"] = float((entropy_from_logits(logits) * mask).sum() / n)
    if algo.kl_coef and batch.ref_logprobs is not None:
        kl = aggregate(kl_penalty(logp, batch.ref_logprobs, algo.kl_kind), mask, agg)
        loss = loss + algo.kl_coef * kl
        metrics["kl"] = kl.item()
    metrics["loss"] = loss.item()
    metrics["_weight"] = batch.weight
    return loss, metrics
