"""The trainer every stage uses (and, later, RL): forward, loss, backward, optimizer step.

`Trainer.train_step(micro_batches)` accumulates gradients over the micro-batches, clips, steps the
optimizer at the scheduled learning rate, applies the loss-free balance bias update from the step's
expert load, and returns the step's metrics. `state_dict` / `load_state_dict` cover the model, the
optimizer, the step and the RNG states, so that a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import fnmatch
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from rlfoundry.model import Glm4MoeForCausalLM, apply_loss_free_bias_update, expert_load
from rlfoundry.train.losses import balance_loss, mtp_loss, mtp_weight, token_cross_entropy
from rlfoundry.train.optim import MuonWithAdamW
from rlfoundry.train.schedule import warmup_cosine


@dataclass
class TrainConfig:
    lr: float = 2.5e-4
    """Peak learning rate."""
    final_lr: float = 2.5e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    total_steps: int = 1000
    """Steps of the schedule (the cosine reaches final_lr here)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (both optimizers)."""
    optimizer: str = "muon"
    """"muon" (Muon for matrices + AdamW for the rest, as GLM-4.5) or "adamw"."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    mtp_schedule: list = field(default_factory=lambda: [(0, 0.3)])
    """[(from_step, weight), ...] of the MTP loss (the report: 0.3, later 0.1)."""
    mtp_chain: int = 1
    """Steps of the MTP loss: 1 trains the layer on (h_t, token t+1) -> token t+2; c > 1 also feeds
    it its own hidden state c-1 times, as speculative decoding's drafts 2..c do (`mtp_loss`)."""
    mtp_distill: bool = False
    """Train the MTP layer towards the main model's own next-token distributions instead of the
    data's tokens (a drafter for speculative decoding; `mtp_loss`)."""
    balance_loss_weight: float = 1e-4
    """Weight of the sequence-level auxiliary balance loss."""
    bias_update_rate: float = 1e-3
    """Loss-free balance bias update rate (0 freezes the bias, as in RL)."""
    bf16: bool = False
    """bf16 autocast for the forward and backward."""
    activation_checkpointing: bool = False
    """Recompute each decoder block in the backward to save memory."""
    freeze: list = field(default_factory=list)
    """fnmatch patterns of parameter names to keep fixed (no gradient, no optimizer state), e.g.
    "*.mlp.gate.weight" for the MoE routers or "model.embed_tokens.*"; each must match a parameter."""
    compile: str = ""
    """"" (eager) or a torch.compile backend for the model's forward and backward: "inductor"
    (fused element-wise kernels; the expert GEMMs stay opaque custom ops; one compile per new input
    shape) or "aot_eager" (traced, not fused: for debugging). Same results as eager to fp32 rounding."""

    def __post_init__(self) -> None:
        if self.optimizer not in ("muon", "adamw"):
            raise ValueError(f"TrainConfig.optimizer must be 'muon' or 'adamw', got {self.optimizer!r}")
        if self.mtp_chain < 1:
            raise ValueError(f"TrainConfig.mtp_chain must be at least 1, got {self.mtp_chain!r}")
        for name in ("lr", "total_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.compile and self.compile not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(f"TrainConfig.compile must be '' or a torch.compile backend "
                             f"({', '.join(torch._dynamo.list_backends())}, ...), got {self.compile!r}")


@dataclass
class Batch:
    input_ids: Tensor                 # [B, T]
    loss_mask: Tensor | None = None   # [B, T], 1 where the token is a target
    segment_ids: Tensor | None = None  # [B, T], packed documents
    position_ids: Tensor | None = None  # [B, T]


class Trainer:
    def __init__(self, model: Glm4MoeForCausalLM, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        model.gradient_checkpointing = cfg.activation_checkpointing
        params = dict(model.named_parameters())
        for pattern in cfg.freeze:
            matched = [name for name in params if fnmatch.fnmatchcase(name, pattern)]
            if not matched:
                raise ValueError(f"TrainConfig.freeze: {pattern!r} matches no parameter of the model")
            for name in matched:
                params[name].requires_grad_(False)
        # What the losses call: the model itself, or its compiled twin (same parameters).
        self.forward_model = torch.compile(model, backend=cfg.compile) if cfg.compile else model
        if cfg.optimizer == "muon":
            self.optimizer = MuonWithAdamW(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            params = [p for p in model.parameters() if p.requires_grad]
            # torch's fused kernel (one call for all tensors; here 1.5 ms a step against 6 - 10 for the
            # default per-tensor loop on CPU) where it applies: plain tensors (not FSDP's DTensors),
            # floating point, on CPU or CUDA; the same update up to rounding
            fused = all(type(p) is torch.nn.Parameter and p.is_floating_point() and p.device.type in ("cpu", "cuda")
                        for p in params)
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95),
                                               fused=fused or None)
        self.step = 0
        self.replicated = False
        """Replicated data parallelism: the model is whole on every rank of the default process
        group, each rank trains on its own micro-batches, and `train_step` sums the gradients over
        the ranks before clipping (see `train_step` for how they are weighted). False: one process,
        or a model that `parallelize` sharded (FSDP reduces its own gradients)."""
        self.horizon: int | None = None
        """Steps of the schedule in place of cfg.total_steps when set: a caller that knows the run
        will stop earlier (RL's loop under max_minutes) sets it so that the decay ends there."""

    def lr_at(self, step: int) -> float:
        c = self.cfg
        return warmup_cosine(step, c.lr, c.final_lr, c.warmup_steps, self.horizon or c.total_steps)

    def autocast(self, device: torch.device):
        """The forward's precision context: bf16 autocast with `bf16`, else nothing. Every forward
        of the model being trained runs under it — the loss (ours or a given `loss_fn`) and any
        no-grad pass whose log-probs the loss compares with (RL's old log-probs)."""
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.cfg.bf16 else contextlib.nullcontext()

    def _loss(self, b: Batch) -> tuple[Tensor, dict]:
        cfg, model = self.cfg, self.model
        out = self.forward_model(b.input_ids, segment_ids=b.segment_ids, position_ids=b.position_ids,
                                 return_router=cfg.balance_loss_weight > 0)
        ce = token_cross_entropy(out.logits, b.input_ids, b.loss_mask)
        loss, metrics = ce, {"loss": ce.item()}
        w = mtp_weight(self.step, cfg.mtp_schedule) if model.config.num_nextn_predict_layers else 0.0
        if w > 0:
            mtp = mtp_loss(model, out, b.input_ids, b.loss_mask, b.position_ids,
                           chain=cfg.mtp_chain, distill=cfg.mtp_distill)
            loss = loss + w * mtp
            metrics["mtp_loss"] = mtp.item()
        if cfg.balance_loss_weight > 0 and out.router_scores:
            bal = balance_loss(out, None if b.segment_ids is None else b.segment_ids >= 0)
            loss = loss + cfg.balance_loss_weight * bal
            metrics["balance_loss"] = bal.item()
        return loss, metrics | {"_routed": out.routed_experts}

    def train_step(self, micro_batches: list, loss_fn=None) -> dict:
        """One optimizer step over `micro_batches` (gradient accumulation); returns its metrics.
        `loss_fn(micro_batch) -> (loss, metrics)` replaces the language-model loss (RL uses it);
        its metrics may carry "_routed" expert ids for the balance bias update and "_weight", the
        micro-batch's share of the step's loss (default: equal shares).

        Over several ranks, the step's gradient and metrics are those of the shares of all ranks'
        micro-batches, normalised by the shares' sum: micro-batches weighted as shares of the whole
        step over all ranks (RL's token-mean: a micro-batch's loss tokens over all ranks' loss
        tokens) sum to 1 and the step is that of one process training them all, up to rounding;
        shares of each rank's own step (the default) make it the mean of the ranks' steps. (FSDP
        averages gradients itself: there the shares must be each rank's own.)"""
        # imported here: parallelize imports FSDP and DTensor (~1.3 s), which whoever only reads a
        # TrainConfig (the RL driver, its buffer and rollout actors) need not pay
        from rlfoundry.model.parallelize import all_reduce_, all_reduce_grads_, clip_grad_norm_

        model, cfg = self.model, self.cfg
        model.train()
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {}
        load = None
        n_tokens = 0
        total_share = 0.0
        for b in micro_batches:
            with self.autocast(b.input_ids.device):
                loss, metrics = (loss_fn or self._loss)(b)
            share = metrics.pop("_weight", 1.0 / len(micro_batches))
            total_share += share
            (loss * share).backward()
            routed = metrics.pop("_routed", None)
            if routed is not None:
                step_load = expert_load(routed, model.config.n_routed_experts)
                load = step_load if load is None else load + step_load
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * share
            n_tokens += getattr(b, "num_tokens", None) or b.input_ids.numel()
        # the shares' sum over all ranks: 1 for shares of the whole step, the world size for each
        # rank's own (and for FSDP's ranks, whose gradients FSDP averages)
        dev = next(model.parameters()).device  # the collectives' tensors where the backend takes them (NCCL: CUDA)
        total_share = float(all_reduce_(torch.tensor(total_share, dtype=torch.float64, device=dev))) or 1.0
        if self.replicated:
            all_reduce_grads_(model.parameters(), divide_by=total_share)
        grad_norm = clip_grad_norm_(list(model.parameters()), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Data-parallel ranks: metrics are share-weighted means over all ranks' micro-batches,
        # tokens and the expert load sums, so that every rank applies the same bias update. No-ops
        # in one process. (Every rank logs the same keys: a rank without micro-batches has none.)
        keys = sorted(sums)
        if self.replicated and dist.is_initialized() and dist.get_world_size() > 1:
            names: list = [None] * dist.get_world_size()
            dist.all_gather_object(names, keys)
            keys = sorted(set().union(*names))
        means = all_reduce_(torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64, device=dev)) / total_share
        sums = dict(zip(keys, means.tolist()))
        n_tokens = round(float(all_reduce_(torch.tensor(float(n_tokens), dtype=torch.float64, device=dev))))
        if load is not None:
            all_reduce_(load)
        if load is not None and cfg.bias_update_rate > 0:
            apply_loss_free_bias_update(model, load, cfg.bias_update_rate)
        self.step += 1
        return {"step": self.step, **sums, "lr": lr, "grad_norm": float(grad_norm), "tokens": n_tokens}

    # ------------------------------------------------------------------ exact resume
    @staticmethod
    def rng_state() -> dict:
        return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}

    @staticmethod
    def set_rng_state(rng: dict) -> None:
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "rng": self.rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.set_rng_state(state["rng"])
