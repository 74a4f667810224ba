"""Training losses as small pure functions.

- `token_cross_entropy`: next-token cross-entropy with a loss mask, averaged over the masked tokens.
- `mtp_loss`: the multi-token-prediction loss of the MTP layer (DeepSeek-V3, arXiv 2412.19437,
  sec. 2.2; GLM-4.5 weights it 0.3, later 0.1): the layer at position t sees h_t and token t+1 and
  predicts token t+2; optionally also chained, as speculative decoding's later drafts use it.
- `balance_loss`: the sequence-level auxiliary balance loss summed over MoE layers (weight 1e-4 in
  GLM-4.5); see `rlfoundry.model.sequence_balance_loss` for the per-layer formula.
- `mtp_weight`: the step schedule of the MTP loss weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlfoundry.model import CausalLMOutput, Glm4MoeForCausalLM, sequence_balance_loss


def token_cross_entropy(logits_BTV: Tensor, input_ids_BT: Tensor, loss_mask_BT: Tensor | None = None,
                        target_probs_BTV: Tensor | None = None) -> Tensor:
    """Mean over masked positions of -log p(x_{t+1} | x_<=t). `loss_mask_BT[b, t]` says whether token
    t is a target (position 0 never is); computed in fp32. With `target_probs_BTV` [B, T-1, V],
    position t's target is that distribution instead of token t+1 (soft cross-entropy)."""
    targets = input_ids_BT[:, 1:]
    mask = torch.ones_like(targets, dtype=torch.float32) if loss_mask_BT is None else loss_mask_BT[:, 1:].float()
    target = targets.flatten() if target_probs_BTV is None else target_probs_BTV.float().flatten(0, 1)
    nll = F.cross_entropy(logits_BTV[:, :-1].float().flatten(0, 1), target, reduction="none")
    return (nll * mask.flatten()).sum() / mask.sum().clamp(min=1)


def mtp_loss(model: Glm4MoeForCausalLM, out: CausalLMOutput, input_ids_BT: Tensor,
             loss_mask_BT: Tensor | None = None, position_ids_BT: Tensor | None = None,
             chain: int = 1, distill: bool = False) -> Tensor:
    """Cross-entropy of the MTP layer predicting token t+2 from (h_t, token t+1), over the positions
    whose token t+2 is a target.

    With `chain` = c > 1 the layer also runs as speculative decoding's later drafts run it: step j
    (j = 2..c) sees at position t the layer's own normed hidden state from step j-1 and token t+j,
    at position t+j-1 (as the engine's MTP cache places it), and predicts token t+j+1; the loss is
    the mean of the c steps' cross-entropies. Deviation from DeepSeek-V3's sequential MTP modules
    (one module per depth, each fed the previous module's hidden state): one layer serves every
    depth, and in this parallel form step j's keys at earlier positions are step j's own inputs,
    where the engine's cache holds the first step's (the main model's hidden states).

    With `distill`, the targets are the main model's own next-token distributions at those
    positions (soft cross-entropy against `out.logits`, detached) instead of the data's tokens:
    speculative decoding keeps a draft when it matches the main model, right or wrong, so the
    drafter learns what the model will say (DistillSpec, Zhou et al. 2023, arXiv 2310.08461, with
    the forward KL on the training data rather than on the model's own samples)."""
    T = input_ids_BT.shape[1]
    if T < 3:
        return out.logits.sum() * 0.0
    pos_BT = torch.arange(T, device=input_ids_BT.device).expand_as(input_ids_BT) \
        if position_ids_BT is None else position_ids_BT
    hidden, losses = out.hidden, []
    for j in range(1, chain + 1):
        n = T - j  # positions t = 0 .. T-j-1; logits[:, t] predicts input_ids[:, t + j + 1]
        if n < 2:
            break
        mtp = model.mtp_forward(hidden[:, :n], input_ids_BT[:, j:], position_ids=pos_BT[:, j - 1: j - 1 + n])
        mask = None if loss_mask_BT is None else loss_mask_BT[:, j:]
        # distill: mtp.logits[:, t] against the main model's distribution of token t+j+1
        target = out.logits[:, j: j + n - 1].detach().float().softmax(-1) if distill else None
        losses.append(token_cross_entropy(mtp.logits, input_ids_BT[:, j:], mask, target))
        hidden = mtp.hidden
    return sum(losses) / len(losses)


def balance_loss(out: CausalLMOutput, mask_BT: Tensor | None = None) -> Tensor:
    """Sum over MoE layers of the sequence-level balance loss (needs `return_router=True`)."""
    if not out.router_scores:
        raise ValueError("balance_loss needs the forward's router scores: call the model with return_router=True")
    return sum(sequence_balance_loss(s, out.routed_experts[:, :, l], mask_BT) for l, s in enumerate(out.router_scores))


def mtp_weight(step: int, schedule: list[tuple[int, float]]) -> float:
    """The MTP loss weight at `step` for a schedule [(from_step, weight), ...], e.g. the report's
    [(0, 0.3), (N, 0.1)]."""
    weight = 0.0
    for start, w in sorted(schedule):
        if step >= start:
            weight = w
    return weight
