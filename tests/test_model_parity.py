"""Our model against transformers' Glm4MoeForCausalLM on the same weights (fp32, max abs diff 1e-5)."""

import zlib

import pytest
import torch
import torch.nn.functional as F

from conftest import hf_twin, random_model, small_config
from rlfoundry.model.glm4_moe import SMALL_PRODUCT_ROWS

CONFIGS = {
    "qknorm-bias-grouped-dense0": dict(use_qk_norm=True, attention_bias=True, n_group=4, topk_group=2,
                                       num_experts_per_tok=3, routed_scaling_factor=2.5, first_k_dense_replace=0),
    "plain-dense1-unnormalised": dict(use_qk_norm=False, attention_bias=False, routed_scaling_factor=1.0,
                                      first_k_dense_replace=1, norm_topk_prob=False),
    "dense2-gqa4-quarter-rope": dict(use_qk_norm=True, attention_bias=False, num_attention_heads=8,
                                     num_key_value_heads=2, partial_rotary_factor=0.25, n_group=2,
                                     topk_group=1, routed_scaling_factor=1.7, first_k_dense_replace=2,
                                     n_shared_experts=2),
    "no-qknorm-bias-grouped-mha": dict(use_qk_norm=False, attention_bias=True, num_key_value_heads=4,
                                       n_group=2, topk_group=1, num_experts_per_tok=2, partial_rotary_factor=1.0,
                                       first_k_dense_replace=1, n_routed_experts=6),
    "rotary-dim-not-dividing-head-dim": dict(partial_rotary_factor=0.75),  # R = 12 of Dh = 16
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_gradients_match_transformers(name):
    cfg = small_config(**CONFIGS[name])
    ours = random_model(cfg, seed=zlib.crc32(name.encode()) % 1000)
    hf = hf_twin(ours)
    ids = torch.randint(0, cfg.vocab_size, (3, 19), generator=torch.Generator().manual_seed(1))
    out = ours(ids)
    ref = hf(ids).logits
    assert out.logits.shape == (3, 19, cfg.vocab_size)
    assert (out.logits - ref).abs().max().item() <= 1e-5
    with torch.no_grad():  # inference: 57 tokens x E experts fit Experts.DENSE_MAX_ROWS, the dense path
        assert 3 * 19 * cfg.n_routed_experts <= ours.model.layers[-1].mlp.experts.DENSE_MAX_ROWS
        assert (ours(ids).logits - ref).abs().max().item() <= 1e-5

    # the same loss through both; gradients of every parameter agree
    def loss_of(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))

    loss_of(out.logits).backward()
    loss_of(ref).backward()
    hf_params = dict(hf.named_parameters())
    checked = 0
    for pname, p in ours.named_parameters():
        if ".mtp_layers." in pname:
            continue
        g_ref = hf_params[pname].grad
        assert p.grad is not None and g_ref is not None, pname
        assert (p.grad - g_ref).abs().max().item() <= 1e-5, pname
        checked += 1
    assert checked == len(hf_params)
    # the routing really was exercised: more than top-k distinct experts were used per layer
    assert all(len(out.routed_experts[:, :, l].unique()) > cfg.num_experts_per_tok
               for l in range(cfg.num_moe_layers))


@pytest.mark.parametrize("n_tokens", [1, 3, 64])
def test_dense_inference_experts_equal_the_sparse_path(n_tokens):
    """Decoding a few tokens runs every expert and zero-weights the ones not chosen; the result is
    the sparse (sorted, grouped-GEMM) path's up to float rounding."""
    cfg = small_config()
    moe = random_model(cfg).model.layers[-1].mlp
    x = torch.randn(n_tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(n_tokens))
    with torch.no_grad():
        routing = moe.gate(x)
        dense = moe.experts(x, routing)
    sparse = moe.experts(x, routing).detach()  # autograd on: the sparse path
    assert n_tokens * cfg.n_routed_experts <= moe.experts.DENSE_MAX_ROWS
    assert (dense - sparse).abs().max().item() <= 1e-6 * max(1.0, sparse.abs().max().item())
    # the experts not chosen contribute nothing: changing their weights changes nothing
    chosen = torch.zeros(cfg.n_routed_experts, dtype=torch.bool)
    chosen[routing.ids_NK.unique()] = True
    with torch.no_grad():
        moe.experts.gate_up_proj[~chosen] = 123.0
        assert torch.equal(moe.experts(x, routing), dense)


@pytest.mark.parametrize("n_tokens", [1, 3, 64])
def test_compiled_inference_experts_equal_the_sparse_path(n_tokens, monkeypatch):
    """Traced by torch.compile (the engine's compiled decoding), the dense path's token counts take
    `_forward_gathered` instead: each chosen expert's weight rows, indexed, and no other expert's
    (dynamo's eager backend here: the path and its arithmetic are under test; the engine's tests
    run it through inductor). The result is the sparse path's up to float rounding."""
    from rlfoundry.model.glm4_moe import Experts

    cfg = small_config()
    moe = random_model(cfg).model.layers[-1].mlp
    x = torch.randn(n_tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(n_tokens))
    sparse = moe.experts(x, moe.gate(x)).detach()
    monkeypatch.setattr(Experts, "_forward_dense", lambda *a: pytest.fail("dense path taken"))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: moe.experts(x, moe.gate(x)), backend="eager", fullgraph=True)
    with torch.no_grad():
        gathered = compiled(x)
        assert (gathered - sparse).abs().max().item() <= 1e-6 * max(1.0, sparse.abs().max().item())
        # the experts not chosen are never read: changing their weights changes nothing
        chosen = torch.zeros(cfg.n_routed_experts, dtype=torch.bool)
        chosen[moe.gate(x).ids_NK.unique()] = True
        moe.experts.gate_up_proj[~chosen] = 123.0
        moe.experts.down_proj[~chosen] = float("nan")
        assert torch.equal(compiled(x), gathered)
    torch._dynamo.reset()


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("rows", [1, 4, 8, 9, SMALL_PRODUCT_ROWS, SMALL_PRODUCT_ROWS + 1])
def test_compiled_inference_over_few_rows_takes_small_products(rows, native, monkeypatch):
    """Traced by torch.compile without autograd, on CPU, a product over at most SMALL_PRODUCT_ROWS
    rows is `small_linear`: the native kernel where it is loaded, else a sum over the input
    dimension (no product op in the graph); more rows a plain F.linear; each equals F.linear up to
    float rounding. Eager calls, and calls with autograd, always take F.linear."""
    from rlfoundry.model import kernels
    from rlfoundry.model.glm4_moe import Linear, takes_small_linear

    assert kernels.load()
    if not native:
        monkeypatch.setitem(kernels._state, "loaded", False)
    layer = Linear(64, 48, bias=True)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
    ops = []

    def capture(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=capture, fullgraph=True, dynamic=False)
    with torch.no_grad():
        want = F.linear(x, layer.weight, layer.bias)
        got = compiled(x)
        assert not takes_small_linear(x, layer.weight)  # (not compiling)
    assert (got - want).abs().max().item() <= 1e-6 * max(1.0, want.abs().max().item())
    mine = [op for op in ops if "rlfoundry_kernels.small_linear" in op]
    dense = [op for op in ops if ("linear" in op or "mm" in op) and "rlfoundry_kernels" not in op]
    if rows <= SMALL_PRODUCT_ROWS:
        assert not dense and len(mine) == int(native), ops
    else:
        assert dense and not mine, ops
    ops.clear()
    torch._dynamo.reset()
    compiled(x).sum().backward()  # with autograd: F.linear whatever the rows
    assert any("linear" in op for op in ops), ops
    torch._dynamo.reset()


def test_large_experts_decode_through_the_sparse_path(monkeypatch):
    """Experts whose weights exceed Experts.DENSE_MAX_WEIGHTS (GLM-4.5's: 3.8G a layer) decode even
    one token through the sparse path, which reads only the chosen experts' weights."""
    from rlfoundry.model.glm4_moe import Experts

    cfg = small_config()
    moe = random_model(cfg).model.layers[-1].mlp
    x = torch.randn(1, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        routing = moe.gate(x)
        dense = moe.experts(x, routing)
        monkeypatch.setattr(Experts, "DENSE_MAX_WEIGHTS", moe.experts.gate_up_proj.numel())
        monkeypatch.setattr(Experts, "_forward_dense", lambda *a: pytest.fail("dense path taken"))
        sparse = moe.experts(x, routing)
    assert (dense - sparse).abs().max().item() <= 1e-6 * max(1.0, sparse.abs().max().item())


def test_float64_model_trains_and_agrees_with_float32():
    """A model cast to fp64 (a precision reference, e.g. for measuring the train-inference
    mismatch) runs forward and backward; torch's grouped GEMM takes no fp64, so its experts run one
    matmul per expert. Its logits are the fp32 model's up to fp32 rounding."""
    from rlfoundry.model.glm4_moe import cast_model

    cfg = small_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits.detach()
    m64 = cast_model(model, torch.float64)
    logits = m64(ids).logits
    assert logits.dtype == torch.float64
    assert (logits.float() - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    logits.square().mean().backward()
    experts = m64.model.layers[-1].mlp.experts
    assert experts.gate_up_proj.grad.dtype == torch.float64 and experts.gate_up_proj.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in m64.parameters() if p.grad is not None)


def test_correction_bias_changes_choice_not_weights():
    cfg = small_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    before = model(ids)
    router = model.moe_routers()[0]
    router.e_score_correction_bias[before.routed_experts[0, 0, 0, 0]] -= 10.0  # push one expert out
    after = model(ids)
    assert before.routed_experts[0, 0, 0, 0] not in after.routed_experts[0, 0, 0]
    # replaying the old choice reproduces the old logits exactly: the bias never enters the weights
    replayed = model(ids, routed_experts=before.routed_experts)
    assert torch.equal(replayed.logits, before.logits)
    assert torch.equal(replayed.routed_experts, before.routed_experts)


def test_padding_mask_matches_transformers():
    cfg = small_config()
    ours = random_model(cfg)
    hf = hf_twin(ours)
    ids = torch.randint(0, cfg.vocab_size, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    a = ours(ids, attention_mask=mask).logits
    b = hf(ids, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max().item() <= 1e-5


def test_segments_equal_separate_sequences():
    cfg = small_config()
    model = random_model(cfg)
    x, y = torch.randint(0, cfg.vocab_size, (1, 7)), torch.randint(0, cfg.vocab_size, (1, 5))
    packed = torch.cat([x, y], dim=1)
    seg = torch.tensor([[0] * 7 + [1] * 5])
    pos = torch.tensor([list(range(7)) + list(range(5))])
    out = model(packed, segment_ids=seg, position_ids=pos).logits
    assert (out[:, :7] - model(x).logits).abs().max() <= 1e-5
    assert (out[:, 7:] - model(y).logits).abs().max() <= 1e-5


def test_mtp_layer_matches_transformers_blocks():
    """The MTP layer, rebuilt from transformers' own RMSNorm and decoder block with its weights."""
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import (Glm4MoeDecoderLayer, Glm4MoeRMSNorm,
                                                                Glm4MoeRotaryEmbedding)

    cfg = small_config()
    model = random_model(cfg)
    d = cfg.to_hf_dict()
    d.pop("architectures"), d.pop("model_type")
    hcfg = Glm4MoeConfig(**d)
    mtp = model.model.mtp_layers[0]
    block = Glm4MoeDecoderLayer(hcfg, layer_idx=cfg.num_hidden_layers).eval()
    block.load_state_dict({k: v for k, v in mtp.state_dict().items()
                           if not k.startswith(("enorm", "hnorm", "eh_proj", "shared_head"))})
    norms = {n: Glm4MoeRMSNorm(cfg.hidden_size, cfg.rms_norm_eps) for n in ("enorm", "hnorm", "final")}
    norms["enorm"].weight.data.copy_(mtp.enorm.weight)
    norms["hnorm"].weight.data.copy_(mtp.hnorm.weight)
    norms["final"].weight.data.copy_(mtp.shared_head.norm.weight)

    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        main = model(ids)
        ours = model.mtp_forward(main.hidden[:, :-1], ids[:, 1:]).logits
        x = mtp.eh_proj(torch.cat([norms["enorm"](model.model.embed_tokens(ids[:, 1:])),
                                   norms["hnorm"](main.hidden[:, :-1])], dim=-1))
        pos = torch.arange(9)[None].expand(2, 9)
        cos_sin = Glm4MoeRotaryEmbedding(hcfg)(x, pos)
        causal = torch.full((9, 9), float("-inf")).triu(1)[None, None]
        x = block(x, attention_mask=causal, position_ids=pos, position_embeddings=cos_sin)
        ref = model.lm_head(norms["final"](x))
    assert ours.shape == (2, 9, cfg.vocab_size)
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("head_dim,factor", [(16, 0.5), (32, 0.25), (16, 1.0), (16, 0.75)])
def test_rope_is_the_half_split_rotation_exactly(head_dim, factor):
    """apply_rope's single element-wise expression equals the textbook half-split rotation of the
    first R channels bit for bit, and leaves the other channels untouched."""
    from rlfoundry.model.glm4_moe import apply_rope, rope_cos_sin

    cfg = small_config(head_dim=head_dim, partial_rotary_factor=factor)
    R = cfg.rotary_dim
    x = torch.randn(2, 5, 3, head_dim)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    cos, sin = rope_cos_sin(pos, cfg, torch.float32)
    out = apply_rope(x, cos, sin, R)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, R, 2, dtype=torch.float32) / R))
    freqs = (pos.float()[..., None] * inv_freq)[:, :, None]
    c, s = freqs.cos(), freqs.sin()
    x1, x2 = x[..., : R // 2], x[..., R // 2: R]
    assert torch.equal(out[..., : R // 2], x1 * c - x2 * s)
    assert torch.equal(out[..., R // 2: R], x2 * c + x1 * s)
    assert torch.equal(out[..., R:], x[..., R:])


def test_fp64_model_agrees_with_itself_compiled():
    """An fp64 model (RL's exact mode) computes its RoPE tables in fp64 as well: with fp32 tables,
    inductor's and eager's fp32 cos/sin differ by an ulp and compiled and eager fp64 logits differed
    by 7e-7 — enough to change fp32-rounded log-probs. Now they agree to fp64 rounding."""
    from rlfoundry.model.glm4_moe import rope_cos_sin

    cfg = small_config()
    pos = torch.arange(300)[None]
    cos, _ = rope_cos_sin(pos, cfg, torch.float64)
    R = cfg.rotary_dim
    exact = (pos.double()[..., None] / cfg.rope_theta ** (torch.arange(0, R, 2, dtype=torch.float64) / R)).cos()
    assert (cos[..., : R // 2] - exact).abs().max() < 1e-13
    model = random_model(cfg, seed=3).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 17))
    with torch.no_grad():
        eager, compiled = model(ids).logits, torch.compile(model)(ids).logits
    assert (eager - compiled).abs().max() < 1e-11


@pytest.mark.parametrize("T", [1, 4])
def test_decode_attention_equals_sdpa(T):
    """The compiled cached forwards' attention (T new queries per row — a decode step, a
    speculative verification — over cached keys of ragged length, GQA) agrees with SDPA's,
    including rows that see only part of the keys."""
    from rlfoundry.model.glm4_moe import decode_attention

    torch.manual_seed(0)
    B, H, G, S, D = 5, 8, 2, 37, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, G, S, D), torch.randn(B, G, S, D)
    lens = torch.tensor([1, 5, 37, 20, 36]) - (T - 1)  # keys before the row's first new query
    pos_BT = (lens - 1).clamp(min=0)[:, None] + torch.arange(T)
    mask_BTS = torch.arange(S)[None, None] <= pos_BT[:, :, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BTS[:, None], scale=D ** -0.5, enable_gqa=True)
    out = decode_attention(q, k, v, mask_BTS, D ** -0.5)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    # the first row's first query sees a single key: its value
    assert torch.equal(out[0, :, 0], v[0, :, 0].repeat_interleave(H // G, 0))


def test_bf16_autocast_runs_expert_gemms_in_bf16_and_attention_in_fp32(monkeypatch):
    """Under CPU bf16 autocast (train.bf16) the expert GEMMs compute in bf16 as nn.Linear does
    (our grouped GEMM is not on autocast's list: they ran in fp32), and attention in fp32 (torch's
    bf16 flash attention on CPU is the slower one). Loss and gradients stay close to fp32's; every
    parameter's gradient is fp32."""
    import rlfoundry.model.glm4_moe as glm

    seen = {"grouped_mm": set(), "sdpa": set()}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen[name].update(a.dtype for a in args[:2])
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(glm, "grouped_mm", spy("grouped_mm", glm.grouped_mm))
    monkeypatch.setattr(glm.F, "scaled_dot_product_attention", spy("sdpa", F.scaled_dot_product_attention))
    cfg = small_config(initializer_range=0.02)
    model = random_model(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))

    def loss_and_grads(bf16: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids).logits.float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref = loss_and_grads(False)
    seen["grouped_mm"].clear(), seen["sdpa"].clear()
    loss, grads = loss_and_grads(True)
    assert seen == {"grouped_mm": {torch.bfloat16}, "sdpa": {torch.float32}}
    assert abs(loss - ref_loss) < 1e-2 * abs(ref_loss)
    assert grads.keys() == ref.keys() and all(g.dtype == torch.float32 for g in grads.values())
    flat, flat_ref = torch.cat([g.flatten() for g in grads.values()]), torch.cat([g.flatten() for g in ref.values()])
    assert (flat - flat_ref).norm() <= 0.05 * flat_ref.norm()  # bf16 keeps 8 bits of mantissa (2% here)
    assert all(F.cosine_similarity(grads[n].flatten(), ref[n].flatten(), dim=0) > 0.9 for n in ref)  # 0.97 worst


def test_bf16_expert_rows_padded_to_buckets_give_the_same_products(monkeypatch):
    """CPU bf16 MoE blocks lay their token-expert pairs out with each expert's rows padded to a
    multiple of BF16_ROW_BUCKET (so that oneDNN's per-shape GEMM kernels are reused from step to
    step) in a static number of rows: the layout is a correct permutation with zero-weight padding,
    and the block's output and gradients are those of the unpadded layout, including experts with
    no rows."""
    from rlfoundry.model import glm4_moe
    from rlfoundry.model import ModelConfig
    from rlfoundry.model.glm4_moe import BF16_ROW_BUCKET as b, Experts, Routing, expert_rows

    g = torch.Generator().manual_seed(0)
    N, K, E = 300, 4, 8
    ids = torch.stack([torch.randperm(6, generator=g)[:K] for _ in range(N)])  # experts 6, 7 get no rows
    ids[:5] = torch.tensor([7, 6, 0, 1])                                       # ... or a few
    weights = torch.rand(N, K, generator=g)
    rows = expert_rows(ids, weights, E, bucket=b)
    M, R = N * K, rows.token_R.numel()
    assert R == -(-(M + E * (b - 1)) // b) * b  # static: the most the padding can take
    sizes = torch.diff(rows.offsets_E, prepend=rows.offsets_E.new_zeros(1))
    assert int(rows.offsets_E[-1]) == R and torch.all(sizes % b == 0)
    assert rows.row_M.unique().numel() == M
    assert torch.equal(rows.token_R[rows.row_M], torch.arange(M) // K)
    assert torch.equal(rows.weight_R[rows.row_M], weights.reshape(-1))
    expert_of_row = torch.repeat_interleave(torch.arange(E), sizes.long())
    assert torch.equal(expert_of_row[rows.row_M], ids.reshape(-1))  # each pair sits in its expert's rows
    padding = torch.ones(R, dtype=torch.bool).index_fill_(0, rows.row_M, False)
    assert padding.sum() == R - M and torch.all(rows.weight_R[padding] == 0)

    cfg = ModelConfig(hidden_size=48, moe_intermediate_size=40, n_routed_experts=E)
    experts = Experts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.normal_(generator=g), experts.down_proj.normal_(generator=g)
    x = torch.randn(N, 48, generator=g, requires_grad=True)
    w = weights.clone().requires_grad_()
    gy = torch.randn(N, 48, generator=g)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = experts(x, Routing(w, ids, None))
        return (y, *torch.autograd.grad(y, (x, w, experts.gate_up_proj, experts.down_proj), gy))

    padded = run()
    monkeypatch.setattr(glm4_moe, "BF16_ROW_BUCKET", 1)
    unpadded = run()
    assert all(torch.equal(p, u) for p, u in zip(padded, unpadded))
