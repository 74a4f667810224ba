"""Load balancing: the loss-free bias update and the sequence-level auxiliary loss, by hand."""

import pytest
import torch

from conftest import random_model, small_config
from rlfoundry.model import apply_loss_free_bias_update, expert_load, loss_free_bias_update, sequence_balance_loss


def test_loss_free_bias_update_by_hand():
    bias = torch.tensor([0.0, 0.5, -0.5, 0.0])
    load = torch.tensor([5, 1, 3, 3])           # mean 3: expert 0 overloaded, expert 1 underloaded
    new = loss_free_bias_update(bias, load, rate=0.001)
    assert torch.allclose(new, torch.tensor([-0.001, 0.501, -0.5, 0.0]))
    assert torch.equal(loss_free_bias_update(bias, load, rate=0.0), bias)  # rate 0 freezes


def test_sequence_balance_loss_by_hand():
    scores = torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]],
                           [[0.9, 0.9, 0.2], [0.1, 0.1, 0.1]]])
    ids = torch.tensor([[[0], [2]], [[1], [0]]])
    # sequence 0: f = 3/(1*2) * [1, 0, 1]; P = mean of per-token normalised scores = [.35, .225, .425]
    seq0 = 1.5 * 0.35 + 1.5 * 0.425
    # sequence 1: f = 1.5 * [1, 1, 0]; normalised tokens [.45, .45, .1] and [1/3]*3
    p1 = [(0.45 + 1 / 3) / 2, (0.45 + 1 / 3) / 2]
    seq1 = 1.5 * p1[0] + 1.5 * p1[1]
    assert sequence_balance_loss(scores, ids).item() == pytest.approx((seq0 + seq1) / 2, rel=1e-6)
    # masking the second token of sequence 1 leaves T=1 there: f = 3 * [0, 1, 0], P = [.45, .45, .1]
    mask = torch.tensor([[1, 1], [1, 0]])
    assert sequence_balance_loss(scores, ids, mask).item() == pytest.approx((seq0 + 3 * 0.45) / 2, rel=1e-6)


def test_balance_loss_is_minimal_when_balanced_and_trains_the_router():
    E, T = 4, 8
    uniform = torch.full((1, T, E), 0.5)
    balanced_ids = torch.tensor([[0, 1], [2, 3]] * (T // 2))[None]
    assert sequence_balance_loss(uniform, balanced_ids).item() == pytest.approx(1.0)
    cfg = small_config()
    model = random_model(cfg)
    out = model(torch.randint(0, cfg.vocab_size, (2, 9)), return_router=True)
    loss = sum(sequence_balance_loss(s, out.routed_experts[:, :, l]) for l, s in enumerate(out.router_scores))
    loss.backward()
    assert model.moe_routers()[0].weight.grad.abs().sum() > 0


def test_expert_load_and_model_update():
    cfg = small_config(num_hidden_layers=3, first_k_dense_replace=1)
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    out = model(ids)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    load = expert_load(out.routed_experts, cfg.n_routed_experts, mask)
    assert load.shape == (cfg.num_moe_layers, cfg.n_routed_experts)
    assert load.sum(1).tolist() == [16 * cfg.num_experts_per_tok] * cfg.num_moe_layers
    manual = torch.bincount(out.routed_experts[0, :, 1].reshape(-1), minlength=cfg.n_routed_experts) + \
        torch.bincount(out.routed_experts[1, :6, 1].reshape(-1), minlength=cfg.n_routed_experts)
    assert torch.equal(load[1], manual)
    before = [r.e_score_correction_bias.clone() for r in model.moe_routers()]
    apply_loss_free_bias_update(model, load, rate=0.01)
    for l, router in enumerate(model.moe_routers()[: cfg.num_moe_layers]):
        expected = before[l] + 0.01 * torch.sign(load[l].float().mean() - load[l].float())
        assert torch.allclose(router.e_score_correction_bias, expected)
    assert torch.equal(model.moe_routers()[-1].e_score_correction_bias, before[-1])  # MTP router untouched
