"""GLM-4.5: a deep-and-narrow Mixture-of-Experts decoder, in one file.

What this file implements (GLM-4.5 report, arXiv 2508.06471; weights compatible with Hugging Face
`glm4_moe`, whose `Glm4MoeForCausalLM` the tests use as the reference):

- RMSNorm, normalising in fp32 (fp64 in an fp64 model) and casting back before the weight multiply;
- grouped-query attention (few key/value heads shared by many query heads), with an explicit head_dim;
- QK-Norm: a per-head RMSNorm over head_dim on q and k, after the head reshape and before RoPE;
- partial RoPE: only the first `head_dim * partial_rotary_factor` channels of each head rotate, with
  the half-split rotation (channel i pairs with i + rotary_dim/2), cos/sin computed in fp32;
- bias on the q/k/v projections when `attention_bias`, never on the output projection;
- a dense SwiGLU MLP in the first `first_k_dense_replace` blocks and MoE in the rest:
  sigmoid router in fp32 (fp64 in an fp64 model), `e_score_correction_bias` (loss-free balancing)
  used only to choose experts, grouped top-k (a group scores as the sum of its best two experts),
  gate weights from the unbiased scores, renormalised when `norm_topk_prob`, times
  `routed_scaling_factor`, plus an always-on shared expert;
- experts stored as one (E, ...) tensor per projection (so expert parallelism shards dim 0) and run
  as grouped matrix products over expert-sorted tokens — no Python loop over tokens;
- routing replay: the router returns the chosen expert ids and accepts given ids instead;
- the multi-token-prediction (MTP) layer: `eh_proj(cat(enorm(embed(token t+1)), hnorm(h_t)))` -> one
  MoE decoder block -> shared_head.norm -> the shared output head. h_t is the main model's final
  (normed) hidden state, which is what SGLang and vLLM feed their GLM-4.5 MTP drafter;
- a key/value cache for prefill and incremental decoding of a batch of sequences of different lengths;
- the loss-free balance bias update and the sequence-level auxiliary balance loss, as functions;
- bf16 autocast (mixed-precision training): the expert GEMMs follow it as nn.Linear does, the
  norms and the router stay fp32, and on CPU attention computes in fp32 (the faster kernel there).

The file has no distributed code: `parallelize.py` applies FSDP2 / expert parallelism from outside.

Shape legend (suffixes on tensor names): B batch, T query tokens, S key tokens, D hidden size,
H query heads, G key/value heads, Dh head dim, R rotary dim, N flattened tokens (B*T), E routed
experts, K top-k, I expert / MLP width, V vocabulary, L layers.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .config import ModelConfig


# ----------------------------------------------------------------------------- building blocks
def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """The dtype that precision-sensitive steps (norms, router, RoPE tables, log-softmax) compute
    in: fp32 for fp32 / bf16 / fp16 models, fp64 for an fp64 model (`exact: true` in RL)."""
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------- batch invariance
# In fp32 a row's result can depend on how it was batched: the BLAS (MKL on CPU) picks other
# kernels, with other summation orders, by the product's shape and the CPU (on one AMD EPYC rows
# 1 - 3 and 5 - 11 round differently from 4, 8 and >= 12; on one Xeon rows 2 - 5 from >= 6, or
# 2 - 15 from >= 16), and fused attention splits a query's keys into blocks that depend on the
# sequence length. So an engine decoding one token of 500 sequences and a trainer recomputing whole
# sequences round differently: log-probs a few 1e-6 apart, occasionally 1e-5 or (an MoE routing
# near-tie tipped) far more. `set_batch_invariant(model)` makes every row's arithmetic the same
# whatever it is batched with (He & Thinking Machines, "Defeating Nondeterminism in LLM
# Inference", 2025, did this with GPU kernels): the forward's matrix products — linear layers,
# experts, attention's two — are our own CPU kernel's, each output one chain of multiply-adds in
# input order (`invariant_matmul`, kernels/invariant_products.cpp); the MoE sums its experts in
# top-k order on every path, sigmoid and SiLU are built from ops whose scalar and vector code
# agree (`sigmoid`), and attention is two matrix products whose summation over keys only ever sees
# zeros appended (`invariant_attention`). Engine and trainer then agree bit for bit in fp32 (RL's
# `batch_invariant`; tests/test_rl_trainer.py). Without the native kernels (no compiler) the
# products are MKL's with rows padded to `invariant_rows`, what one AMD EPYC's MKL treated alike
# — invariant there, not on every CPU.


def invariant_rows(M: int) -> int:
    """The rows a matrix product is computed with so that each row's result is the one it gets in a
    large batch: M itself from 12 on, else M rounded up to a multiple of 4 (zero rows appended)."""
    return M if M >= 12 else -(-M // 4) * 4


def _pad_rows(x_MA: Tensor, rows: int) -> Tensor:
    return x_MA if rows == x_MA.shape[-2] else torch.cat(
        [x_MA, x_MA.new_zeros(*x_MA.shape[:-2], rows - x_MA.shape[-2], x_MA.shape[-1])], dim=-2)


def invariant_kernels(x: Tensor, *weights: Tensor) -> bool:
    """Whether batch-invariant products of these tensors are `invariant_matmul`'s: fp32 on CPU
    with the native kernels (built and loaded on first use, `kernels.load()`)."""
    return kernels.applies(x.device, x.dtype, *(w.dtype for w in weights), load_now=True)


class _InvariantMatmul(torch.autograd.Function):
    """x [Bt, M, K] times w^T (w [N, K] or [Bt, N, K], any strides) by the native kernel's
    `invariant_matmul`: each output one chain of fused multiply-adds over k in order, so a row's
    result never depends on the other rows, their count or the threads. The backward's products
    are torch's (only the forward's values need be batch-invariant)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        return torch.ops.rlfoundry_kernels.invariant_matmul(x, w)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        dx = g @ w if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw = g.transpose(-1, -2) @ x
            dw = dw.sum(0) if w.dim() == 2 else dw
        return dx, dw


def invariant_matmul(x: Tensor, w: Tensor) -> Tensor:
    """x [Bt, M, K] @ w^T, w [N, K] or [Bt, N, K]: batch-invariant (`_InvariantMatmul`)."""
    return _InvariantMatmul.apply(x, w)


def invariant_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear by `invariant_matmul`; without the native kernels, MKL's with the rows padded to
    `invariant_rows`."""
    if invariant_kernels(x, weight):
        y = invariant_matmul(x.reshape(1, -1, x.shape[-1]), weight).view(*x.shape[:-1], -1)
        return y if bias is None else y + bias
    x_MA = x.reshape(-1, x.shape[-1])
    M = x_MA.shape[0]
    y_MB = F.linear(_pad_rows(x_MA, invariant_rows(M)), weight, bias)[:M]
    return y_MB.view(*x.shape[:-1], -1)


def sigmoid(x: Tensor, invariant: bool = False) -> Tensor:
    """torch.sigmoid, or when `invariant` 1 / (1 + exp(-x)): torch computes sigmoid and silu with
    vector code but the last (numel mod 16) elements of a tensor, or of each thread's share of it,
    with scalar code that rounds differently (4% of values here), so a row's result would depend
    on where the row sits; exp, addition and division agree in both."""
    return 1 / (1 + torch.exp(-x)) if invariant else x.sigmoid()


class _InvariantSiLU(torch.autograd.Function):
    """x / (1 + exp(-x)) forward; torch's fused SiLU backward (one pass instead of autograd through
    four ops: the gradient need not be batch-invariant, only the forward's values)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x / torch.exp(-x).add_(1)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.silu_backward(g, x)


def silu(x: Tensor, invariant: bool = False) -> Tensor:
    """F.silu, or when `invariant` x / (1 + exp(-x)) (see `sigmoid`)."""
    return _InvariantSiLU.apply(x) if invariant else F.silu(x)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up by the native kernel (kernels/invariant_pointwise.cpp): one pass each way,
    silu in `silu`'s invariant form, gate / (1 + exp(-gate)). gate and up may be views of one
    product's halves."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        I = gate.shape[-1]
        return torch.ops.rlfoundry_kernels.swiglu(gate.reshape(-1, I), up.reshape(-1, I)).view(gate.shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        gate, up = ctx.saved_tensors
        I = gate.shape[-1]
        dgate, dup = torch.ops.rlfoundry_kernels.swiglu_backward(g.reshape(-1, I), gate.reshape(-1, I), up.reshape(-1, I))
        return dgate.view(gate.shape), dup.view(up.shape)


def swiglu(gate: Tensor, up: Tensor, invariant: bool = False) -> Tensor:
    """silu(gate) * up; `invariant` (the batch-invariant mode): by the native kernel where it is
    built (`_SwiGLU`), else with `silu`'s invariant form."""
    if invariant and invariant_kernels(gate, up):
        return _SwiGLU.apply(gate, up)
    return silu(gate, invariant) * up


SMALL_PRODUCT_ROWS = 64
"""Compiled CPU inference over at most this many rows (decode steps of up to 64 sequences,
speculative verification and drafting, short prefills) computes its products with small weights
as `small_linear` ..."""
SMALL_PRODUCT_WEIGHTS = 1 << 18
"""... for weights of at most this many elements (1 MB in fp32, which stays in a core's cache
while each block of rows reads it again)."""


def takes_small_linear(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear` computes x @ weight.T as `small_linear`: traced by torch.compile, without
    autograd, on CPU, in the weight's dtype, weights of at most `SMALL_PRODUCT_WEIGHTS` and rows of
    at most `SMALL_PRODUCT_ROWS` (tested last: the only test on a dynamic size, so that a graph
    that never could take the path gets no guard for it)."""
    return (torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == weight.dtype and weight.numel() <= SMALL_PRODUCT_WEIGHTS
            and x.numel() <= SMALL_PRODUCT_ROWS * x.shape[-1])


def small_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear for a few rows, where a few rows would call MKL: at 4 rows its sgemm packs the
    weights before each product (a third of its time), and each of a step's ~20 products passes
    the dispatcher. With the native kernels loaded (`kernels.load()`, which compiled engines call),
    `rlfoundry_kernels::small_linear` (kernels/small_products.cpp): 4 outputs for up to 4 rows from
    each pass over the weights, a row's result independent of the others; graphs compiled ahead of
    time call it directly (aot.py). Measured alone, a 128 x 128 product: 0.6 us at 1 row and 1.2 us
    at 4 against 3.3 and 6.6 us for the sums below; in the engine (compiled engines, decode steps
    ahead of time, taking turns in one process, 128 greedy tokens a sequence, median of 3 rounds)
    up to 64 rows against MKL's product past 8: 1.45x the tokens/s at batch 12, 1.13x at 16, 1.23x
    at 32; up to 64 against MKL's past 32: 1.20x at 48, 1.06x at 64 — hence `SMALL_PRODUCT_ROWS`.
    Without the kernels (a failed build: inductor itself needs the compiler), each output's sum
    over the input dimension, for inductor to write as a reduction kernel fused with its
    neighbours (the norm before it, the bias and activation after): against MKL 1.23x at batch 1,
    1.40x at 4, 1.05x at 8, 0.87 - 0.93x at 16, since each row reads the weights again. Either
    result equals F.linear's up to float rounding (another summation order: ~1e-7 relative)."""
    if kernels.applies(x.device, x.dtype, weight.dtype):
        y = torch.ops.rlfoundry_kernels.small_linear(x, weight)
    else:
        y = (x[..., None, :] * weight).sum(-1)
    return y if bias is None else y + bias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, invariant: bool = False) -> Tensor:
    """F.linear; `invariant_linear` when `invariant`; `small_linear` where `takes_small_linear`."""
    if invariant:
        return invariant_linear(x, weight, bias)
    if takes_small_linear(x, weight):
        return small_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) that pads its rows to `invariant_rows` when the
    model is batch-invariant, and takes `small_linear` for compiled inference over a few rows."""
    batch_invariant = False

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.batch_invariant)


@dataclass
class PackedSequences:
    """Rows that pack several sequences (`forward`'s segment_ids and prefix_lens: a prompt shared by
    the responses after it) as Q separate sequences, for `invariant_attention`, whose keys must sit
    at the same index as in the engine's KV cache: each sequence's keys are exactly the tokens its
    queries may see, in order (a response's: the prompt, then the response), and its queries only
    its own tokens (a response's: not the shared prompt's, which its own sequence computes)."""
    keys_QS: Tensor    # flat index (b * T + i) of the row token at each key place of each sequence
    queries_QT: Tensor  # flat index of each of its own tokens (the queries)
    mask_QTS: Tensor   # key place s is visible to query t: s <= the query's own place
    scatter_N: Tensor  # [B * T] where each row token's query is (q * T' + t)
    # the native kernel's form (`_InvariantAttention`: no unpacking): a sequence's key places as
    # positions in its row, each row token's sequence and its own key place there (-1: padding)
    key_slots_QS: Tensor  # keys_QS mod T
    seq_BT: Tensor
    place_BT: Tensor


def segment_prefixes(prefix_lens: Tensor, n_segments: int) -> Tensor:
    """`forward`'s prefix_lens, [B] (one for every segment of a row) or [B, K] (one per segment id),
    as [B, n_segments]."""
    if prefix_lens.dim() == 1:
        return prefix_lens[:, None].expand(-1, n_segments)
    if prefix_lens.shape[1] < n_segments:
        raise ValueError(f"prefix_lens has {prefix_lens.shape[1]} columns for segment ids up to {n_segments - 1}")
    return prefix_lens[:, :n_segments]


def packed_sequences(segment_ids_BT: Tensor, prefix_lens: Tensor | None, valid_BT: Tensor) -> PackedSequences:
    """The sequences of packed rows: one per (row, segment id) present; a token belongs to its own
    segment's sequence, and the first prefix_lens[b] (or prefix_lens[b, s]: `segment_prefixes`)
    tokens of row b to every sequence of the row (to segment s's)."""
    B, T = segment_ids_BT.shape
    dev = segment_ids_BT.device
    seg_BT = segment_ids_BT.long()
    S = int(seg_BT.max()) + 1
    prefix_BST = torch.zeros(B, S, T, dtype=torch.bool, device=dev) if prefix_lens is None else \
        torch.arange(T, device=dev)[None, None] < segment_prefixes(prefix_lens.to(dev), S)[:, :, None]
    own_BST = (seg_BT[:, None, :] == torch.arange(S, device=dev)[None, :, None]) & valid_BT[:, None, :]
    member_BST = own_BST | (prefix_BST & valid_BT[:, None, :])
    exists_BS = own_BST.any(-1)
    row_B11 = (torch.arange(B, device=dev) * T)[:, None, None]

    def in_order(chosen_BST: Tensor) -> Tensor:  # each sequence's chosen tokens first, in order
        n = int(chosen_BST.sum(-1).max())
        return (torch.argsort((~chosen_BST).to(torch.int8), dim=-1, stable=True)[..., :n] + row_B11)[exists_BS]

    keys_QS, queries_QT = in_order(member_BST), in_order(own_BST)
    place_BST = member_BST.long().cumsum(-1) - 1  # a token's key place in each sequence it belongs to
    query_place_QT = place_BST.flatten(0, 1)[exists_BS.flatten()].gather(1, queries_QT % T)
    mask_QTS = torch.arange(keys_QS.shape[1], device=dev)[None, None] <= query_place_QT[..., None]
    seq_BT = (exists_BS.flatten().long().cumsum(0).view(B, -1) - 1).gather(1, seg_BT)
    own_place_BT = (own_BST.long().cumsum(-1) - 1).gather(1, seg_BT[:, None, :]).squeeze(1)
    scatter_N = torch.where(valid_BT, seq_BT * queries_QT.shape[1] + own_place_BT, 0).flatten()
    place_BT = torch.where(valid_BT, place_BST.gather(1, seg_BT[:, None, :]).squeeze(1), -1)
    return PackedSequences(keys_QS, queries_QT, mask_QTS, scatter_N, keys_QS % T, seq_BT, place_BT)


class _InvariantAttention(torch.autograd.Function):
    """`invariant_attention` by the native kernel (kernels/invariant_attention.cpp): each query
    walks its visible keys in order — scores, softmax, weighted values, a fixed sequence of
    operations on those keys alone — and the backward recomputes its weights the same way. The
    kernel reads packed rows in place (`seq_BT`, `keys_QS`: see `PackedSequences`)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, pos_BT: Tensor, seq_BT: Tensor, keys_QS: Tensor,
                scale: float) -> Tensor:
        out, stats = torch.ops.rlfoundry_kernels.invariant_attention(q, k, v, pos_BT, seq_BT, keys_QS, scale)
        ctx.save_for_backward(q, k, v, out, stats, pos_BT, seq_BT, keys_QS)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        dq, dk, dv = torch.ops.rlfoundry_kernels.invariant_attention_backward(g, *ctx.saved_tensors, ctx.scale)
        return dq, dk, dv, None, None, None, None


def invariant_attention(q_BHTD: Tensor, k_BGSD: Tensor, v_BGSD: Tensor,
                        mask_BTS: "Tensor | PackedSequences | None", scale: float,
                        positions_BT: Tensor | None = None) -> Tensor:
    """Softmax attention whose result for a query depends only on the keys it sees, never on the
    batch, the other queries or the keys hidden from it. A query sees a prefix of its sequence's
    keys, places 0..p — as a decode's KV cache holds a sequence's keys at positions 0..p, and as a
    trainer's sequence has them: `mask_BTS` None is causal; a KV cache's mask comes with the
    queries' `positions_BT` (key j visible iff j <= the position); `PackedSequences` are rows that
    pack several sequences (a prompt shared by the responses after it).

    fp32 on CPU with the native kernels: `_InvariantAttention`, which reads only each query's
    visible keys. Otherwise the scores are one matrix product per key/value group (the group's
    query heads and the T queries as rows, padded to `invariant_rows`); the softmax's numerator
    exp(s - max) is 0 on hidden keys, and numerator times values and the denominator come out of
    one more product, with [V | 1] — so hidden keys add exact zeros to a sum whose order MKL fixes
    by the key index (a `sum` over keys would not: its vector lanes change with the row length);
    packed rows are unpacked into their sequences for the attention alone; a mask tensor without
    positions is taken as it is. Values [B, G, S, D + 1] are taken to be [V | 1] already (a
    `value_ones` KV cache's; the kernel reads the first D channels)."""
    if invariant_kernels(q_BHTD, k_BGSD, v_BGSD) and (positions_BT is not None or not isinstance(mask_BTS, Tensor)):
        if isinstance(mask_BTS, PackedSequences):
            pos_BT, seq_BT, keys_QS = mask_BTS.place_BT, mask_BTS.seq_BT, mask_BTS.key_slots_QS
        else:
            B, T, S = q_BHTD.shape[0], q_BHTD.shape[2], k_BGSD.shape[2]
            pos_BT = positions_BT if positions_BT is not None else \
                (torch.arange(T, device=q_BHTD.device) + (S - T)).expand(B, T)
            seq_BT = keys_QS = pos_BT.new_empty(0)
        return _InvariantAttention.apply(q_BHTD, k_BGSD, v_BGSD, pos_BT.long(), seq_BT, keys_QS, scale)
    B, H, T, D = q_BHTD.shape
    if isinstance(mask_BTS, PackedSequences):  # attend within each sequence, laid out on its own
        seqs = mask_BTS
        Q, Tq = seqs.queries_QT.shape

        def unpack(x_BHTD: Tensor, index: Tensor) -> Tensor:
            return x_BHTD.transpose(1, 2).reshape(B * T, -1, D)[index].transpose(1, 2)
        out_QHTD = invariant_attention(unpack(q_BHTD, seqs.queries_QT), unpack(k_BGSD, seqs.keys_QS),
                                       unpack(v_BGSD, seqs.keys_QS), seqs.mask_QTS, scale)
        return out_QHTD.transpose(1, 2).reshape(Q * Tq, H, D)[seqs.scatter_N].view(B, T, H, D).transpose(1, 2)
    G, S = k_BGSD.shape[1], k_BGSD.shape[2]
    M = H // G * T
    if mask_BTS is None:
        mask_BTS = torch.ones(T, S, dtype=torch.bool, device=q_BHTD.device).tril(S - T)[None]
    kernel = invariant_kernels(q_BHTD, k_BGSD, v_BGSD)
    if not kernel and S < 12:  # MKL's scores' product needs 12 columns too: hidden zero keys
        k_BGSD, v_BGSD = (F.pad(t, (0, 0, 0, 12 - S)) for t in (k_BGSD, v_BGSD))
        mask_BTS, S = F.pad(mask_BTS, (0, 12 - S), value=False), 12
    P = invariant_rows(M)

    def product(a_BGMX: Tensor, w_BGYX: Tensor) -> Tensor:
        """a @ w^T for each group, each row's bits its own: `invariant_matmul`, else MKL's over P rows."""
        if kernel:
            Y, X = w_BGYX.shape[-2:]
            return invariant_matmul(a_BGMX.reshape(B * G, M, X), w_BGYX.reshape(B * G, Y, X)).view(B, G, M, Y)
        return (_pad_rows(a_BGMX, P) @ w_BGYX.transpose(-1, -2))[:, :, :M]

    s_BGMS = product(q_BHTD.reshape(B, G, M, D) * scale, k_BGSD).contiguous()
    hidden_B1MS = ~mask_BTS[:, None].expand(-1, H // G, T, S).reshape(-1, 1, M, S)
    # in place (the product's output is not kept for its backward); the max is a constant to the
    # softmax, so no gradient flows through it
    e_BGMS = s_BGMS.masked_fill_(hidden_B1MS, float("-inf")).sub_(s_BGMS.detach().amax(-1, keepdim=True)).exp_()
    v1_BGSE = v_BGSD if v_BGSD.shape[-1] == D + 1 else torch.cat([v_BGSD, v_BGSD.new_ones(B, G, S, 1)], dim=-1)
    o_BGME = product(e_BGMS, v1_BGSE.transpose(-1, -2))
    return (o_BGME[..., :D] / o_BGME[..., D:]).view(B, H, T, D)


class _InvariantRMSNorm(torch.autograd.Function):
    """RMSNorm by the native kernel (kernels/invariant_pointwise.cpp): one pass a row each way,
    r = 1 / sqrt(sum(x^2) / D + eps) with the row's sum of squares in a fixed order (not torch's
    mean and rsqrt: the same function up to rounding), then w * (x * r) as `RMSNorm.forward`."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, eps: float) -> Tensor:
        y, r = torch.ops.rlfoundry_kernels.rms_norm(x.reshape(-1, x.shape[-1]), w, eps)
        ctx.save_for_backward(x, w, r)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w, r = ctx.saved_tensors
        dx, dw = torch.ops.rlfoundry_kernels.rms_norm_backward(g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]),
                                                               w, r)
        return dx.view(x.shape), dw, None


class RMSNorm(nn.Module):
    batch_invariant = False

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if self.batch_invariant and invariant_kernels(x, self.weight):
            return _InvariantRMSNorm.apply(x, self.weight, self.eps)
        x32 = x.to(at_least_fp32(x.dtype))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(position_ids_BT: Tensor, cfg: ModelConfig, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and signed sin [B, T, Dh] over a whole head, computed in fp32 (in fp64 for an fp64
    model: fp32 cos/sin differ by an ulp between eager and compiled kernels) and cast to `dtype`.

    Rotary channels i < R/2 get (cos, -sin), R/2 <= i < R get (cos, sin) — the half-split layout —
    and the pass-through channels i >= R get (1, 0), so `apply_rope` is one element-wise expression
    over the whole head (with tables R wide, rotating a slice and concatenating the pass-through
    channels back on, compiled backward passes recomputed the tables under masks: 3x slower)."""
    R, Dh = cfg.rotary_dim, cfg.head_dim
    ct = at_least_fp32(dtype)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, R, 2, dtype=ct, device=position_ids_BT.device) / R))
    freqs = position_ids_BT.to(ct)[..., None] * inv_freq  # [B, T, R/2]
    cos, sin = freqs.cos(), freqs.sin()
    pad = freqs.new_zeros(*freqs.shape[:-1], Dh - R)
    cos_BTD = torch.cat([cos, cos, pad + 1], dim=-1)
    sin_BTD = torch.cat([-sin, sin, pad], dim=-1)
    return cos_BTD.to(dtype), sin_BTD.to(dtype)


class _InvariantRope(torch.autograd.Function):
    """`apply_rope` by the native kernel (kernels/invariant_pointwise.cpp): one pass each way, each
    channel fma(x, cos, partner * sin)."""

    @staticmethod
    def forward(ctx, x_BTHD: Tensor, cos_BTD: Tensor, sin_BTD: Tensor, R: int) -> Tensor:
        B, T, H, D = x_BTHD.shape
        cos_ND, sin_ND = (t.expand(B, T, D).reshape(B * T, D) for t in (cos_BTD, sin_BTD))
        ctx.save_for_backward(cos_ND, sin_ND)
        ctx.R = R
        return torch.ops.rlfoundry_kernels.rope(x_BTHD.reshape(B * T, H, D), cos_ND, sin_ND, R).view(B, T, H, D)

    @staticmethod
    def backward(ctx, g_BTHD: Tensor):
        B, T, H, D = g_BTHD.shape
        dx = torch.ops.rlfoundry_kernels.rope_backward(g_BTHD.reshape(B * T, H, D), *ctx.saved_tensors, ctx.R)
        return dx.view(B, T, H, D), None, None, None


def apply_rope(x_BTHD: Tensor, cos_BTD: Tensor, sin_BTD: Tensor, rotary_dim: int, invariant: bool = False) -> Tensor:
    """Rotate the first R = rotary_dim channels of every head; channel i pairs with i + R/2:
    out = x * cos + partner(x) * signed_sin, where partner swaps the two rotary halves (the
    pass-through channels stay in place; their sin is 0). The rotary channels get exactly
    x1*cos - x2*sin and x2*cos + x1*sin, as in the reference. Built from slices and one
    concatenation, every index stays affine, so compiled kernels vectorise (a flip of a size-2 dim
    made inductor emit a scalar loop: 1.6x slower QK-norm + RoPE forward+backward).
    `invariant` (the batch-invariant mode): by the native kernel where it is built (`_InvariantRope`)."""
    if invariant and invariant_kernels(x_BTHD, cos_BTD, sin_BTD):
        return _InvariantRope.apply(x_BTHD, cos_BTD, sin_BTD, rotary_dim)
    R = rotary_dim
    partner = torch.cat([x_BTHD[..., R // 2: R], x_BTHD[..., : R // 2], x_BTHD[..., R:]], dim=-1)
    return x_BTHD * cos_BTD[:, :, None, :] + partner * sin_BTD[:, :, None, :]


class KVCache:
    """Keys and values of past tokens, one row ("slot") per sequence.

    `k[l]` is [slots, G, max_len, Dh] for layer l; `lens[slot]` counts the tokens cached for that
    sequence. A forward with a cache appends the new tokens of each row at its own position, so a
    batch may mix sequences of different lengths; `truncate` rolls a slot back (speculative decoding).
    One tensor per layer, not one for all: a compiled step then writes its keys and values in place
    (written into a view of one shared tensor, the compiled graph would copy the whole cache).
    A cache made by `for_model` also holds the model's RoPE tables for every position (`rope`), so
    that a cached forward looks its cos/sin up instead of computing them: two indexing ops instead
    of a dozen small ones: at batch 1, 0.93 against 1.01 ms an MTP draft step (2.57 against 2.65 a
    main-model step). The values are the same bits as `rope_cos_sin` on the positions themselves
    (element-wise, checked by a test).
    """

    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 value_ones: bool = False, keys_by_dim: bool = False):
        """`value_ones`: the values carry one more channel, 1 at every position, which
        `invariant_attention` needs beside them ([V | 1]); kept in the cache it is written once,
        where building it each step copied every cached value (~7% of a batch-invariant engine's
        decoding). Attention reads `update`'s values with it; other attention drops it.
        `keys_by_dim`: each layer's keys are stored [slots, G, Dh, max_len] (positions contiguous)
        and `k` holds them as [slots, G, max_len, Dh] views, so that every reader sees the usual
        shape; the native decode attention (`kernels/decode_attention.cpp`) then computes a query's
        scores as vertical products over the positions. The engine's compiled decoding uses it."""
        G, L = num_kv_heads, max_len
        keys = [torch.zeros((num_slots, G, head_dim, L) if keys_by_dim else (num_slots, G, L, head_dim),
                            dtype=dtype, device=device) for _ in range(num_layers)]
        values = [torch.zeros(num_slots, G, L, head_dim + value_ones, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.storage = keys + values
        """The tensors the cache's keys and values are (or are views of): every layer's keys, then
        every layer's values. The engine's ahead-of-time compiled functions (`rollout.aot`) take these."""
        self.k, self.v = self.views(self.storage, keys_by_dim)
        self.value_ones = value_ones
        if value_ones:
            for v in self.v:
                v[..., -1] = 1
        self.lens = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.max_len = max_len
        self.rope: tuple[Tensor, Tensor] | None = None  # cos, sin [max_len, Dh] in at_least_fp32(dtype)

    @staticmethod
    def views(storage: list[Tensor], keys_by_dim: bool) -> tuple[list[Tensor], list[Tensor]]:
        """The per-layer keys and values [slots, G, max_len, Dh] over `storage` (every layer's key
        tensor, then every layer's value tensor)."""
        n = len(storage) // 2
        return [k.transpose(2, 3) if keys_by_dim else k for k in storage[:n]], list(storage[n:])

    @classmethod
    def over_storage(cls, storage: list[Tensor], rope: tuple[Tensor, Tensor]) -> "KVCache":
        """A `keys_by_dim` cache whose tensors are `storage` (as another cache's `storage` lists
        them) and whose RoPE tables are `rope`, without lengths: what an ahead-of-time compiled
        function of the engine (`rollout.aot`) builds around the tensors it is given."""
        cache = cls.__new__(cls)
        cache.storage, cache.rope, cache.value_ones, cache.lens = list(storage), rope, False, None
        cache.k, cache.v = cls.views(cache.storage, True)
        cache.max_len = cache.v[0].shape[2]
        return cache

    @classmethod
    def for_model(cls, cfg: ModelConfig, num_slots: int, max_len: int, num_layers: int | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  value_ones: bool = False, keys_by_dim: bool = False) -> "KVCache":
        cache = cls(cfg.num_hidden_layers if num_layers is None else num_layers, num_slots, max_len,
                    cfg.num_key_value_heads, cfg.head_dim, dtype, device, value_ones, keys_by_dim)
        cos, sin = rope_cos_sin(torch.arange(max_len, device=device)[None], cfg, at_least_fp32(dtype))
        cache.rope = (cos[0], sin[0])
        return cache

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Copy slots `src` into slots `dst` pairwise (a source may repeat: the n samples of one
        prompt share its prefill; no slot is both), all of them in one copy per layer tensor, up to
        the longest of them. After a step the engine moves the last sequences into finished slots."""
        s, d = torch.tensor(src, device=self.lens.device), torch.tensor(dst, device=self.lens.device)
        n = int(self.lens[s].max())
        for k, v in zip(self.k, self.v):
            k[d, :, :n] = k[s, :, :n]
            v[d, :, :n] = v[s, :, :n]
        self.lens[d] = self.lens[s]

    def truncate(self, slots: Tensor, new_lens: Tensor) -> None:
        self.lens[slots] = torch.minimum(self.lens[slots], new_lens)

    def reset(self, slots: Tensor) -> None:
        self.lens[slots] = 0


@dataclass
class CacheStep:
    """Where the tokens of one cached forward go: `slots` [B], their positions [B, T], which are real."""
    cache: KVCache
    slots_B: Tensor
    position_ids_BT: Tensor
    valid_BT: Tensor | None  # None: all T tokens of every row are real
    num_keys: int  # key positions attended over: up to the longest sequence after this step
    slot_range: tuple[int, int] | None = None  # slots are first..last-1 in order: read them as a view

    @classmethod
    def make(cls, cache: KVCache, B: int, T: int, slots: Tensor | None, input_lens: Tensor | None,
             device: torch.device) -> "CacheStep":
        slots_B = torch.arange(B, device=device) if slots is None else slots.to(device)
        lens_B = torch.full((B,), T, device=device) if input_lens is None else input_lens.to(device)
        start_B = cache.lens[slots_B]
        arange_T = torch.arange(T, device=device)
        # rows all T long (as often in speculative decoding's MTP catch-up) need no validity mask
        ragged = input_lens is not None and not bool((lens_B == T).all())
        valid_BT = arange_T[None] < lens_B[:, None] if ragged else None
        end = int((start_B + lens_B).max())
        if end > cache.max_len:
            raise ValueError(f"KV cache overflow: a sequence needs {end} positions, the cache holds {cache.max_len}")
        first = int(slots_B[0])
        dense = torch.equal(slots_B, torch.arange(first, first + B, device=device))
        return cls(cache, slots_B, start_B[:, None] + arange_T, valid_BT, max(end, 1),
                   (first, first + B) if dense else None)

    @classmethod
    def rows(cls, cache: KVCache, starts: list[int], T: int, device: torch.device) -> "CacheStep":
        """`make` for slots 0..B-1 in order, T real tokens each, continuing at `starts` (those
        slots' cache lengths, which the caller already holds): three tensor ops instead of ten and
        no read-back, for the engine's per-cycle steps."""
        B, end = len(starts), max(starts) + T
        if end > cache.max_len:
            raise ValueError(f"KV cache overflow: a sequence needs {end} positions, the cache holds {cache.max_len}")
        position_ids_BT = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)
        return cls(cache, torch.arange(B, device=device), position_ids_BT, None, max(end, 1), (0, B))

    def mask(self) -> Tensor:
        """[B, T, S]: key j is visible to the query at position p iff j <= p."""
        S = self.num_keys
        return torch.arange(S, device=self.slots_B.device)[None, None] <= self.position_ids_BT[:, :, None]

    def rope(self, cfg: ModelConfig, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """`rope_cos_sin` of this step's positions, from the cache's tables when it has them in
        the dtype that `rope_cos_sin` would compute in."""
        table = self.cache.rope
        if table is None or table[0].dtype != at_least_fp32(dtype):
            return rope_cos_sin(self.position_ids_BT, cfg, dtype)
        return table[0][self.position_ids_BT].to(dtype), table[1][self.position_ids_BT].to(dtype)

    def advance(self) -> None:
        T = self.position_ids_BT.shape[1]
        added_B = T if self.valid_BT is None else self.valid_BT.sum(1)
        self.cache.lens[self.slots_B] = self.cache.lens[self.slots_B] + added_B

    def update(self, layer: int, k_BGTD: Tensor, v_BGTD: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's keys/values for layer `layer`; return all keys/values [B, G, S, Dh]
        (values [B, G, S, Dh + 1] in a `value_ones` cache)."""
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        v_into = v_cache[..., :k_cache.shape[-1]] if self.cache.value_ones else v_cache
        k_BTGD, v_BTGD = k_BGTD.transpose(1, 2).to(k_cache.dtype), v_BGTD.transpose(1, 2).to(v_cache.dtype)
        slot_BT = self.slots_B[:, None].expand_as(self.position_ids_BT)
        if self.valid_BT is None:  # every row is T real tokens
            k_cache[slot_BT, :, self.position_ids_BT] = k_BTGD
            v_into[slot_BT, :, self.position_ids_BT] = v_BTGD
        else:
            slot_n, pos_n = slot_BT[self.valid_BT], self.position_ids_BT[self.valid_BT]
            k_cache[slot_n, :, pos_n] = k_BTGD[self.valid_BT]
            v_into[slot_n, :, pos_n] = v_BTGD[self.valid_BT]
        S = self.num_keys
        if self.slot_range is not None:
            a, b = self.slot_range
            return k_cache[a:b, :, :S], v_cache[a:b, :, :S]
        return k_cache[self.slots_B, :, :S], v_cache[self.slots_B, :, :S]


# ----------------------------------------------------------------------------- attention
def decode_attention(q_BHTD: Tensor, k_BGSD: Tensor, v_BGSD: Tensor, mask_BTS: Tensor, scale: float,
                     position_ids_BT: Tensor | None = None) -> Tensor:
    """Attention of a few new queries per row (a decode step's one, speculative verification's
    k + 1) over their cached keys. Used by compiled cached forwards of up to DECODE_ATTENTION_MAX_T
    tokens, where SDPA's kernel is mostly per-call overhead (scores are only [B, H, T, S]). The
    queries attend causally (`mask_BTS`: key j visible to the query at position p iff j <= p,
    which `position_ids_BT` gives as well), so a prefill from an empty cache is one such forward.
    On CPU in fp32, with the native kernels built (`kernels.load()`, which compiled engines call)
    and the positions given: `rlfoundry_kernels::decode_attention`, which reads each row's visible
    keys only (at batch 64 about half the time of the form below: measurements in the README).
    Otherwise two batched matrix products around a masked softmax (the query heads of a key/value
    group and the T queries share one product)."""
    if position_ids_BT is not None and kernels.applies(q_BHTD.device, q_BHTD.dtype, k_BGSD.dtype):
        return torch.ops.rlfoundry_kernels.decode_attention(q_BHTD, k_BGSD, v_BGSD, position_ids_BT, scale)
    B, H, T, D = q_BHTD.shape
    G = k_BGSD.shape[1]
    q_BGQD = q_BHTD.reshape(B, G, H // G * T, D)
    scores_BGQS = (q_BGQD @ k_BGSD.transpose(-1, -2)) * scale
    scores_BGHTS = scores_BGQS.view(B, G, H // G, T, -1).masked_fill(~mask_BTS[:, None, None], float("-inf"))
    out_BGQD = scores_BGHTS.softmax(-1).view(B, G, H // G * T, -1) @ v_BGSD
    return out_BGQD.view(B, H, T, D)


DECODE_ATTENTION_MAX_T = 64
"""Compiled cached forwards of at most this many tokens a row attend with `decode_attention`: decode
steps, verification, and the engine's compiled prefills of prompts this long (`Engine._prefill`),
so that one graph serves them all (at most 64 query rows a head in the scores [B, H, T, S])."""


@contextmanager
def _fp32_under_autocast(x: Tensor):
    """Autocast off inside, yielding the dtype to compute in: fp32 under CPU autocast, else x's own.
    On CPU, torch's bf16 flash attention runs slower than its fp32 one (forward and backward ~2x
    at head_dim 32, batch 8 x 256), so a bf16-autocast training step computes attention in fp32
    (also the more accurate choice); on GPUs autocast applies as usual."""
    dev = x.device.type
    if dev == "cpu" and torch.is_autocast_enabled(dev):
        with torch.autocast(dev, enabled=False):
            yield torch.float32
    else:
        yield x.dtype


class Attention(nn.Module):
    batch_invariant = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, G, Dh, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = Linear(D, H * Dh, bias=cfg.attention_bias)
        self.k_proj = Linear(D, G * Dh, bias=cfg.attention_bias)
        self.v_proj = Linear(D, G * Dh, bias=cfg.attention_bias)
        self.o_proj = Linear(H * Dh, D, bias=False)
        if cfg.use_qk_norm:
            self.q_norm = RMSNorm(Dh, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(Dh, cfg.rms_norm_eps)

    def forward(self, x_BTD: Tensor, cos_sin: tuple[Tensor, Tensor], mask_BTS: Tensor | None,
                cache_step: CacheStep | None, layer: int) -> Tensor:
        B, T, _ = x_BTD.shape
        Dh = self.cfg.head_dim
        q_BTHD = self.q_proj(x_BTD).view(B, T, -1, Dh)
        k_BTGD = self.k_proj(x_BTD).view(B, T, -1, Dh)
        v_BTGD = self.v_proj(x_BTD).view(B, T, -1, Dh)
        if self.cfg.use_qk_norm:
            q_BTHD, k_BTGD = self.q_norm(q_BTHD), self.k_norm(k_BTGD)
        R = self.cfg.rotary_dim
        inv = self.batch_invariant
        q_BTHD, k_BTGD = apply_rope(q_BTHD, *cos_sin, R, inv), apply_rope(k_BTGD, *cos_sin, R, inv)
        q, k, v = q_BTHD.transpose(1, 2), k_BTGD.transpose(1, 2), v_BTGD.transpose(1, 2)
        if cache_step is not None:
            k, v = cache_step.update(layer, k, v)
            if v.shape[-1] != Dh and not self.batch_invariant:  # a `value_ones` cache's [V | 1]
                v = v[..., :Dh]
        if self.batch_invariant:
            out_BHTD = invariant_attention(q, k, v, mask_BTS, Dh ** -0.5,
                                           None if cache_step is None else cache_step.position_ids_BT)
        elif T <= DECODE_ATTENTION_MAX_T and cache_step is not None and torch.compiler.is_compiling():
            out_BHTD = decode_attention(q, k, v, mask_BTS, Dh ** -0.5, cache_step.position_ids_BT)
        else:
            mask = None if mask_BTS is None else mask_BTS[:, None]
            with _fp32_under_autocast(q) as dt:  # CPU's bf16 flash attention is slower than fp32
                out_BHTD = F.scaled_dot_product_attention(q.to(dt), k.to(dt), v.to(dt), attn_mask=mask,
                                                          is_causal=mask is None, scale=Dh ** -0.5, enable_gqa=True)
        return self.o_proj(out_BHTD.transpose(1, 2).reshape(B, T, -1))


# ----------------------------------------------------------------------------- MLPs and experts
class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The dense layers' MLP and the shared expert."""
    batch_invariant = False

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.batch_invariant))


@dataclass
class Routing:
    """The router's decision for N tokens."""
    weights_NK: Tensor  # fp32 (fp64 model: fp64) gate weights of the chosen experts (normalised, scaled)
    ids_NK: Tensor      # chosen expert ids
    scores_NE: Tensor   # fp32 (fp64 model: fp64) sigmoid scores of all experts (auxiliary balance loss)


class Router(nn.Module):
    batch_invariant = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.zeros(E, cfg.hidden_size, dtype=torch.float32))
        # Loss-free balancing bias (Wang et al. 2024): shifts the choice only, never the weights.
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))

    def forward(self, x_ND: Tensor, replay_ids_NK: Tensor | None = None) -> Routing:
        cfg = self.cfg
        dt = at_least_fp32(x_ND.dtype)
        scores_NE = sigmoid(linear(x_ND.to(dt), self.weight.to(dt), invariant=self.batch_invariant), self.batch_invariant)
        if replay_ids_NK is None:
            with torch.no_grad():
                ids_NK = self._choose(scores_NE + self.e_score_correction_bias.to(dt))
        else:
            ids_NK = replay_ids_NK.to(device=x_ND.device, dtype=torch.long)
        weights_NK = scores_NE.gather(1, ids_NK)
        if cfg.norm_topk_prob:
            weights_NK = weights_NK / (weights_NK.sum(-1, keepdim=True) + 1e-20)
        return Routing(weights_NK * cfg.routed_scaling_factor, ids_NK, scores_NE)

    def _choose(self, biased_NE: Tensor) -> Tensor:
        """Grouped top-k: keep the `topk_group` groups whose best two experts score highest."""
        cfg = self.cfg
        N, E = biased_NE.shape
        if cfg.topk_group < cfg.n_group:
            grouped = biased_NE.view(N, cfg.n_group, E // cfg.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)                     # [N, n_group]
            keep = group_scores.topk(cfg.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            biased_NE = biased_NE.masked_fill(~group_mask.repeat_interleave(E // cfg.n_group, 1),
                                              float("-inf"))
        return biased_NE.topk(cfg.num_experts_per_tok, dim=-1).indices


def _torch_grouped_mm_applies(a: Tensor, b: Tensor) -> bool:
    """torch's grouped GEMM takes non-empty fp32/bf16/fp16 operands of one dtype with 16-byte
    aligned strides."""
    return hasattr(F, "grouped_mm") and a.numel() > 0 and a.dtype == b.dtype and a.dtype in (
        torch.float32, torch.bfloat16, torch.float16) and all(
        (s * a.element_size()) % 16 == 0 for t in (a, b) for s in t.stride() if s != 1)


def _rows_by_expert(offsets_E: Tensor, M: int) -> tuple[Tensor, Tensor, Tensor]:
    """For M rows grouped by expert (expert e owns rows offsets[e-1]:offsets[e]): the rows of each
    expert [E], the expert of each row [M], and each row's position among its expert's rows [M]."""
    counts = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).long()
    expert_of_row = torch.repeat_interleave(torch.arange(offsets_E.shape[0], device=offsets_E.device), counts,
                                            output_size=M)
    pos = torch.arange(M, device=offsets_E.device) - (offsets_E.long() - counts)[expert_of_row]
    return counts, expert_of_row, pos


BF16_ROW_BUCKET = 64
"""CPU bf16/fp16 expert GEMMs pad each expert's rows to a multiple of this (see `expert_rows`)."""


@dataclass
class ExpertRows:
    """The N*K token-expert pairs of a batch laid out as R rows grouped by expert (what the expert
    GEMMs multiply), with padding rows when `bucket` > 1 (R >= N*K)."""
    token_R: Tensor    # the token each row reads (padding rows read a real token; their weight is 0)
    row_M: Tensor      # the row of each token-expert pair, in token-major order [N*K]
    weight_R: Tensor   # the routing weight of each row (0 on padding rows)
    offsets_E: Tensor  # int32: expert e owns rows offsets[e-1]:offsets[e]


def expert_rows(ids_NK: Tensor, weights_NK: Tensor, E: int, bucket: int = 1) -> ExpertRows:
    """Sort the token-expert pairs by expert (stable), and with `bucket` > 1 pad every expert's rows
    to a multiple of `bucket`. A padding row's routing weight is 0, so its output is dropped and no
    gradient flows through it (the weight gradients get exact zeros from it).
    Why pad: oneDNN compiles a CPU bf16 GEMM kernel for each new shape (~0.5 ms, against ~0.2 ms
    for the product itself at 2600 x 128 x 128), and the rows each expert gets change every step:
    padded, the shapes repeat and hit its cache. Padding here, once per MoE block, rather than
    around each GEMM spares four gathers in the forward and eight in the backward."""
    N, K = ids_NK.shape
    w_M = weights_NK.reshape(-1)
    pair_R, row_M, offsets_E = _row_layout(ids_NK.reshape(-1), E, bucket)
    if bucket == 1:
        return ExpertRows(pair_R // K, row_M, w_M.index_select(0, pair_R), offsets_E)
    weight_R = torch.cat([w_M, w_M.new_zeros(1)]).index_select(0, pair_R)  # pair M: a padding row
    return ExpertRows((pair_R // K).clamp_(max=N - 1), row_M, weight_R, offsets_E)


def _row_layout(flat_ids_M: Tensor, E: int, bucket: int) -> tuple[Tensor, Tensor, Tensor]:
    """The pair (index into the M token-expert pairs; M on padding rows) of each of the R rows, the
    row of each pair [M], and the int32 end of each expert's rows [E]. With `bucket` > 1, R is the
    most rows the padding can take, ceil((M + E * (bucket - 1)) / bucket) * bucket, whatever the
    routing: a size known without reading the ids (torch.compile traces it as a constant); the last
    expert gets the rows the others leave (a multiple of `bucket` too)."""
    M = flat_ids_M.numel()
    order = flat_ids_M.argsort(stable=True)                  # pairs sorted by expert
    counts = flat_ids_M.new_zeros(E).scatter_add_(0, flat_ids_M, torch.ones_like(flat_ids_M))  # static shape
    if bucket == 1:
        pair_R, dest, ends = order, torch.arange(M, device=order.device), counts.cumsum(0)
    else:
        padded = (counts + bucket - 1) // bucket * bucket
        ends = padded.cumsum(0)
        _, expert_of_row, pos = _rows_by_expert(counts.cumsum(0), M)
        dest = (ends - padded)[expert_of_row] + pos          # the row of each sorted pair
        R = (M + E * (bucket - 1) + bucket - 1) // bucket * bucket
        ends[-1] = R
        pair_R = torch.full((R,), M, dtype=torch.long, device=order.device)
        pair_R[dest] = order
    row_M = torch.empty_like(order)
    row_M[order] = dest
    return pair_R, row_M, ends.to(torch.int32)


def _row_bucket(x: Tensor, dtype: torch.dtype, M: int, E: int) -> int:
    """BF16_ROW_BUCKET for CPU bf16/fp16 expert GEMMs of more than 4 rows an expert on average
    (fewer take `_grouped_mm_eager`'s batched path), else 1. fp32 (MKL) has no per-shape cost."""
    return BF16_ROW_BUCKET if x.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and M > 4 * E else 1


def _grouped_mm_eager(x_MA: Tensor, w_EAB: Tensor, offsets_E: Tensor) -> Tensor:
    """Rows offsets[e-1]:offsets[e] of x times w[e] -> [M, B]. For few rows per expert (decoding),
    one batched matmul over rows padded to the busiest expert; otherwise torch's grouped GEMM where
    it applies (16-byte aligned strides), else one matmul per expert — never a loop over tokens."""
    E, M = w_EAB.shape[0], x_MA.shape[0]
    if 0 < M <= 4 * E:
        counts, expert_of_row, pos = _rows_by_expert(offsets_E, M)
        x_ECA = x_MA.new_zeros(E, int(counts.max()), x_MA.shape[1])
        x_ECA[expert_of_row, pos] = x_MA
        return torch.bmm(x_ECA, w_EAB.to(x_MA.dtype))[expert_of_row, pos]
    if _torch_grouped_mm_applies(x_MA, w_EAB):
        return F.grouped_mm(x_MA, w_EAB, offs=offsets_E)
    counts = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).tolist()
    return torch.cat([xe @ w_EAB[e] for e, xe in enumerate(x_MA.split(counts))], dim=0)


def _grouped_wgrad_eager(x_MA: Tensor, g_MB: Tensor, offsets_E: Tensor) -> Tensor:
    """Per-expert x^T g: [E, A, B], the weight gradient of a grouped GEMM."""
    xT = x_MA.t()
    if _torch_grouped_mm_applies(xT, g_MB):
        return F.grouped_mm(xT, g_MB, offs=offsets_E)
    counts = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).tolist()
    return torch.stack([xe.t() @ ge for xe, ge in zip(x_MA.split(counts), g_MB.split(counts))])


def grouped_mm(x_MA: Tensor, w_EAB: Tensor, offsets_E: Tensor) -> Tensor:
    """Eagerly, plain torch ops (autograd through them); under torch.compile, one opaque custom op
    (torch's own grouped_mm rule accepts bf16 only), so compiled graphs fuse everything around the
    expert GEMMs instead of breaking at them. The custom op costs ~0.3 ms a call eagerly."""
    if torch.compiler.is_compiling():
        return _grouped_mm_op(x_MA, w_EAB, offsets_E)
    return _grouped_mm_eager(x_MA, w_EAB, offsets_E)


@torch.library.custom_op("rlfoundry::grouped_mm", mutates_args=())
def _grouped_mm_op(x_MA: Tensor, w_EAB: Tensor, offsets_E: Tensor) -> Tensor:
    return _grouped_mm_eager(x_MA, w_EAB, offsets_E)


@_grouped_mm_op.register_fake
def _(x_MA, w_EAB, offsets_E):
    return x_MA.new_empty(x_MA.shape[0], w_EAB.shape[2])


class _InvariantGroupedMM(torch.autograd.Function):
    """`grouped_mm` of batch-invariant fp32 experts on CPU: the forward by the native kernel's
    `invariant_grouped_matmul` (each output one chain of multiply-adds in input order: an expert's
    row gets the same bits whatever rows share the expert), the backward as `grouped_mm`'s."""

    @staticmethod
    def forward(ctx, x_MA: Tensor, w_EAB: Tensor, offsets_E: Tensor) -> Tensor:
        ctx.save_for_backward(x_MA, w_EAB, offsets_E)
        return torch.ops.rlfoundry_kernels.invariant_grouped_matmul(x_MA, w_EAB.transpose(1, 2), offsets_E)

    @staticmethod
    def backward(ctx, g_MB: Tensor):
        return _grouped_mm_backward(ctx, g_MB)


def _grouped_mm_backward(ctx, g_MB):
    x_MA, w_EAB, offsets_E = ctx.saved_tensors
    g_MB = g_MB.contiguous()
    dx = _grouped_mm_op(g_MB, w_EAB.transpose(1, 2), offsets_E) if ctx.needs_input_grad[0] else None
    dw = None
    if ctx.needs_input_grad[1]:
        if w_EAB.stride(1) == 1:  # w is a transposed view of an [E, B, A] parameter: give its layout
            dw = _grouped_wgrad(g_MB, x_MA, offsets_E).transpose(1, 2)
        else:
            dw = _grouped_wgrad(x_MA, g_MB, offsets_E)
    return dx, dw, None


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


@torch.library.custom_op("rlfoundry::grouped_wgrad", mutates_args=())
def _grouped_wgrad(x_MA: Tensor, g_MB: Tensor, offsets_E: Tensor) -> Tensor:
    return _grouped_wgrad_eager(x_MA, g_MB, offsets_E)


@_grouped_wgrad.register_fake
def _(x_MA, g_MB, offsets_E):
    return x_MA.new_empty(offsets_E.shape[0], x_MA.shape[1], g_MB.shape[1])


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


class _Dispatch(torch.autograd.Function):
    """x [N, D] -> the rows the experts multiply, x[token_R]: [R, D] (see `ExpertRows`). The
    backward is a gather and a sum over each token's K rows: no scatter-add (slow on CPU)."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, token_R: Tensor, row_M: Tensor, K: int) -> Tensor:
        ctx.save_for_backward(token_R, row_M)
        ctx.K = K
        return x_ND.index_select(0, token_R)

    @staticmethod
    def backward(ctx, g_RD: Tensor):
        token_R, row_M = ctx.saved_tensors
        return _Combine.apply(g_RD, token_R, row_M, ctx.K), None, None, None


class _Combine(torch.autograd.Function):
    """The adjoint of _Dispatch for real rows: expert rows [R, D] -> per-token sums of its K rows
    [N, D] (padding rows are not read)."""

    @staticmethod
    def forward(ctx, y_RD: Tensor, token_R: Tensor, row_M: Tensor, K: int) -> Tensor:
        ctx.save_for_backward(token_R, row_M)
        ctx.K = K
        return y_RD.index_select(0, row_M).view(-1, K, y_RD.shape[-1]).sum(1)

    @staticmethod
    def backward(ctx, g_ND: Tensor):
        token_R, row_M = ctx.saved_tensors
        return _Dispatch.apply(g_ND, token_R, row_M, ctx.K), None, None, None


class _WeightedCombine(torch.autograd.Function):
    """The batch-invariant experts' outputs of each token, sum over k of w[n, k] * y[rows[n * K + k]]
    in top-k order, by the native kernel (`combine`: one multiply-add chain a channel) — the
    weighting, gather and sum of `_Combine`'s path in one pass each way."""

    @staticmethod
    def forward(ctx, y_RD: Tensor, rows: Tensor, w_NK: Tensor) -> Tensor:
        rows = rows.long()
        ctx.save_for_backward(y_RD, rows, w_NK)
        return torch.ops.rlfoundry_kernels.combine(y_RD, rows, w_NK)

    @staticmethod
    def backward(ctx, g_ND: Tensor):
        y_RD, rows, w_NK = ctx.saved_tensors
        dy, dw = torch.ops.rlfoundry_kernels.combine_backward(g_ND, y_RD, rows, w_NK)
        return dy, None, dw


def _autocast_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast gives matrix products of `x` (x's own dtype outside autocast)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class Experts(nn.Module):
    """E routed SwiGLU experts held as two tensors: gate_up_proj [E, 2I, D] (gate rows first) and
    down_proj [E, D, I] — the fused layout of transformers 5.x."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    batch_invariant = False
    DENSE_MAX_ROWS = 1024
    """Without autograd, N tokens with N * E <= this go through every expert (`_forward_dense`;
    traced by torch.compile, through the chosen experts' rows only, `_forward_gathered`)..."""
    DENSE_MAX_WEIGHTS = 1 << 24
    """...when all E experts hold at most this many weights: the dense path reads every expert's
    weights for a few tokens, nothing at the tiny model's 0.4M a layer (they stay in cache), 20x the
    sparse path's memory traffic for one token of GLM-4.5 (160 experts, 3.8G weights a layer, of
    which a token uses 8)."""

    def _small(self) -> bool:
        return self.gate_up_proj.numel() + self.down_proj.numel() <= self.DENSE_MAX_WEIGHTS

    def token_switches(self, top_k: int) -> list[int]:
        """The token counts N at which an inference forward (no autograd) of this block takes
        another path from the one below N: the dense path's end and, for CPU bf16/fp16 weights,
        where the sparse path starts padding each expert's rows (`_row_bucket`). A compiled graph
        holds one path, so each is a graph of its own (`Engine.warmup` compiles them all)."""
        E = self.gate_up_proj.shape[0]
        switches = [self.DENSE_MAX_ROWS // E + 1] if self._small() else []
        w = self.gate_up_proj
        if _row_bucket(w, w.dtype, 4 * E + 1, E) > 1:  # the sparse path pads rows where N * K > 4 * E
            switches.append(4 * E // top_k + 1)
        return switches

    def forward(self, x_ND: Tensor, routing: Routing) -> Tensor:
        N, K = routing.ids_NK.shape
        E = self.gate_up_proj.shape[0]
        small = self._small()
        # (autograd's check first: a compiled training graph then gets no guard on N, which would
        # recompile it where N * E crosses DENSE_MAX_ROWS though the path is the same on both sides)
        if not torch.is_grad_enabled() and small and N * E <= self.DENSE_MAX_ROWS:
            if torch.compiler.is_compiling() and not self.batch_invariant:
                return self._forward_gathered(x_ND, routing)
            return self._forward_dense(x_ND, routing)
        dt = _autocast_dtype(x_ND)  # the expert GEMMs honour autocast as nn.Linear does
        bucket = _row_bucket(x_ND, dt, N * K, E)
        mm = grouped_mm
        native = self.batch_invariant and dt == x_ND.dtype and invariant_kernels(x_ND, self.gate_up_proj)
        if native:
            mm = _InvariantGroupedMM.apply
        elif self.batch_invariant:  # MKL's: each expert's product gets a multiple of 4 rows (`invariant_rows`)
            bucket = math.lcm(bucket, 4)
        rows = expert_rows(routing.ids_NK, routing.weights_NK, E, bucket)
        x_RD = _Dispatch.apply(x_ND.to(dt), rows.token_R, rows.row_M, K)  # R >= N*K rows, grouped by expert
        gate_RI, up_RI = mm(x_RD, self.gate_up_proj.to(dt).transpose(1, 2), rows.offsets_E).chunk(2, dim=-1)
        y_RD = mm(swiglu(gate_RI, up_RI, self.batch_invariant), self.down_proj.to(dt).transpose(1, 2), rows.offsets_E)
        if native:  # weighted and summed in top-k order in one pass, as `_forward_dense`
            return _WeightedCombine.apply(y_RD, rows.row_M, routing.weights_NK)
        y_RD = y_RD * rows.weight_R[:, None]
        return _Combine.apply(y_RD.to(x_ND.dtype), rows.token_R, rows.row_M, K)

    def _forward_gathered(self, x_ND: Tensor, routing: Routing) -> Tensor:
        """Where torch.compile traces the dense path's token counts (the engine's compiled decode
        steps, verification, drafting, short prefills): each chosen (token, expert) pair's two
        products over its expert's weights, indexed by the expert id — in our kernel
        (`rlfoundry_kernels::gathered_linear`, the pairs grouped by expert) where the native
        kernels are loaded, else as sums that inductor fuses with the indexing into its
        reduction kernels. Either way only the K chosen experts' rows are read (none copied) and
        the arithmetic is the routed rows' (the dense path's K/E). Measured alone, compiled, one
        block of the tiny model (inductor's sums): 62 against 85 - 149 us for one token, 85
        against 153 - 178 us for four, ~310 against 444 - 657 us for 64. Eagerly the indexing
        would copy [N, K, 2I, D] weights (2 - 6x slower than the dense path), hence compiled only. The
        result equals the sparse path's up to float rounding (~1e-7 relative)."""
        if kernels.applies(x_ND.device, x_ND.dtype, self.gate_up_proj.dtype):  # (see `small_linear`)
            ops = torch.ops.rlfoundry_kernels
            gate_NKI, up_NKI = ops.gathered_linear(x_ND, self.gate_up_proj, routing.ids_NK).chunk(2, dim=-1)
            y_NKD = ops.gathered_linear(silu(gate_NKI) * up_NKI, self.down_proj, routing.ids_NK)
        else:
            gate_NKI, up_NKI = (x_ND[:, None, None, :] * self.gate_up_proj[routing.ids_NK]).sum(-1).chunk(2, dim=-1)
            h_NKI = silu(gate_NKI) * up_NKI
            y_NKD = (h_NKI[:, :, None, :] * self.down_proj[routing.ids_NK]).sum(-1)
        y_NKD = y_NKD.to(routing.weights_NK.dtype)
        return (y_NKD * routing.weights_NK[..., None]).sum(1).to(x_ND.dtype)

    def _forward_dense(self, x_ND: Tensor, routing: Routing) -> Tensor:
        """Decoding a few tokens: every expert on every token (E/K times the sparse path's work)
        in two batched matmuls, combined with the gate weights (zero for experts not chosen).
        Sorting, dispatch and per-expert bookkeeping cost more than that work at small N; the
        result equals the sparse path's up to float rounding (~1e-7 relative)."""
        N = x_ND.shape[0]
        E = self.gate_up_proj.shape[0]
        if self.batch_invariant and invariant_kernels(x_ND, self.gate_up_proj):
            gate_EMI, up_EMI = invariant_matmul(x_ND.expand(E, *x_ND.shape), self.gate_up_proj).chunk(2, dim=-1)
            y_EMD = invariant_matmul(swiglu(gate_EMI, up_EMI, True), self.down_proj)
            # the chosen experts' rows (expert e's output for token n is row e * N + n), weighted and
            # summed in top-k order by the kernel the sparse path's tokens take
            pairs = (routing.ids_NK * N + torch.arange(N, device=x_ND.device)[:, None]).flatten()
            return _WeightedCombine.apply(y_EMD.reshape(E * N, -1), pairs, routing.weights_NK)
        else:
            x_MD = _pad_rows(x_ND, invariant_rows(N)) if self.batch_invariant else x_ND
            gate_EMI, up_EMI = torch.matmul(x_MD, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
            y_EMD = torch.bmm(swiglu(gate_EMI, up_EMI, self.batch_invariant), self.down_proj.transpose(1, 2))
        # the chosen experts' outputs in top-k order, weighted and summed as the sparse path does
        y_NKD = y_EMD[routing.ids_NK, torch.arange(N, device=x_ND.device)[:, None]].to(routing.weights_NK.dtype)
        return (y_NKD * routing.weights_NK[..., None]).sum(1).to(x_ND.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) \
            if cfg.n_shared_experts else None

    def forward(self, x_BTD: Tensor, replay_ids_NK: Tensor | None = None) -> tuple[Tensor, Routing]:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        routing = self.gate(x_ND, replay_ids_NK)
        y_ND = self.experts(x_ND, routing)
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_ND)
        return y_ND.view_as(x_BTD), routing


# ----------------------------------------------------------------------------- decoder
class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x_BTD: Tensor, cos_sin, mask_BTS, cache_step, layer: int,
                replay_ids_NK: Tensor | None = None, keep_B: Tensor | None = None) -> tuple[Tensor, Routing | None]:
        """With `keep_B`, the block's output at position keep_B[b] of each row only, [B, 1, D]:
        attention computes and caches every position's keys and values, the MLP runs on the kept
        positions alone."""
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_sin, mask_BTS, cache_step, layer)
        if keep_B is not None:
            x_BTD = x_BTD[torch.arange(x_BTD.shape[0], device=keep_B.device), keep_B][:, None]
        h_BTD = self.post_attention_layernorm(x_BTD)
        if isinstance(self.mlp, MoE):
            y_BTD, routing = self.mlp(h_BTD, replay_ids_NK)
            return x_BTD + y_BTD, routing
        return x_BTD + self.mlp(h_BTD), None


class MTPLayer(DecoderLayer):
    """Multi-token prediction: from h_t and token t+1, predict token t+2 (one MoE block deep)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, moe=True)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Glm4MoeModel(nn.Module):
    """Embedding, decoder blocks, final norm; the MTP layers sit in `mtp_layers` (HF stores them
    as `model.layers.{num_hidden_layers + j}`; `hf_io` maps the names)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # no init of its own (`init_weights` draws every matrix): nn.Embedding's normal_ under
        # `torch.device("meta")` (load_pretrained) would import torch._dynamo, ~2 s of a start-up
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mtp_layers = nn.ModuleList(MTPLayer(cfg) for _ in range(cfg.num_nextn_predict_layers))


@dataclass
class CausalLMOutput:
    logits: Tensor                        # [B, T, V]
    hidden: Tensor                        # [B, T, D] final normed hidden state (the MTP layer's input)
    routed_experts: Tensor | None         # [B, T, L_moe, K] expert ids chosen in each MoE block
    router_scores: list[Tensor] | None    # per MoE block [B, T, E] fp32 sigmoid scores (return_router)


class Glm4MoeForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Glm4MoeModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.batch_invariant = False  # see set_batch_invariant
        self.init_weights()

    def set_batch_invariant(self, on: bool = True) -> "Glm4MoeForCausalLM":
        """Make every row's fp32 arithmetic independent of its batch: products, attention, RMSNorm
        and rotary embedding by the native kernels (kernels/invariant_*.cpp) where they are built,
        else torch's with MKL's products over rows padded to `invariant_rows` (invariant on some
        CPUs only; its attention's scores are [B, H, T, S], unfit for long sequences). Eager only:
        torch.compile's generated kernels sum in their own orders."""
        for m in self.modules():  # this model and every module with the switch
            if hasattr(m, "batch_invariant"):
                m.batch_invariant = on
        return self

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, zero biases, unit norms (as transformers)."""
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # RMSNorm weights
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias") and not b.is_meta:
                b.zero_()

    # --------------------------------------------------------------------- main forward
    def forward(
        self,
        input_ids: Tensor,
        *,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        cache: KVCache | None = None,
        slots: Tensor | None = None,
        input_lens: Tensor | None = None,
        routed_experts: Tensor | None = None,
        return_router: bool = False,
        layers_fn=None,
        prefix_lens: Tensor | None = None,
    ) -> CausalLMOutput:
        """Logits [B, T, V] for token ids [B, T].

        Without a cache the attention is causal over the T tokens; `attention_mask` [B, T] (1 = real
        token) hides padding keys, `segment_ids` [B, T] keeps packed documents apart, and
        `position_ids` [B, T] defaults to 0..T-1. With `segment_ids`, `prefix_lens` [B] makes the
        first prefix_lens[b] tokens of row b visible to every later query of the row whatever its
        segment: a prompt shared by the responses packed after it (RL trains a group this way);
        [B, K] gives each segment id its own (a prompt that shares only its beginning with the
        row's: hindsight's relabelled ones).
        With `cache`, row b holds the next `input_lens[b]` (default T; the rest is padding) tokens of
        the sequence in cache slot `slots[b]` (default b); their positions continue from
        `cache.lens`, which advances. `routed_experts` [B, T, L_moe, K] replays given expert choices.
        `layers_fn` replaces `forward_layers` (the engine passes a torch.compile'd one for decoding).
        """
        B, T = input_ids.shape
        device = input_ids.device
        cache_step, mask_BTS = None, None
        if prefix_lens is not None and (segment_ids is None or cache is not None):
            raise ValueError("prefix_lens needs segment_ids and no cache")
        if cache is not None:
            cache_step = CacheStep.make(cache, B, T, slots, input_lens, device)
            position_ids, mask_BTS = cache_step.position_ids_BT, cache_step.mask()
        else:
            if position_ids is None:
                position_ids = torch.arange(T, device=device).expand(B, T)
            if attention_mask is not None or segment_ids is not None:
                mask_BTS = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None].expand(B, T, T)
                if attention_mask is not None:
                    mask_BTS = mask_BTS & attention_mask.bool()[:, None, :]
                if segment_ids is not None:
                    same_BTS = segment_ids[:, :, None] == segment_ids[:, None, :]
                    if prefix_lens is not None:  # the prefix of each query's segment
                        pl = prefix_lens.to(device)
                        prefix_BT = pl[:, None].expand(B, T) if pl.dim() == 1 else pl.gather(1, segment_ids.long())
                        same_BTS = same_BTS | (torch.arange(T, device=device)[None, None] < prefix_BT[:, :, None])
                    mask_BTS = mask_BTS & same_BTS
                # a query that may see nothing (left padding) sees itself, so no row is all -inf
                mask_BTS = mask_BTS | torch.eye(T, dtype=torch.bool, device=device)
                if self.batch_invariant:  # each row's real tokens a sequence, keys from place 0 as a cache's
                    valid_BT = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None \
                        else attention_mask.bool()
                    segs = segment_ids if segment_ids is not None else torch.zeros(B, T, dtype=torch.long, device=device)
                    mask_BTS = packed_sequences(segs, prefix_lens, valid_BT)

        logits, h_BTD, routed, scores = (layers_fn or self.forward_layers)(
            input_ids, position_ids, mask_BTS, cache_step, routed_experts, return_router)
        if cache_step is not None:
            cache_step.advance()
        return CausalLMOutput(logits=logits, hidden=h_BTD, routed_experts=routed, router_scores=scores)

    def forward_layers(self, input_ids: Tensor, position_ids: Tensor, mask_BTS: Tensor | None,
                       cache_step: CacheStep | None, routed_experts: Tensor | None = None,
                       return_router: bool = False):
        """Embedding, RoPE tables, the decoder blocks, final norm and output head: (logits, normed
        hidden, routed expert ids [B, T, L_moe, K] or None, router scores or None). No
        data-dependent Python control flow, so torch.compile traces it whole."""
        B, T = input_ids.shape
        x_BTD = self.model.embed_tokens(input_ids)
        cos_BTD, sin_BTD = self._rope(position_ids, cache_step, x_BTD.dtype)
        routings: list[Routing] = []
        for i, layer in enumerate(self.model.layers):
            replay = None
            if routed_experts is not None and self.config.is_moe_layer(i):
                replay = routed_experts[:, :, len(routings)].reshape(B * T, -1)
            if self.gradient_checkpointing and self.training:
                x_BTD, routing = torch.utils.checkpoint.checkpoint(
                    layer, x_BTD, (cos_BTD, sin_BTD), mask_BTS, cache_step, i, replay, use_reentrant=False)
            else:
                x_BTD, routing = layer(x_BTD, (cos_BTD, sin_BTD), mask_BTS, cache_step, i, replay)
            if routing is not None:
                routings.append(routing)
        h_BTD = self.model.norm(x_BTD)
        return (self.lm_head(h_BTD), h_BTD,
                torch.stack([r.ids_NK.view(B, T, -1) for r in routings], dim=2) if routings else None,
                [r.scores_NE.view(B, T, -1) for r in routings] if return_router else None)

    # --------------------------------------------------------------------- multi-token prediction
    def _rope(self, position_ids: Tensor, cache_step: CacheStep | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """RoPE cos/sin of the positions: from the KV cache's tables in a cached forward."""
        if cache_step is None:
            return rope_cos_sin(position_ids, self.config, dtype)
        return cache_step.rope(self.config, dtype)

    def mtp_forward(
        self,
        hidden_BTD: Tensor,
        next_ids: Tensor,
        *,
        position_ids: Tensor | None = None,
        depth: int = 0,
        cache: KVCache | None = None,
        slots: Tensor | None = None,
        input_lens: Tensor | None = None,
        return_router: bool = False,
        layers_fn=None,
        keep_B: Tensor | None = None,
    ) -> CausalLMOutput:
        """MTP layer `depth`: from the main model's hidden state at t and token t+1, logits for t+2.

        `hidden_BTD` is `CausalLMOutput.hidden` at positions t, `next_ids` [B, T] the tokens at
        t+1. Position ids (RoPE) are those of t. Returns logits and the MTP block's own hidden
        state (normed by shared_head.norm). With `cache` (one layer, its own), it decodes
        incrementally as `forward` does — the draft loop of speculative decoding. `layers_fn`
        replaces `mtp_forward_layers` (the engine passes a torch.compile'd one for drafting);
        `keep_B`: the outputs at position keep_B[b] of each row only (see `mtp_forward_layers`).
        """
        if depth >= len(self.model.mtp_layers):
            raise ValueError(f"MTP depth {depth} requested, the model has "
                             f"num_nextn_predict_layers={len(self.model.mtp_layers)}")
        B, T = next_ids.shape
        device = next_ids.device
        cache_step, mask_BTS = None, None
        if cache is not None:
            cache_step = CacheStep.make(cache, B, T, slots, input_lens, device)
            position_ids, mask_BTS = cache_step.position_ids_BT, cache_step.mask()
        elif position_ids is None:
            position_ids = torch.arange(T, device=device).expand(B, T)
        logits, h_BTD, routed, scores = (layers_fn or self.mtp_forward_layers)(
            hidden_BTD, next_ids, position_ids, mask_BTS, cache_step, depth, return_router, keep_B)
        if cache_step is not None:
            cache_step.advance()
        return CausalLMOutput(logits, h_BTD, routed, scores)

    def mtp_forward_layers(self, hidden_BTD: Tensor, next_ids: Tensor, position_ids: Tensor,
                           mask_BTS: Tensor | None, cache_step: CacheStep | None, depth: int = 0,
                           return_router: bool = False, keep_B: Tensor | None = None):
        """The MTP block's computation (as `forward_layers` is the main model's): (logits, normed
        hidden, routed expert ids [B, T, 1, K], router scores or None). Traceable whole by
        torch.compile. `keep_B` [B]: the outputs at position keep_B[b] of each row only (T = 1 in
        what it returns) — speculative decoding's catch-up of the MTP cache, which needs every
        pair's key and value but drafts from each row's last pair alone; the block's MLP and the
        output head then run on B rows instead of B x T (at batch 1 with 4 pairs, the MoE's 4
        experts instead of up to 16: ~2% of a compiled greedy cycle, ~8% of a 31-token greedy
        speculative prefill, measured in one process against the whole forward)."""
        mtp = self.model.mtp_layers[depth]
        B, T = next_ids.shape
        e_BTD = mtp.enorm(self.model.embed_tokens(next_ids))
        x_BTD = mtp.eh_proj(torch.cat([e_BTD, mtp.hnorm(hidden_BTD)], dim=-1))
        x_BTD, routing = mtp(x_BTD, self._rope(position_ids, cache_step, x_BTD.dtype), mask_BTS, cache_step, 0,
                             keep_B=keep_B)
        T = 1 if keep_B is not None else T
        h_BTD = mtp.shared_head.norm(x_BTD)
        return (self.lm_head(h_BTD), h_BTD, routing.ids_NK.view(B, T, 1, -1),
                [routing.scores_NE.view(B, T, -1)] if return_router else None)

    def token_switches(self) -> list[int]:
        """The token counts (B x T of a cached forward) at which an inference forward changes path,
        sorted: the MoE blocks' (`Experts.token_switches`), main model and MTP layers alike, and on
        CPU the end of the small products (`takes_small_linear`)."""
        K = self.config.num_experts_per_tok
        switches = {n for l in list(self.model.layers) + list(self.model.mtp_layers)
                    if isinstance(l.mlp, MoE) for n in l.mlp.experts.token_switches(K)}
        if any(isinstance(m, (Linear, Router)) and m.weight.device.type == "cpu"
               and m.weight.numel() <= SMALL_PRODUCT_WEIGHTS for m in self.modules()):
            switches.add(SMALL_PRODUCT_ROWS + 1)
        return sorted(switches)

    def moe_routers(self) -> list[Router]:
        """The routers of the main model's MoE blocks, in order (the MTP layers' come after)."""
        return [l.mlp.gate for l in list(self.model.layers) + list(self.model.mtp_layers) if isinstance(l.mlp, MoE)]


class ComputeIn(nn.Module):
    """`model` computing in `dtype` from its own parameters and buffers, cast at every call (autograd
    returns the gradients in the parameters' dtype): fp32 weights with fp64 arithmetic, as RL's
    `exact` mode runs the trainer so that it computes what an fp64 copy of the weights in an engine
    computes. Calls forward only."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, *args, **kwargs):
        cast = {name: t.to(self.dtype) if t.is_floating_point() else t
                for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]}
        return torch.func.functional_call(self.model, cast, args, kwargs)


def cast_model(model: Glm4MoeForCausalLM, dtype: torch.dtype) -> Glm4MoeForCausalLM:
    """Cast to `dtype`, keeping router weights and correction biases in fp32 (as GLM-4.5 does)."""
    model.to(dtype)
    for router in model.moe_routers():
        router.float()
    return model


# ----------------------------------------------------------------------------- load balancing
def expert_load(routed_experts_BTLK: Tensor, num_experts: int, mask_BT: Tensor | None = None) -> Tensor:
    """Tokens routed to each expert of each MoE layer: [L_moe, E] (padding excluded by `mask_BT`)."""
    B, T, L, K = routed_experts_BTLK.shape
    ids = routed_experts_BTLK if mask_BT is None else routed_experts_BTLK[mask_BT.bool()]
    ids_NLK = ids.reshape(-1, L, K)
    offsets = torch.arange(L, device=ids.device)[None, :, None] * num_experts
    return torch.bincount((ids_NLK + offsets).reshape(-1), minlength=L * num_experts).view(L, num_experts)


@torch.no_grad()
def loss_free_bias_update(bias_E: Tensor, load_E: Tensor, rate: float) -> Tensor:
    """Auxiliary-loss-free balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3; GLM-4.5 uses
    rate 0.001): b_i <- b_i + rate * sign(mean_load - load_i). Overloaded experts become less likely
    to be chosen, underloaded ones more. Returns the new bias (fp32)."""
    load = load_E.float()
    return bias_E.float() + rate * torch.sign(load.mean() - load)


@torch.no_grad()
def apply_loss_free_bias_update(model: Glm4MoeForCausalLM, load_LE: Tensor, rate: float) -> None:
    """Update every main-model MoE router's correction bias from its expert load [L_moe, E]."""
    routers = model.moe_routers()[: model.config.num_moe_layers]
    if load_LE.shape[0] != len(routers):
        raise ValueError(f"expert load has {load_LE.shape[0]} layers, the model {len(routers)} MoE layers")
    for router, load_E in zip(routers, load_LE):
        router.e_score_correction_bias.copy_(loss_free_bias_update(router.e_score_correction_bias, load_E, rate))


def sequence_balance_loss(scores_BTE: Tensor, ids_BTK: Tensor, mask_BT: Tensor | None = None) -> Tensor:
    """Sequence-wise auxiliary balance loss of DeepSeek-V3 (arXiv 2412.19437, eq. 17-20), used by
    GLM-4.5 with weight 1e-4 (the weight is the caller's).

    Per sequence: f_i = E / (K * T) * #{t : expert i in top-K of token t},
    P_i = 1/T * sum_t s_it / sum_j s_jt (sigmoid scores normalised per token), loss = sum_i f_i P_i.
    Returns the mean over sequences. With `mask_BT`, T counts only real tokens of each sequence
    (sequences with none are left out).
    """
    B, T, E = scores_BTE.shape
    K = ids_BTK.shape[-1]
    mask = torch.ones(B, T, device=scores_BTE.device) if mask_BT is None else mask_BT.float()
    n_B = mask.sum(1)
    probs_BTE = scores_BTE / scores_BTE.sum(-1, keepdim=True)
    chosen_BTE = torch.zeros_like(scores_BTE).scatter_(2, ids_BTK, 1.0)
    f_BE = (chosen_BTE * mask[..., None]).sum(1) * E / (K * n_B.clamp(min=1)[:, None])
    P_BE = (probs_BTE * mask[..., None]).sum(1) / n_B.clamp(min=1)[:, None]
    per_seq = (f_BE * P_BE).sum(-1)
    keep = n_B > 0
    return per_seq[keep].mean() if keep.any() else per_seq.sum() * 0
