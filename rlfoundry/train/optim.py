"""Optimizers: Muon for matrices, AdamW for the rest — as the GLM-4.5 report trains.

Muon (Jordan et al. 2024; at scale: Liu et al. 2025, "Muon is Scalable for LLM Training",
arXiv 2502.16982, which GLM-4.5 follows):

    M_t = mu * M_{t-1} + G_t                          (mu = 0.95)
    O_t = NewtonSchulz5(G_t + mu * M_t)               (Nesterov form; nesterov=False uses M_t)
    W_t = W_{t-1} - lr * (0.2 * sqrt(max(A, B)) * O_t + wd * W_{t-1})

NewtonSchulz5 runs 5 steps of the quintic X <- a X + (b X X^T + c (X X^T)^2) X with
(a, b, c) = (3.4445, -4.7750, 2.0315) on X = M / ||M||_F, transposed so that rows <= columns; it
maps M to about U V^T of its SVD (singular values near 1). Scaling by 0.2 sqrt(max(A, B)) makes the
update's RMS 0.2, the RMS of a typical AdamW update, so AdamW's learning rate and weight decay carry
over. Every matrix is orthogonalised on its own: a 3-D expert tensor [E, A, B] as E matrices.
Deviation: the iteration runs in fp32 (the reference uses bf16), which only makes it more exact.

AdamW takes the embedding, the output head, biases, norm weights (and any 1-D parameter).

Sharded parameters (DTensors from `rlfoundry.model.parallelize`): the momentum stays sharded; the
Newton–Schulz iteration needs whole matrices, so an FSDP-sharded matrix is gathered, orthogonalised
(identically on every rank) and its local shard kept, while an expert tensor sharded on the expert
dimension already holds whole matrices and is orthogonalised locally.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn

NS_COEFFS = (3.4445, -4.7750, 2.0315)


@torch.no_grad()
def newton_schulz(M: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximate U V^T of M ([..., A, B]) with the quintic Newton–Schulz iteration, in fp32."""
    a, b, c = NS_COEFFS
    X = M.float()
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:
        X = X.transpose(-2, -1)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.transpose(-2, -1)
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.transpose(-2, -1) if transposed else X


def _orthogonalise(m: Tensor, ns_steps: int) -> Tensor:
    """newton_schulz over whole matrices, for plain tensors and DTensors alike."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor  # ~1 s to import: not at start-up

    if not isinstance(m, DTensor):
        return newton_schulz(m, ns_steps)
    if all(isinstance(pl, Shard) and pl.dim < m.ndim - 2 for pl in m.placements):
        return DTensor.from_local(newton_schulz(m.to_local(), ns_steps), m.device_mesh, m.placements,
                                  shape=m.shape, stride=m.stride())
    full = newton_schulz(m.full_tensor(), ns_steps)
    return distribute_tensor(full, m.device_mesh, m.placements, src_data_rank=None)


@torch.no_grad()
def muon_update_(p: Tensor, state: dict, lr: float, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5, rms_scale: float = 0.2) -> None:
    """One Muon step on parameter p (its gradient in p.grad), in place; `state` holds the momentum."""
    g = p.grad.float()
    buf = state.setdefault("momentum_buffer", torch.zeros_like(g))
    buf.mul_(momentum).add_(g)
    o = _orthogonalise(g.add(buf, alpha=momentum) if nesterov else buf, ns_steps)
    p.mul_(1 - lr * weight_decay)
    p.add_(o.to(p.dtype), alpha=-lr * rms_scale * math.sqrt(max(p.shape[-2], p.shape[-1])))


@torch.no_grad()
def adamw_update_(p: Tensor, state: dict, lr: float, weight_decay: float, betas: tuple[float, float],
                  eps: float) -> None:
    """One AdamW step (Loshchilov & Hutter 2019; decoupled weight decay, bias-corrected), in place."""
    g = p.grad.float()
    b1, b2 = betas
    if "step" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(g)
        state["exp_avg_sq"] = torch.zeros_like(g)
    state["step"] += 1
    t = state["step"]
    state["exp_avg"].lerp_(g, 1 - b1)
    state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
    p.mul_(1 - lr * weight_decay)
    p.addcdiv_(state["exp_avg"].to(p.dtype), denom.to(p.dtype), value=-lr / (1 - b1 ** t))


class Muon(torch.optim.Optimizer):
    """Muon for parameters with >= 2 dimensions (the last two are the matrix)."""

    def __init__(self, params: Iterable[Tensor], lr: float = 2.5e-4, momentum: float = 0.95,
                 weight_decay: float = 0.1, nesterov: bool = True, ns_steps: int = 5, rms_scale: float = 0.2):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"Muon: bad hyper-parameters lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      ns_steps=ns_steps, rms_scale=rms_scale))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon takes matrices; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    muon_update_(p, self.state[p], group["lr"], group["momentum"], group["weight_decay"],
                                 group["nesterov"], group["ns_steps"], group["rms_scale"])
        return loss


def param_groups(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(Muon parameters, AdamW parameters): matrices other than the embedding and output head go to
    Muon; the embedding, the output head, biases and norm weights to AdamW."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and "embed_tokens" not in name and "lm_head" not in name:
            muon.append(p)
        else:
            adamw.append(p)
    return muon, adamw


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer over the model: Muon for its matrices, AdamW for the rest (`param_groups`), so
    that schedulers and checkpoints see a single optimizer. Each param group has `kind`."""

    def __init__(self, model: nn.Module, lr: float = 2.5e-4, weight_decay: float = 0.1, momentum: float = 0.95,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8):
        muon, adamw = param_groups(model)
        groups = [dict(params=muon, kind="muon"), dict(params=adamw, kind="adamw")]
        super().__init__([g for g in groups if g["params"]],
                         dict(lr=lr, weight_decay=weight_decay, momentum=momentum, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["kind"] == "muon":
                    muon_update_(p, self.state[p], group["lr"], group["momentum"], group["weight_decay"])
                else:
                    adamw_update_(p, self.state[p], group["lr"], group["weight_decay"], group["betas"], group["eps"])
        return loss
