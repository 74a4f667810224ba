"""The trainer's side of RL: samples -> padded micro-batches -> the policy loss of one micro-batch.

A GRPO group's n samples share one prompt. With `share_prompts` a micro-batch computes each prompt
once: the consecutive samples with the same prompt become one row, the prompt followed by their
responses, each response attending to the prompt and to itself only (segment ids, `prefix_lens`),
its positions continuing from the prompt's; the logits are then gathered back into the usual
one-row-per-sample layout, so every loss below reads the same tensors either way, and the prompt's
gradient is the sum of the responses' (autograd through the gather). That is n - 1 fewer copies of
each prompt through every layer; the attention of a row grows to (prompt + n responses)^2 with a
dense mask, so for long responses the plain layout can be cheaper (`algorithm.share_prompts`).

Log-probs are recomputed by the trainer for exactly the tokens the engine generated, in fp32 after
the same temperature, and compared with the engine's (the train-inference mismatch, logged every
step). With one optimizer step per rollout the trainer's log-probs are also the "old" ones (ratio 1,
the gradient of the PPO objective at the sampling policy); with more, a no-grad pass first records
them. Micro-batches carry their share of the step's loss so that token-mean over the whole rollout
is exact under gradient accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import torch
from torch import Tensor

from rlfoundry.rl.algorithms import (aggregate, entropy_from_logits, entropy_from_logprobs, gspo_loss, kl_penalty,
                                     ppo_clip_loss, scaled_log_softmax, tis_weights, token_logprobs)
from rlfoundry.rl.sample import Sample


@dataclass
class PackedRows:
    """The samples of a micro-batch with each shared prompt once (see the module docstring)."""
    input_ids: Tensor       # [G, Tp] a prompt, then the responses of its samples, right-padded
    position_ids: Tensor    # [G, Tp] each response continues from the prompt's positions
    attention_mask: Tensor  # [G, Tp]
    segment_ids: Tensor     # [G, Tp] 0 on the prompt, k on the k-th sample's own tokens in the row
    prefix_lens: Tensor     # [G, K] the prompt tokens that segment k of the row sees: the prompt's
    #                         length, or a relabelled sample's shared beginning of it
    row_S: Tensor           # [S] the row of each sample
    pos_ST: Tensor          # [S, T] where each position of each sample (RLBatch layout) is in its row
    routed_experts: Tensor | None = None  # [G, Tp, L_moe, K]


@dataclass
class RLBatch:
    input_ids: Tensor        # [B, T] prompt + response, right-padded
    attention_mask: Tensor   # [B, T]
    response_mask: Tensor    # [B, T] 1 on trained response tokens
    engine_logprobs: Tensor  # [B, T] at the response tokens' positions
    advantages: Tensor       # [B]
    weight: float            # the micro-batch's share of the step's loss
    old_logprobs: Tensor | None = None  # [B, T-1], the sampling policy's: updates after the first
    old_from_engine: bool = False  # old_logprobs are the engines' own (exact or batch-invariant runs)
    ref_logprobs: Tensor | None = None  # [B, T-1], when kl_coef > 0
    routed_experts: Tensor | None = None  # [B, T, L_moe, K], routing replay
    packed: PackedRows | None = None      # share_prompts: what the model computes
    stale: Tensor | None = None  # [B] bool, async mode: requested under weights older than the trainer's
    relabelled: Tensor | None = None  # [B] bool: hindsight samples (algorithm.hindsight), trained by likelihood

    def to(self, device: torch.device | str) -> "RLBatch":
        """The micro-batch with its tensors on `device` (the trainer's model's; tensors already
        there are not copied)."""
        return _moved(self, torch.device(device))

    @property
    def num_tokens(self) -> int:
        """Token positions the model computes (padding included)."""
        return (self.packed.input_ids if self.packed is not None else self.input_ids).numel()


def _moved(obj, device: torch.device):
    """A dataclass of tensors (and nested ones) with every tensor on `device`."""
    changes = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, Tensor):
            changes[f.name] = v.to(device)
        elif isinstance(v, PackedRows):
            changes[f.name] = _moved(v, device)
    return replace(obj, **changes)


def _same_prompt(a: Sample, b: Sample, routing_replay: bool) -> bool:
    if a.prompt_ids != b.prompt_ids:
        return False
    if routing_replay and (a.routed_experts is None) != (b.routed_experts is None):
        return False
    P = len(a.prompt_ids)  # replayed routes of the prompt must agree too (another policy version may differ)
    return not routing_replay or a.routed_experts is None or a.routed_experts[:P] == b.routed_experts[:P]


def _padded(rows: list[list], width: int, fill, dtype: torch.dtype) -> Tensor:
    """[len(rows), width]: each row right-padded with `fill` (one tensor from Python lists: a tensor
    per sample and field cost ~10% of an RL training step here)."""
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=dtype)


def _no_route(samples: list[Sample]) -> list | None:
    """The [L_moe, K] zeros that stand for a position without replayed routes (shaped like the
    first sample's that has some); None when no sample has any."""
    first = next((s.routed_experts for s in samples if s.routed_experts), None)
    return None if first is None else [[0] * len(first[0][0])] * len(first[0])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pack_prompts(chunk: list[Sample], T: int, pad_id: int = 0, routing_replay: bool = False) -> PackedRows:
    """Rows of one prompt and the responses of the consecutive samples sharing it (see the module
    docstring); `T` is the longest sample of the RLBatch whose layout `pos_ST` indexes. A
    relabelled sample (`Sample.relabelled_from`) right after its group joins the group's row too:
    its segment is the rest of its own prompt after the beginning it shares with the row's (the
    question's last words, a few tokens), then its response, seeing that beginning only."""
    runs: list[list[int]] = []
    for i, s in enumerate(chunk):
        first = chunk[runs[-1][0]] if runs else None
        if first is not None and (_same_prompt(first, s, routing_replay) or (
                s.relabelled_from is not None and s.group_id == first.group_id and not routing_replay)):
            runs[-1].append(i)
        else:
            runs.append([i])
    no_route = _no_route(chunk) if routing_replay else None
    replay = no_route is not None

    def _routes(s: Sample, a: int, b: int) -> list:
        """Replayed routes of positions a..b-1 of `s`; zeros where it has none."""
        r = s.routed_experts[a:b] if s.routed_experts is not None else []
        return list(r) + [no_route] * (b - a - len(r))

    ids, pos, seg, prefix, routes = [], [], [], [], []
    row_S, pos_S = [0] * len(chunk), [[] for _ in chunk]
    for g, run in enumerate(runs):
        P = len(chunk[run[0]].prompt_ids)
        ids.append(list(chunk[run[0]].prompt_ids))
        pos.append(list(range(P)))
        seg.append([0] * P)
        routes.append(_routes(chunk[run[0]], 0, P) if replay else [])
        prefix.append([P])
        for k, i in enumerate(run, start=1):
            s = chunk[i]
            c = P if s.prompt_ids == chunk[run[0]].prompt_ids else _common_prefix(chunk[run[0]].prompt_ids, s.prompt_ids)
            own = s.prompt_ids[c:] + s.response_ids  # the tokens of segment k
            R, at = len(own), len(ids[-1])
            ids[-1] += own
            pos[-1] += range(c, c + R)
            seg[-1] += [k] * R
            prefix[-1].append(c)
            if replay:  # the last token was never fed to the engine: its route is missing (zeros)
                routes[-1] += _routes(s, c, c + R)
            row_S[i], pos_S[i] = g, list(range(c)) + list(range(at, at + R))
    Tp = max(map(len, ids))
    routed = None
    if replay:
        routed = _padded(routes, Tp, no_route, torch.long)
    return PackedRows(_padded(ids, Tp, pad_id, torch.long), _padded(pos, Tp, 0, torch.long),
                      _padded([[1] * len(r) for r in ids], Tp, 0, torch.long), _padded(seg, Tp, 0, torch.long),
                      _padded(prefix, max(map(len, prefix)), 0, torch.long), torch.tensor(row_S, dtype=torch.long),
                      _padded(pos_S, T, 0, torch.long), routed)


def make_batches(samples: list[Sample], advantages: list[float], micro_batch_size: int, aggregation: str,
                 pad_id: int = 0, routing_replay: bool = False, share_prompts: bool = False,
                 of: tuple[int, int] | None = None, version: int | None = None) -> list[RLBatch]:
    """Pad samples into micro-batches of at most `micro_batch_size` (in the given order); with
    `share_prompts`, also pack each micro-batch's shared prompts (`pack_prompts`). Each micro-batch's
    `weight` is its share of the step: of the step's loss tokens (token-mean) or samples. `of`:
    (loss tokens, samples) of the whole step when `samples` are one data-parallel rank's part of it
    (default: `samples` are the step). `version` (async mode): the trainer's policy version; samples
    of older ones are marked `stale`; relabelled samples (`Sample.relabelled_from`), `relabelled`."""
    total_tokens, total_samples = of or (sum(sum(s.loss_mask) for s in samples), len(samples))
    out = []
    for start in range(0, len(samples), micro_batch_size):
        chunk = samples[start:start + micro_batch_size]
        T = max(len(s.tokens) for s in chunk)
        B = len(chunk)
        ids = _padded([s.tokens for s in chunk], T, pad_id, torch.long)
        attn = _padded([[1] * len(s.tokens) for s in chunk], T, 0, torch.long)
        resp = _padded([[0] * len(s.prompt_ids) + list(s.loss_mask[:len(s.response_ids)]) for s in chunk], T, 0,
                       torch.long)
        elp = _padded([[0.0] * len(s.prompt_ids) + list(s.logprobs[:len(s.response_ids)]) for s in chunk], T, 0.0,
                      torch.float32)
        routed = None
        no_route = _no_route(chunk) if routing_replay and not share_prompts else None
        if no_route is not None:
            routed = _padded([list(s.routed_experts or []) for s in chunk], T, no_route, torch.long)
        if aggregation == "token-mean":
            weight = float(resp.sum()) / max(total_tokens, 1)
        else:
            weight = B / total_samples
        packed = pack_prompts(chunk, T, pad_id, routing_replay) if share_prompts else None
        stale = None if version is None else torch.tensor([s.policy_version < version for s in chunk])
        relabelled = [s.relabelled_from is not None for s in chunk]
        out.append(RLBatch(ids, attn, resp, elp, torch.tensor(advantages[start:start + B], dtype=torch.float32),
                           weight, routed_experts=routed, packed=packed, stale=stale,
                           relabelled=torch.tensor(relabelled) if any(relabelled) else None))
    return out


def _forward(model, batch: RLBatch) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """The logits [rows, T', V] of what the model computes for the micro-batch and, for packed
    prompts, where each sample's positions 0..T-2 are in them (row [S, 1], position [S, T-1]);
    None: one row per sample."""
    p = batch.packed
    for t in ((batch.input_ids, batch.attention_mask, batch.routed_experts) if p is None else
              (p.input_ids, p.position_ids, p.attention_mask, p.segment_ids, p.routed_experts, p.pos_ST)):
        if t is not None:  # RL batches change shape every step: a compiled model (train.compile)
            torch._dynamo.maybe_mark_dynamic(t, 0)  # traces one graph with symbolic sizes at once,
            torch._dynamo.maybe_mark_dynamic(t, 1)  # not a static one first (a second compile)
    if p is None:
        return model(batch.input_ids, attention_mask=batch.attention_mask,
                     routed_experts=batch.routed_experts).logits, None
    for t in (p.prefix_lens, p.row_S):
        torch._dynamo.maybe_mark_dynamic(t, 0)
    torch._dynamo.maybe_mark_dynamic(p.prefix_lens, 1)
    out = model(p.input_ids, position_ids=p.position_ids, attention_mask=p.attention_mask,
                segment_ids=p.segment_ids, prefix_lens=p.prefix_lens, routed_experts=p.routed_experts)
    return out.logits, (p.row_S[:, None], p.pos_ST[:, :-1])


def sequence_logits(model, batch: RLBatch) -> Tensor:
    """Logits [B, T-1, V] predicting tokens 1..T-1 of each sample (gathered from packed rows)."""
    logits, where = _forward(model, batch)
    return logits[:, :-1] if where is None else logits[where]


def sequence_logprobs(model, batch: RLBatch, temperature: float) -> tuple[Tensor, Callable[[], Tensor]]:
    """Log-probs [B, T-1] of tokens 1..T-1 of each sample under the model (fp32, after temperature,
    as the engine computes them), and a function giving the entropy [B, T-1] of the same positions'
    distributions (raw logits; differentiable when called with autograd on). With packed prompts
    both are computed once per position the model computes and then gathered to the samples."""
    logits, where = _forward(model, batch)
    targets = batch.input_ids[:, 1:]
    if where is None:
        logits = logits[:, :-1]
        return token_logprobs(logits, targets, temperature), lambda: entropy_from_logits(logits)
    rows, pos = where
    logp_all = scaled_log_softmax(logits, temperature)
    logp = logp_all[rows, pos, targets].float()
    if temperature in (0.0, 1.0):  # logp_all is the raw log-softmax: the entropy reuses it
        return logp, lambda: entropy_from_logprobs(logp_all)[rows, pos]
    return logp, lambda: entropy_from_logits(logits)[rows, pos]


def policy_loss(model, batch: RLBatch, algo, temperature: float) -> tuple[Tensor, dict]:
    """The RL loss of one micro-batch and its metrics (see rlfoundry.rl.algorithms for the math).
    Relabelled rows (hindsight answers to prompts no engine saw) take their ratio against the
    trainer's own log-probs (ratio 1: the gradient of advantage x log-likelihood), no importance
    weight, and stay out of the train-inference mismatch."""
    logp, entropy = sequence_logprobs(model, batch, temperature)
    mask = batch.response_mask[:, 1:].float()
    engine = batch.engine_logprobs[:, 1:]
    old = batch.old_logprobs if batch.old_logprobs is not None else logp.detach()
    measured = mask  # the tokens whose engine log-probs are the sampling policy's
    if batch.relabelled is not None:
        relabelled = batch.relabelled[:, None]
        old = torch.where(relabelled, logp.detach(), old)
        engine = torch.where(relabelled, old, engine)
        measured = mask * (~relabelled).to(mask.dtype)
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
    metrics = {"pg_loss": pg.item(), "clip_frac": float((clipped.float() * mask).sum() / n),
               "logprob_mean": float((logp.detach() * mask).sum() / n)}
    share = batch.weight or 1.0
    # token means over the whole step: sums and counts over the micro-batch's share, which the
    # trainer's share-weighted mean of micro-batches turns back into sums (`token_means`)
    if not batch.old_from_engine and batch.stale is None:  # the trainer's log-probs under the weights
        diff = (old - engine).abs() * measured                 # that generated the samples
        if measured.any():
            metrics["mismatch_max"] = float(diff.max())
        metrics["_sum/mismatch_mean"] = float(diff.sum()) / share
        metrics["_n/mismatch_mean"] = float(measured.sum()) / share
    elif not batch.old_from_engine:  # async: the mismatch on the samples of the trainer's weights, and how far
        on = measured * (~batch.stale)[:, None].to(mask.dtype)  # the policy has moved since the others were sampled
        off = measured - on
        diff = (old - engine) * on
        if on.any():
            metrics["mismatch_max"] = float(diff.abs().max())
        metrics["_sum/mismatch_mean"] = float(diff.abs().sum()) / share
        metrics["_n/mismatch_mean"] = float(on.sum()) / share
        metrics["_sum/offpolicy_logratio_mean"] = float(((old - engine) * off).sum()) / share
        metrics["_n/offpolicy_logratio_mean"] = float(off.sum()) / share
    if algo.entropy_coef:
        ent = aggregate(entropy(), mask, agg)
        loss = loss - algo.entropy_coef * ent
        metrics["entropy"] = ent.item()
    else:
        with torch.no_grad():
            metrics["entropy"] = float((entropy() * mask).sum() / n)
    if algo.kl_coef and batch.ref_logprobs is not None:
        kl = aggregate(kl_penalty(logp, batch.ref_logprobs, algo.kl_kind), mask, agg)
        loss = loss + algo.kl_coef * kl
        metrics["kl"] = kl.item()
    metrics["loss"] = loss.item()
    metrics["_weight"] = batch.weight
    return loss, metrics


def token_means(metrics: dict) -> dict:
    """The metrics with each "_sum/K" and "_n/K" pair (both share-weighted means over the step's
    micro-batches, as `Trainer.train_step` returns them) replaced by K = their ratio: a mean over
    the step's tokens; K is left out where the count is 0."""
    out = {k: v for k, v in metrics.items() if not k.startswith(("_sum/", "_n/"))}
    for k, v in metrics.items():
        if k.startswith("_sum/") and metrics.get("_n/" + k[5:], 0) > 0:
            out[k[5:]] = v / metrics["_n/" + k[5:]]
    return out
