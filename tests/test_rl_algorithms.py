"""RL math against hand-computed examples (numbers worked out in the comments)."""

import math

import pytest
import torch

from rlfoundry.rl.algorithms import (aggregate, entropy_from_logits, group_advantages, gspo_loss, kl_penalty,
                                     overlong_penalty, ppo_clip_loss, tis_weights, token_logprobs, weight_positive)

R = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=tol, rtol=tol)


def test_group_advantages():
    # group 1: mean .5, unbiased std sqrt(1/3) = .57735 -> +-.86603; group 2: mean .75, std .5
    close(group_advantages(R, "grpo", eps=0), [[.86603, -.86603, -.86603, .86603], [.5, .5, .5, -1.5]])
    close(group_advantages(R, "dr_grpo"), [[.5, -.5, -.5, .5], [.25, .25, .25, -.75]])
    # RLOO: 1 - mean(0, 0, 1) = 2/3; 0 - mean(1, 0, 1) = -2/3; 1 - 2/3 = 1/3; 0 - 1 = -1
    close(group_advantages(R, "rloo"), [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [1 / 3, 1 / 3, 1 / 3, -1]])
    # batch mean 5/8, unbiased std of [1,0,0,1,1,1,1,0] = sqrt(15/56)
    s = math.sqrt((5 * (3 / 8) ** 2 + 3 * (5 / 8) ** 2) / 7)
    close(group_advantages(R, "reinforce++", eps=0)[0], [3 / 8 / s, -5 / 8 / s, -5 / 8 / s, 3 / 8 / s])
    c = torch.tensor([.5, -.5, -.5, .5, .25, .25, .25, -.75])
    close(group_advantages(R, "reinforce++_baseline", eps=0).flatten(), c / c.std())
    # all-equal group: no signal
    assert group_advantages(torch.ones(1, 4)).abs().max() == 0
    with pytest.raises(ValueError, match="unknown advantage"):
        group_advantages(R, "ppo")


def test_weight_positive():
    # Dr. GRPO's [[.5, -.5, -.5, .5], [.25, .25, .25, -.75]] with the positive ones doubled: the
    # group sums become +1 and 0 (the policy pushed towards what it samples right)
    a = weight_positive(group_advantages(R, "dr_grpo"), 2.0)
    close(a, [[1.0, -.5, -.5, 1.0], [.5, .5, .5, -.75]])
    close(a.sum(1), [1.0, .75])
    # W-REINFORCE (Zhu et al. 2025): rewards +-1, positive ones weighted 0.1
    close(weight_positive(torch.tensor([1.0, -1.0, 1.0]), 0.1), [.1, -1.0, .1])
    x = torch.tensor([.3, -.2, 0.0])
    assert weight_positive(x) is x  # weight 1: unchanged, no copy


def test_ppo_clip_higher_and_dual_clip():
    old = torch.zeros(1, 4)
    # ratios 0.5, 0.9, 1.2, 1.5 with A = +1: -min(r, clip(r, .8, 1.28)) = -.5, -.9, -1.2, -1.28
    logp = torch.log(torch.tensor([[0.5, 0.9, 1.2, 1.5]]))
    loss, clipped = ppo_clip_loss(logp, old, torch.tensor([1.0]), 0.2, 0.28)
    close(loss, [[-.5, -.9, -1.2, -1.28]])
    assert clipped.tolist() == [[False, False, False, True]]
    # A = -1: max(-r*A, -clip(r)*A) = max(r, clip(r)) = .8, .9, 1.2, 1.5
    loss, clipped = ppo_clip_loss(logp, old, torch.tensor([-1.0]), 0.2, 0.28)
    close(loss, [[.8, .9, 1.2, 1.5]])
    assert clipped.tolist() == [[True, False, False, False]]
    # dual clip c = 1.3 caps the A < 0 loss at 1.3
    loss, clipped = ppo_clip_loss(logp, old, torch.tensor([-1.0]), 0.2, 0.28, dual_clip=1.3)
    close(loss, [[.8, .9, 1.2, 1.3]])
    assert clipped[0, 3]
    # gradient: d/dlogp of -r*A at r = .9, A = 1 is -.9; clipped tokens give 0
    logp.requires_grad_(True)
    ppo_clip_loss(logp, old, torch.tensor([1.0]))[0].sum().backward()
    close(logp.grad, [[-.5, -.9, -1.2, 0.0]])


def test_gspo_sequence_ratio():
    # tokens' log-ratios .1, .3 (mask keeps 2 of 3): s = exp(.2) = 1.2214 > 1 + 4e-4 -> clipped for A > 0
    logp = torch.tensor([[0.1, 0.3, 5.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    loss, clipped = gspo_loss(logp, torch.zeros(1, 3), torch.tensor([1.0]), mask)
    close(loss[0, :2], [-(1 + 4e-4)] * 2)
    assert clipped[0, 0]
    # unclipped (A < 0): loss = s * |A|, d/dlogp_t = s * |A| for each token (then the mean over tokens)
    loss, _ = gspo_loss(logp, torch.zeros(1, 3), torch.tensor([-2.0]), mask)
    close(loss[0, :2], [2 * math.exp(0.2)] * 2)
    aggregate(loss, mask, "seq-mean-token-mean").backward()
    close(logp.grad, [[math.exp(0.2), math.exp(0.2), 0.0]])


def test_aggregations():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(aggregate(loss, mask, "token-mean"), 10 / 4)
    close(aggregate(loss, mask, "seq-mean-token-mean"), (2 + 4) / 2)
    close(aggregate(loss, mask, "seq-mean-token-sum-norm", norm_len=4), (6 / 4 + 4 / 4) / 2)


def test_kl_estimators_and_entropy():
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    close(kl_penalty(logp, ref, "k1"), [math.log(2)])
    close(kl_penalty(logp, ref, "k2"), [0.5 * math.log(2) ** 2])
    close(kl_penalty(logp, ref, "k3"), [0.5 - 1 + math.log(2)])
    # exact KL(p||q) on a 2-token distribution equals the expectation of k1 and of k3
    p, q = torch.tensor([0.7, 0.3]), torch.tensor([0.4, 0.6])
    exact = (p * (p / q).log()).sum()
    close((p * kl_penalty(p.log(), q.log(), "k1")).sum(), exact)
    close((p * kl_penalty(p.log(), q.log(), "k3")).sum(), exact)
    close(entropy_from_logits(torch.zeros(1, 1, 4)), [[math.log(4)]])


def test_logprobs_tis_and_overlong():
    logits = torch.tensor([[[2.0, 0.0]]])
    close(token_logprobs(logits, torch.tensor([[1]]), temperature=2.0), [[-math.log(1 + math.e)]])
    close(tis_weights(torch.log(torch.tensor([.6, .9])), torch.log(torch.tensor([.3, .9])), cap=1.5), [1.5, 1.0])
    assert [overlong_penalty(n, 100, 20) for n in (80, 90, 100, 101)] == [0.0, -0.5, -1.0, -1.0]
