"""Parallelism applied to a built model from outside: expert parallelism (EP) and FSDP2.

`parallelize(model)` (inside an initialised torch.distributed process group of W ranks) does two things:

1. Expert parallelism. Each MoE block's `Experts` is replaced by `ExpertParallelExperts`, holding
   E / W experts on each rank: `gate_up_proj` and `down_proj` become DTensors sharded on their first
   dimension (`Shard(0)`), so the state dict, torch.distributed.checkpoint and gradient norms see the
   whole tensors. In the forward each rank routes its own tokens, sends every (token, expert) row to
   the rank holding that expert with one all-to-all, runs its local experts with the grouped GEMM,
   and sends the results back with a second all-to-all (both differentiable: the backward is the
   reverse exchange). Tokens never leave a rank otherwise.
2. FSDP2 (`torch.distributed.fsdp.fully_shard`) on every decoder block and on the root (embedding,
   output head, final norm and the MTP layers, which `mtp_forward` calls after the main forward):
   all other parameters are sharded across the W ranks, gathered for the forward and backward of
   their block, and their gradients reduce-scattered (averaged). The expert tensors are left to EP.

Data parallelism is therefore W-way for everything: each rank trains on its own micro-batches.
Gradient scale: FSDP averages the dense gradients over ranks; the expert gradients arrive summed over
the ranks whose tokens used them (through the all-to-all backward), so a hook divides them by W —
both then equal the gradient of the mean of the per-rank losses, which is the 1-process gradient of
the whole batch when the ranks hold equally many loss tokens (the usual DP convention; with uneven
loss masks the per-rank means are weighted equally).

The EP and FSDP meshes are the same W ranks (EP degree = W); E must be divisible by W.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from rlfoundry.model.glm4_moe import Experts, Glm4MoeForCausalLM, MoE, Routing, _Combine, _Dispatch, expert_rows, grouped_mm


class ExpertParallelExperts(nn.Module):
    """The routed experts of one MoE block, E / W per rank, exchanging tokens with all-to-all.
    Parameter names and global shapes are those of `Experts` (checkpoints are interchangeable)."""

    def __init__(self, experts: Experts, mesh: DeviceMesh):
        super().__init__()
        E = experts.gate_up_proj.shape[0]
        self.world, self.rank = mesh.size(), mesh.get_local_rank()
        if E % self.world:
            raise ValueError(f"expert parallelism: n_routed_experts={E} is not divisible by the "
                             f"world size {self.world}")
        self.mesh, self.num_experts, self.local_experts = mesh, E, E // self.world
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name).detach()
            sharded = nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
            # gradients arrive summed over the W data-parallel ranks: average them as FSDP does
            sharded.register_hook(lambda g, w=self.world: g / w)
            setattr(self, name, sharded)

    def forward(self, x_ND: Tensor, routing: Routing) -> Tensor:
        N, K = routing.ids_NK.shape
        W, El, E = self.world, self.local_experts, self.num_experts
        group = self.mesh.get_group()
        flat_ids = routing.ids_NK.reshape(-1)
        rows = expert_rows(routing.ids_NK, routing.weights_NK, E)  # no padding: all-to-all splits by counts
        x_MD = _Dispatch.apply(x_ND, rows.token_R, rows.row_M, K)  # grouped by global expert id

        # How many rows go to each (destination rank, its local expert), and come from each source.
        send_counts_WL = torch.bincount(flat_ids, minlength=E).view(W, El)
        recv_counts_WL = torch.empty_like(send_counts_WL)
        dist.all_to_all_single(recv_counts_WL, send_counts_WL, group=group)
        send_splits = send_counts_WL.sum(1).tolist()
        recv_splits = recv_counts_WL.sum(1).tolist()

        x_recv = funcol.all_to_all_single_autograd(x_MD, recv_splits, send_splits, group)
        # Received rows are ordered (source rank, local expert): regroup them by local expert.
        local_ids = torch.arange(El, device=x_ND.device).repeat(W).repeat_interleave(recv_counts_WL.reshape(-1))
        perm = local_ids.argsort(stable=True)
        perm_inv = torch.empty_like(perm)
        perm_inv[perm] = torch.arange(perm.numel(), device=perm.device)
        offsets_L = recv_counts_WL.sum(0).cumsum(0).to(torch.int32)

        x_local = x_recv.index_select(0, perm)
        gate_up, down = self.gate_up_proj.to_local(), self.down_proj.to_local()
        gate_MI, up_MI = grouped_mm(x_local, gate_up.transpose(1, 2), offsets_L).chunk(2, dim=-1)
        y_local = grouped_mm(F.silu(gate_MI) * up_MI, down.transpose(1, 2), offsets_L)
        y_recv = y_local.index_select(0, perm_inv)

        y_MD = funcol.all_to_all_single_autograd(y_recv, send_splits, recv_splits, group)
        y_MD = y_MD * rows.weight_R[:, None]
        return _Combine.apply(y_MD.to(x_ND.dtype), rows.token_R, rows.row_M, K)


def parallelize(model: Glm4MoeForCausalLM, mesh: DeviceMesh | None = None, *, expert_parallel: bool = True,
                reshard_after_forward: bool = True) -> Glm4MoeForCausalLM:
    """Apply expert parallelism and FSDP2 to `model` in place over `mesh` (default: all ranks, on
    CUDA when the model is there, else CPU with gloo). Every rank must call it with the same model
    weights (build with the same seed, or load the same checkpoint); returns the model."""
    if not dist.is_initialized():
        raise RuntimeError("parallelize needs torch.distributed to be initialised (torchrun, or "
                           "dist.init_process_group)")
    if mesh is None:
        device = next(model.parameters()).device.type
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    moes = [l.mlp for l in list(model.model.layers) + list(model.model.mtp_layers) if isinstance(l.mlp, MoE)]
    if expert_parallel:
        for moe in moes:
            moe.experts = ExpertParallelExperts(moe.experts, mesh)
    ignored = {p for moe in moes for p in moe.experts.parameters()} if expert_parallel else None
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    # The root unit (embedding, final norm, output head and the MTP layers) stays gathered after the
    # forward: the MTP loss (`mtp_forward`, called after `forward`) uses all of them again.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, ignored_params=ignored)
    return model


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with every DTensor gathered into a plain tensor (collective: call it on
    every rank). Works for unparallelised models too (then it is just the state dict)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items()}


def all_reduce_(t: Tensor, op: str = "sum") -> Tensor:
    """Sum (or average, or take the largest of) `t` over all ranks in place; a no-op without a
    process group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t.div_(dist.get_world_size())
    return t


@torch.no_grad()
def all_reduce_grads_(parameters, divide_by: float = 1.0) -> None:
    """Replicated data parallelism (every rank of the default process group holds the whole model):
    sum the plain gradients over the ranks, then divide them by `divide_by`. One collective per
    dtype over a flat buffer of all of them, not one per tensor. A parameter that got no gradient
    on this rank counts as zeros where another rank's micro-batches reached it, and keeps no
    gradient where no rank's did (so that the optimizer skips it, as it would in one process).
    DTensor gradients (FSDP, expert parallelism) are left alone: their collectives reduced them.
    A no-op without a process group of more than one rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    params = [p for p in parameters if p.requires_grad and not isinstance(p, DTensor)]
    if not params:
        return
    device = params[0].device
    seen = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(seen)
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p, n in zip(params, seen.tolist()):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        if divide_by != 1.0:
            flat.div_(divide_by)
        for p, g in zip(group, flat.split([p.numel() for p in group])):
            p.grad.copy_(g.view_as(p.grad))


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> Tensor:
    """Clip the global gradient norm of plain and DTensor parameters to `max_norm`; returns the norm
    before clipping. Sharded gradients contribute their local squares, summed over ranks once."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    sq = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for g in sharded:
        sq += g.to_local().float().pow(2).sum()
    all_reduce_(sq)
    for g in plain:
        sq += g.float().pow(2).sum()
    total = sq.sqrt()
    if max_norm < float("inf"):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.dtype))
    return total
