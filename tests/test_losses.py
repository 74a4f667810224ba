"""Losses against hand computations."""

import math

import torch

from conftest import random_model, small_config
from rlfoundry.train.losses import balance_loss, mtp_loss, mtp_weight, token_cross_entropy


def test_masked_cross_entropy_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    ids = torch.tensor([[0, 1, 2]])
    # targets: token 1 under position 0 (p=0.25), token 2 under position 1 (p=0.1)
    assert torch.isclose(token_cross_entropy(logits, ids), torch.tensor(-(math.log(0.25) + math.log(0.1)) / 2))
    mask = torch.tensor([[0, 0, 1]])  # only the last token is a target (SFT: assistant tokens only)
    assert torch.isclose(token_cross_entropy(logits, ids, mask), torch.tensor(-math.log(0.1)))


def test_mtp_loss_predicts_two_ahead():
    cfg = small_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    out = model(ids, return_router=True)
    loss = mtp_loss(model, out, ids)
    mtp = model.mtp_forward(out.hidden[:, :-1], ids[:, 1:]).logits      # position t predicts t + 2
    ref = torch.nn.functional.cross_entropy(mtp[:, :-1].flatten(0, 1), ids[:, 2:].flatten())
    assert torch.isclose(loss, ref, atol=1e-6)
    loss.backward()
    assert model.model.mtp_layers[0].eh_proj.weight.grad.abs().sum() > 0
    assert balance_loss(out).item() > 0


def test_chained_mtp_loss_feeds_the_layer_its_own_hidden_state():
    """chain=3: step j sees the previous step's hidden state at t and token t+j, at position t+j-1,
    and predicts token t+j+1; the loss is the mean of the three steps' cross-entropies."""
    cfg = small_config()
    model = random_model(cfg, seed=2)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # row 0: only tokens 5.. are targets
    out = model(ids)
    loss = mtp_loss(model, out, ids, mask, chain=3)
    ce = torch.nn.functional.cross_entropy
    h, T, steps = out.hidden, ids.shape[1], []
    for j in (1, 2, 3):
        n = T - j
        m = model.mtp_forward(h[:, :n], ids[:, j:], position_ids=torch.arange(j - 1, j - 1 + n).expand(2, n))
        nll = ce(m.logits[:, :-1].flatten(0, 1), ids[:, j + 1:].flatten(), reduction="none")  # t predicts t+j+1
        w = mask[:, j + 1:].flatten().float()
        steps.append((nll * w).sum() / w.sum())
        h = m.hidden
    assert torch.isclose(loss, sum(steps) / 3, atol=1e-6)
    assert torch.isclose(mtp_loss(model, out, ids, mask, chain=1), steps[0], atol=1e-6)
    # distill: the main model's distribution of token t+j+1 (its logits at t+j) as the target
    h, soft = out.hidden, []
    for j in (1, 2):
        n = T - j
        m = model.mtp_forward(h[:, :n], ids[:, j:], position_ids=torch.arange(j - 1, j - 1 + n).expand(2, n))
        p = out.logits[:, j: T - 1].softmax(-1)
        nll = -(p * m.logits[:, :-1].log_softmax(-1)).sum(-1).flatten()
        w = mask[:, j + 1:].flatten().float()
        soft.append((nll * w).sum() / w.sum())
        h = m.hidden
    assert torch.isclose(mtp_loss(model, out, ids, mask, chain=2, distill=True), sum(soft) / 2, atol=1e-6)


def test_mtp_weight_schedule():
    schedule = [(0, 0.3), (1000, 0.1)]
    assert mtp_weight(0, schedule) == 0.3 and mtp_weight(999, schedule) == 0.3 and mtp_weight(1000, schedule) == 0.1
