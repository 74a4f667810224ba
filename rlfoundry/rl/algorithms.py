"""RL math as small pure functions on tensors. Shapes: N samples, T response tokens, G samples per
prompt; `mask_NT` is 1 on the response tokens that count.

Advantages (one scalar per sample, broadcast over its tokens):
- GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300): (r - mean_group) / (std_group + eps),
  std unbiased (as TRL and verl compute it).
- Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783): r - mean_group,
  no std division.
- RLOO (Ahmadian et al. 2024, arXiv 2402.14740): r_i - mean_{j != i} r_j = G / (G - 1) (r_i - mean).
- REINFORCE++ (Hu 2025, arXiv 2501.03262): rewards normalised over the whole batch,
  (r - mean_batch) / (std_batch + eps); the "baseline" form subtracts the group mean first and then
  normalises over the batch. Deviation: the paper folds a per-token KL into the reward; here KL is a
  separate loss term (`kl_penalty`), off by default as in GLM-4.5's RL.

Weighted positive and negative reinforcement (Zhu et al. 2025, "The Surprising Effectiveness of
Negative Reinforcement in LLM Reasoning", arXiv 2506.01347): the advantages of the samples that
are reinforced (A > 0) times a weight w, the others' unchanged. Their W-REINFORCE takes w = 0.1 with
rewards +-1 and no baseline, to keep the policy's diversity (pass@k); here w applies to any
estimator's advantages above, and w > 1 leans towards the right answers a policy already samples
(pass@1, greedy accuracy).

Policy losses (per token, before aggregation):
- PPO-clip (Schulman et al. 2017) with asymmetric clip-higher bounds [1 - eps_low, 1 + eps_high]
  (DAPO, Yu et al. 2025, arXiv 2503.14476: eps_high = 0.28), and optionally dual-clip (Ye et al. 2020,
  arXiv 1912.09729): for A < 0 the loss is at most -c * A (c = 3).
- GSPO (Zheng et al. 2025, arXiv 2507.18071): one ratio per sequence, the geometric mean of its token
  ratios, s = exp(mean_t(logp - old_logp)), clipped to [1 - eps_low, 1 + eps_high] (the paper uses
  3e-4 / 4e-4); written per token as s_t = sg(s) * exp(logp_t - sg(logp_t)) so that each token's
  gradient is the paper's, then aggregated by sequence mean.

Aggregation: token-mean (DAPO; GLM-4.5's code RL), seq-mean-token-mean (GRPO's original), and
seq-mean-token-sum-norm (Dr. GRPO: token sums over a constant length).

KL estimators (Schulman 2020, "Approximating KL Divergence"): k1 = log r, k2 = (log r)^2 / 2,
k3 = exp(-log r) - 1 + log r, with log r = logp - ref_logp, all estimating KL(pi || ref).

Truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
Off-Policy RL Training"): per-token weight min(exp(old_logp - engine_logp), C), detached, correcting
for the engine sampling from a slightly different distribution than the trainer computes.

Overlong penalty (DAPO's soft overlong punishment): 0 up to L_max - L_cache tokens, then falling
linearly to -1 at L_max.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlfoundry.model.glm4_moe import at_least_fp32

ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce++", "reinforce++_baseline")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3")


def group_advantages(rewards_PG: Tensor, method: str = "grpo", eps: float = 1e-6) -> Tensor:
    """Advantages [P, G] for P prompts with G samples each (see the module docstring)."""
    r = rewards_PG.float()
    G = r.shape[1]
    if method == "grpo":
        std = r.std(dim=1, keepdim=True) if G > 1 else torch.zeros_like(r[:, :1])
        return (r - r.mean(dim=1, keepdim=True)) / (std + eps)
    if method == "dr_grpo":
        return r - r.mean(dim=1, keepdim=True)
    if method == "rloo":
        if G < 2:
            raise ValueError("RLOO needs at least 2 samples per prompt")
        return (r - r.mean(dim=1, keepdim=True)) * G / (G - 1)
    if method == "reinforce++":
        return (r - r.mean()) / (r.std() + eps) if r.numel() > 1 else r - r.mean()
    if method == "reinforce++_baseline":
        centred = r - r.mean(dim=1, keepdim=True)
        return centred / (centred.std() + eps) if centred.numel() > 1 else centred
    raise ValueError(f"unknown advantage estimator {method!r}; choose from {ADVANTAGES}")


def weight_positive(adv: Tensor, weight: float = 1.0) -> Tensor:
    """Advantages with the positive ones times `weight` (see the module docstring); 1: unchanged."""
    return adv if weight == 1.0 else torch.where(adv > 0, adv * weight, adv)


def ppo_clip_loss(logp_NT: Tensor, old_logp_NT: Tensor, adv_N: Tensor, eps_low: float = 0.2,
                  eps_high: float = 0.28, dual_clip: float | None = None) -> tuple[Tensor, Tensor]:
    """Per-token PPO-clip loss [N, T] with clip-higher and optional dual-clip; and a [N, T] bool
    tensor marking the tokens whose ratio was clipped (no gradient from the ratio)."""
    A = adv_N[:, None].float()
    ratio = torch.exp(logp_NT.float() - old_logp_NT.float())
    unclipped = -ratio * A
    clipped = -ratio.clamp(1 - eps_low, 1 + eps_high) * A
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        capped = torch.where(A < 0, torch.minimum(loss, -dual_clip * A), loss)
        was_clipped = was_clipped | (capped < loss)
        loss = capped
    return loss, was_clipped


def gspo_loss(logp_NT: Tensor, old_logp_NT: Tensor, adv_N: Tensor, mask_NT: Tensor, eps_low: float = 3e-4,
              eps_high: float = 4e-4) -> tuple[Tensor, Tensor]:
    """GSPO per-token loss [N, T] (every token of a sequence carries its sequence's clipped term)
    and the [N, T] clipped marker; aggregate with "seq-mean-token-mean"."""
    m = mask_NT.float()
    logp, old = logp_NT.float(), old_logp_NT.float()
    log_s_N = ((logp - old) * m).sum(1) / m.sum(1).clamp(min=1)
    s_NT = torch.exp(log_s_N.detach()[:, None] + logp - logp.detach())  # value s, gradient per token
    A = adv_N[:, None].float()
    unclipped = -s_NT * A
    clipped = -s_NT.clamp(1 - eps_low, 1 + eps_high) * A
    return torch.maximum(unclipped, clipped), (clipped > unclipped).expand_as(logp)


def aggregate(loss_NT: Tensor, mask_NT: Tensor, mode: str = "token-mean", norm_len: int | None = None) -> Tensor:
    """Reduce per-token losses to a scalar: token-mean, seq-mean-token-mean, or
    seq-mean-token-sum-norm (token sums divided by `norm_len`, default T)."""
    m = mask_NT.float()
    if mode == "token-mean":
        return (loss_NT * m).sum() / m.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        per_seq = (loss_NT * m).sum(1) / m.sum(1).clamp(min=1)
        return per_seq.mean()
    if mode == "seq-mean-token-sum-norm":
        return ((loss_NT * m).sum(1) / (norm_len or loss_NT.shape[1])).mean()
    raise ValueError(f"unknown loss aggregation {mode!r}; choose from {AGGREGATIONS}")


def kl_penalty(logp_NT: Tensor, ref_logp_NT: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || ref) from the sampled tokens' log-probs."""
    log_r = logp_NT.float() - ref_logp_NT.float()
    if kind == "k1":
        return log_r
    if kind == "k2":
        return 0.5 * log_r ** 2
    if kind == "k3":
        return torch.exp(-log_r) - 1 + log_r
    raise ValueError(f"unknown KL estimator {kind!r}; choose from {KL_KINDS}")


def entropy_from_logits(logits_NTV: Tensor) -> Tensor:
    """Per-token entropy [N, T] of softmax(logits) in fp32 (computed in fp64 from fp64 logits, as
    `token_logprobs` is, so that an entropy bonus in exact mode stays fp64 until the end)."""
    return entropy_from_logprobs(logits_NTV.to(at_least_fp32(logits_NTV.dtype)).log_softmax(-1))


def entropy_from_logprobs(logp_NTV: Tensor) -> Tensor:
    """Per-token entropy [N, T], -sum p log p, from log-probabilities over the vocabulary (fp32 out)."""
    return -(logp_NTV.exp() * logp_NTV).sum(-1).float()


def scaled_log_softmax(logits_NTV: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) over the vocabulary, in fp32 (fp64 for fp64 logits), as
    the engine samples (temperature 0, greedy: the raw softmax)."""
    logits = logits_NTV.to(at_least_fp32(logits_NTV.dtype))
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return logits.log_softmax(-1)


def token_logprobs(logits_NTV: Tensor, ids_NT: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[ids] in fp32: the quantity the engine returns (computed
    in fp32, or in fp64 from fp64 logits and then rounded, as the engine does)."""
    return scaled_log_softmax(logits_NTV, temperature).gather(-1, ids_NT[..., None]).squeeze(-1).float()


def tis_weights(old_logp_NT: Tensor, engine_logp_NT: Tensor, cap: float = 2.0) -> Tensor:
    """Truncated importance weights min(pi_trainer / pi_engine, cap), detached."""
    return torch.exp(old_logp_NT.float() - engine_logp_NT.float()).clamp(max=cap).detach()


def overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    """DAPO's soft overlong punishment for a response of `length` tokens."""
    if cache_len <= 0 or length <= max_len - cache_len:
        return 0.0
    if length > max_len:
        return -1.0
    return (max_len - cache_len - length) / cache_len
