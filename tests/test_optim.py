"""Muon against its definition, and the AdamW half against torch.optim.AdamW."""

import math

import torch

from conftest import random_model, small_config
from rlfoundry.train.optim import Muon, MuonWithAdamW, newton_schulz, param_groups


def reference_ns(M, steps=5):
    """Newton–Schulz written out from the definition (Jordan et al. 2024)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = M.double()
    flip = X.shape[0] > X.shape[1]
    if flip:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if flip else X).float()


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    for shape in [(16, 48), (48, 16), (32, 32)]:
        M = torch.randn(*shape)
        O = newton_schulz(M)
        assert torch.allclose(O, reference_ns(M), atol=1e-4)
        s = torch.linalg.svdvals(O)
        assert s.min() > 0.5 and s.max() < 1.3, s            # singular values pushed towards 1
        U, _, Vh = torch.linalg.svd(M, full_matrices=False)
        assert torch.nn.functional.cosine_similarity(O.flatten(), (U @ Vh).flatten(), dim=0) > 0.95


def test_muon_steps_equal_the_definition():
    torch.manual_seed(1)
    W0 = torch.randn(24, 40)
    grads = [torch.randn(24, 40) for _ in range(3)]
    p = torch.nn.Parameter(W0.clone())
    opt = Muon([p], lr=0.02, momentum=0.95, weight_decay=0.1)
    W, M = W0.clone(), torch.zeros_like(W0)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        M = 0.95 * M + g
        O = reference_ns(g + 0.95 * M)
        W = W * (1 - 0.02 * 0.1) - 0.02 * 0.2 * math.sqrt(40) * O
        assert torch.allclose(p.data, W, atol=1e-5)


def test_update_rms_is_matched_to_02_and_experts_are_separate_matrices():
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.zeros(4, 32, 64))  # 4 experts
    p.grad = torch.randn(4, 32, 64)
    Muon([p], lr=1.0, weight_decay=0.0, nesterov=False).step()
    rms = p.data.pow(2).mean().sqrt().item()
    assert 0.15 < rms < 0.22
    for e in range(4):
        expected = -0.2 * math.sqrt(64) * reference_ns(p.grad[e])
        assert torch.allclose(p.data[e], expected, atol=1e-4)


def test_param_groups_and_the_adamw_half_match_torch():
    model = random_model(small_config())
    muon, adamw = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in adamw} >= {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    assert all(p.ndim == 1 or "embed" in names[id(p)] or "lm_head" in names[id(p)] for p in adamw)
    assert any("experts.gate_up_proj" in names[id(p)] for p in muon) and any("mlp.gate.weight" in names[id(p)] for p in muon)

    # the AdamW half alone (matrices frozen in both), three steps against torch.optim.AdamW
    twin = random_model(small_config())
    for m in (model, twin):
        for p in param_groups(m)[0]:
            p.requires_grad_(False)
    opt = MuonWithAdamW(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW(param_groups(twin)[1], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    ids = torch.randint(0, 97, (2, 9))
    for _ in range(3):
        for m in (model, twin):
            m.zero_grad()
            m(ids).logits.logsumexp(-1).mean().backward()
        opt.step()
        ref.step()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if p.ndim == 1 or "embed" in n or "lm_head" in n:
            assert torch.allclose(p, q, atol=1e-6), n
