"""The native CPU kernels (`rlfoundry.model.kernels`): attention of a few queries over a KV cache,
checked against torch's SDPA on both key layouts, several head dims (the compiled ones and the
generic path), GQA ratios and ragged rows; keys past a row's position are never read; a failed
build leaves the pure-torch attention in place. The small products (`small_linear`,
`gathered_linear`) against fp64 products, each row's result bit-identical whatever the rows
beside it, and their C entry points, which the libraries compiled ahead of time call. The
batch-invariant products (`invariant_matmul`, `invariant_grouped_matmul`) against fp64 products,
each output the same bits whatever the rows, batch, threads or weight layout. The batch-invariant
attention (`invariant_attention` and its backward) against fp64 autograd, and a query's result the
same bits alone, decoded against a cache among other rows, and packed after a shared prompt."""

import pytest
import torch
import torch.nn.functional as F

from rlfoundry.model import kernels
from rlfoundry.model.glm4_moe import KVCache, decode_attention


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.load(), "the native kernels did not build (a C++ compiler is needed, as for compile_decode)"


def _case(B, H, G, S, D, T, keys_by_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = S + 5  # the cache is longer than the keys attended over, as in the engine
    k_store = torch.randn(B, G, D, L, generator=g).transpose(2, 3) if keys_by_dim else torch.randn(B, G, L, D, generator=g)
    v_store = torch.randn(B, G, L, D, generator=g)
    k, v = k_store[:, :, :S], v_store[:, :, :S]
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)  # as attention makes it: a transposed view
    lens = torch.randint(T, S + 1, (B,), generator=g)
    lens[0], lens[-1] = T, S  # a row whose first query sees one key; a row that sees them all
    pos_BT = (lens - T)[:, None] + torch.arange(T)
    return q, k, v, pos_BT


@pytest.mark.parametrize("keys_by_dim", [True, False])
@pytest.mark.parametrize("D", [16, 32, 64, 128])
@pytest.mark.parametrize("H,G,T", [(8, 2, 1), (4, 4, 4), (6, 2, 5)])
def test_native_decode_attention_equals_sdpa(keys_by_dim, D, H, G, T):
    B, S = 5, 83  # 83 keys: every block width of the scores (64, 16, 4, 1) is used
    q, k, v, pos_BT = _case(B, H, G, S, D, T, keys_by_dim)
    assert (k.stride(2) == 1) == keys_by_dim
    mask_BTS = torch.arange(S)[None, None] <= pos_BT[:, :, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BTS[:, None], scale=D ** -0.5, enable_gqa=True)
    out = decode_attention(q, k, v, mask_BTS, D ** -0.5, pos_BT)
    torch.testing.assert_close(out, ref, rtol=0, atol=3e-6)
    # the first row's first query sees one key: exactly its value
    assert torch.equal(out[0, :, 0], v[0, :, 0].repeat_interleave(H // G, 0))
    # the pure-torch form (no positions given) agrees too
    torch.testing.assert_close(decode_attention(q, k, v, mask_BTS, D ** -0.5), ref, rtol=0, atol=3e-6)


def test_keys_past_a_rows_position_are_never_read():
    B, H, G, S, D, T = 4, 4, 2, 40, 32, 2
    q, k, v, pos_BT = _case(B, H, G, S, D, T, keys_by_dim=True, seed=1)
    out = torch.ops.rlfoundry_kernels.decode_attention(q, k, v, pos_BT, D ** -0.5)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    for b in range(B):
        poisoned_k[b, :, int(pos_BT[b, -1]) + 1:] = float("nan")
        poisoned_v[b, :, int(pos_BT[b, -1]) + 1:] = float("nan")
    assert torch.equal(torch.ops.rlfoundry_kernels.decode_attention(q, poisoned_k, poisoned_v, pos_BT, D ** -0.5), out)


def test_kv_cache_with_keys_by_dim_reads_and_writes_like_the_usual_layout():
    from rlfoundry.model import ModelConfig

    cfg = ModelConfig.from_preset("tiny")
    a = KVCache.for_model(cfg, num_slots=3, max_len=12)
    b = KVCache.for_model(cfg, num_slots=3, max_len=12, keys_by_dim=True)
    assert b.k[0].shape == a.k[0].shape and b.k[0].stride(2) == 1
    for c in (a, b):
        for i, t in enumerate(c.k):
            t[:, :, :5] = torch.arange(3 * t.shape[1] * 5 * t.shape[3], dtype=t.dtype).view(3, t.shape[1], 5, -1) + i
        c.lens[:] = torch.tensor([5, 2, 4])
        c.copy_slots([0], [2])
    assert all(torch.equal(x, y) for x, y in zip(a.k, b.k))


def test_a_failed_build_leaves_the_torch_attention(monkeypatch, tmp_path):
    monkeypatch.setitem(kernels._state, "loaded", None)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("RLFOUNDRY_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="native CPU kernels are unavailable"):
        assert kernels.load() is False
    assert not kernels.loaded()
    assert not kernels.applies(torch.device("cpu"), torch.float32, load_now=True)  # (no second build tried)
    q, k, v, pos_BT = _case(2, 4, 2, 9, 16, 1, keys_by_dim=True)
    mask_BTS = torch.arange(9)[None, None] <= pos_BT[:, :, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BTS[:, None], scale=0.25, enable_gqa=True)
    torch.testing.assert_close(decode_attention(q, k, v, mask_BTS, 0.25, pos_BT), ref, rtol=0, atol=3e-6)


def test_applies_to_fp32_on_cpu_only():
    """The one test that the engine (its key layout) and decode attention make (`kernels.applies`)."""
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert kernels.applies(cpu, torch.float32) and kernels.applies(cpu, torch.float32, torch.float32, load_now=True)
    assert not kernels.applies(cpu, torch.float32, torch.bfloat16)
    assert not kernels.applies(cpu, torch.float64)
    assert not kernels.applies(meta, torch.float32, load_now=True)


def _ref_close(got, want_f64, x_abs_rowsum):
    """Within fp32 rounding of a sum over K terms: relative to the sum of |x| |w| bounds (|w| <= 4)."""
    err = (got.double() - want_f64).abs()
    assert (err <= 1e-6 * (1 + 4 * x_abs_rowsum)).all(), err.max().item()


@pytest.mark.parametrize("K", [128, 64, 37, 5])
@pytest.mark.parametrize("N", [1, 3, 4, 7, 130])
def test_small_linear_equals_the_product_and_each_row_stands_alone(K, N):
    """y = x w^T for 1 - 9 rows (blocks of 4, then 3, 2, 1; input dims that are not a multiple of
    the vector width; output counts that are not a multiple of 4), any leading dims; and every
    row's outputs are bit-identical to those of the row alone — a speculative cycle's 4 verified
    rows give the plain decode step's values — and to each output's computed alone (the tiles of 4
    outputs sum their vectors' lanes together by the tree that a lone output's sum takes)."""
    g = torch.Generator().manual_seed(K * 1000 + N)
    w = torch.randn(N, K, generator=g).clamp(-4, 4)
    for R in range(1, 10):
        x = torch.randn(R, K, generator=g)
        y = torch.ops.rlfoundry_kernels.small_linear(x, w)
        assert y.shape == (R, N) and y.dtype == torch.float32
        _ref_close(y, x.double() @ w.double().T, x.abs().sum(-1, keepdim=True).double())
        for r in range(R):
            assert torch.equal(torch.ops.rlfoundry_kernels.small_linear(x[r:r + 1], w)[0], y[r])
        for n in range(min(N, 5)):
            assert torch.equal(torch.ops.rlfoundry_kernels.small_linear(x, w[n:n + 1])[:, 0], y[:, n])
    x = torch.randn(2, 3, K, generator=g).transpose(0, 1)  # leading dims, not contiguous
    assert torch.equal(torch.ops.rlfoundry_kernels.small_linear(x, w),
                       torch.ops.rlfoundry_kernels.small_linear(x.contiguous(), w))


@pytest.mark.parametrize("per_pair", [False, True])
def test_gathered_linear_multiplies_each_pair_by_its_expert(per_pair):
    """y[t, p] = w[ids[t, p]] x[t] (or x[t, p]) for routed pairs, several sharing an expert (the
    kernel groups those); each pair's result is bit-identical to the pair computed alone."""
    g = torch.Generator().manual_seed(int(per_pair))
    E, N, K, T, P = 16, 24, 40, 6, 4
    w = torch.randn(E, N, K, generator=g).clamp(-4, 4)
    ids = torch.randint(0, E, (T, P), generator=g)
    ids[1] = ids[0]  # two tokens with the same experts
    ids[2, :2] = ids[2, 0]  # one token choosing an expert twice
    x = torch.randn(T, P, K, generator=g) if per_pair else torch.randn(T, K, generator=g)
    y = torch.ops.rlfoundry_kernels.gathered_linear(x, w, ids)
    xs = x if per_pair else x[:, None].expand(T, P, K)
    want = torch.einsum("tpk,tpnk->tpn", xs.double(), w.double()[ids])
    assert y.shape == (T, P, N)
    _ref_close(y, want, xs.abs().sum(-1, keepdim=True).double())
    for t in range(T):
        for p in range(P):
            alone = torch.ops.rlfoundry_kernels.gathered_linear(xs[t:t + 1, p:p + 1].contiguous(), w, ids[t:t + 1, p:p + 1])
            assert torch.equal(alone[0, 0], y[t, p])
    assert torch.equal(torch.ops.rlfoundry_kernels.small_linear(xs[0, :1], w[ids[0, 0]])[0], y[0, 0])


@pytest.mark.parametrize("threads", [1, 2])
def test_invariant_matmul_gives_every_row_the_same_bits_however_batched(threads):
    """y = x w^T within fp32 rounding of the fp64 product, for 1 - 200 rows, output counts around
    the 32-wide panels (1, 16, 17, 33, 100) and input dims not a multiple of the vector width; each
    row's outputs are the same bits alone, among any rows (200 span two work items of 192), in a
    batch, on 1 or 2 threads, and with the weights read in place (outputs contiguous: a transposed
    view) or packed."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    ops = torch.ops.rlfoundry_kernels
    try:
        g = torch.Generator().manual_seed(threads)
        for N, K in [(1, 5), (16, 37), (17, 64), (33, 45), (100, 128)]:
            w = torch.randn(N, K, generator=g).clamp(-4, 4)
            wt = w.t().contiguous().t()  # the same values, outputs contiguous: read in place
            x = torch.randn(200, K, generator=g)
            y = ops.invariant_matmul(x[None], w)[0]
            _ref_close(y, x.double() @ w.double().T, x.abs().sum(-1, keepdim=True).double())
            for rows in (slice(0, 1), slice(3, 5), slice(7, 19), slice(50, 51)):
                for weights in (w, wt):
                    assert torch.equal(ops.invariant_matmul(x[None, rows], weights)[0], y[rows]), (N, K, rows)
            xb = torch.stack([x[:12], x[12:24].flip(0)])  # batched, w shared and per batch
            yb = ops.invariant_matmul(xb, w)
            assert torch.equal(yb[0], y[:12]) and torch.equal(yb[1], y[12:24].flip(0))
            assert torch.equal(ops.invariant_matmul(xb, torch.stack([w, wt])), yb)
            assert torch.equal(ops.invariant_matmul(x[:9].expand(3, 9, K), w)[2], y[:9])  # batch stride 0
    finally:
        torch.set_num_threads(saved)


def test_invariant_grouped_matmul_equals_each_experts_product():
    """Rows offsets[e-1]:offsets[e] times w[e]^T, bit for bit each expert's `invariant_matmul`
    (empty experts, int32 and int64 offsets, weights given as a transposed view; rows past the last
    expert's are zero); bad offsets are refused."""
    ops = torch.ops.rlfoundry_kernels
    g = torch.Generator().manual_seed(0)
    E, N, K = 5, 40, 24
    w = torch.randn(E, N, K, generator=g)
    counts = [3, 0, 200, 1, 7]
    x = torch.randn(sum(counts), K, generator=g)
    offsets = torch.tensor(counts).cumsum(0)
    for off in (offsets, offsets.int()):
        for weights in (w, w.transpose(1, 2).contiguous().transpose(1, 2)):
            y = ops.invariant_grouped_matmul(x, weights, off)
            start = 0
            for e, c in enumerate(counts):
                assert torch.equal(y[start:start + c], ops.invariant_matmul(x[None, start:start + c], w[e])[0])
                start += c
    tail = ops.invariant_grouped_matmul(x, w, torch.tensor([3, 3, 100, 101, 101]))  # rows 101.. in no expert
    assert torch.equal(tail[:101], ops.invariant_grouped_matmul(x[:101], w, torch.tensor([3, 3, 100, 101, 101])))
    assert torch.equal(tail[101:], torch.zeros(x.shape[0] - 101, N))
    with pytest.raises(RuntimeError, match="offsets must rise"):
        ops.invariant_grouped_matmul(x, w, torch.tensor([3, 2, 200, 211, 211]))


def test_small_products_reject_bad_input():
    ops = torch.ops.rlfoundry_kernels
    w = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="x .*K.* and w"):
        ops.small_linear(torch.randn(2, 7), w)
    with pytest.raises(RuntimeError, match="fp32"):
        ops.small_linear(torch.randn(2, 8, dtype=torch.float64), w)
    with pytest.raises(RuntimeError, match="expert id 9 out of range"):
        ops.gathered_linear(torch.randn(2, 8), torch.randn(3, 4, 8), torch.tensor([[0, 9], [1, 2]]))


def test_the_ops_have_c_entry_points():
    """The functions that aot.py declares to AOTInductor (`_c_shims`) are exported by the library,
    which `load()` maps with global symbols so that the compiled libraries resolve them."""
    import ctypes

    from rlfoundry.rollout.aot import _c_shims

    shims = _c_shims()
    assert {op.name() for op in shims} == {"rlfoundry_kernels::decode_attention", "rlfoundry_kernels::small_linear",
                                           "rlfoundry_kernels::gathered_linear"}
    lib = ctypes.CDLL(str(kernels.library_path()))
    for op, (decl,) in shims.items():
        name = f"aoti_torch_cpu_{op.name().split('::')[1]}"
        assert f" {name}(" in decl and hasattr(lib, name)
        assert hasattr(ctypes.CDLL(None), name)  # global: visible to libraries loaded after it


def _attention_ref(q, k, v, visible_BTS, scale):
    """fp64 softmax attention over the visible keys (GQA: query head h reads h // (H / G))."""
    H, G = q.shape[1], k.shape[1]
    k, v = (t.double().repeat_interleave(H // G, dim=1) for t in (k, v))
    s = (q.double() @ k.transpose(-1, -2)) * scale
    return s.masked_fill(~visible_BTS[:, None], float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("D", [16, 32, 24])  # (24: not a multiple of the vector width)
@pytest.mark.parametrize("H,G", [(4, 2), (3, 3)])
def test_invariant_attention_equals_softmax_attention_and_its_gradients(D, H, G):
    """Direct form (query t of row b sees slots 0..pos[b, t], rows longer than that, a padding query
    with pos -1) and values with an extra channel (a `value_ones` cache's, left alone): outputs and
    the gradients of q, k and v within fp32 rounding of fp64 autograd's."""
    g = torch.Generator().manual_seed(D + H)
    B, T, S, scale = 3, 5, 9, D ** -0.5
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, G, S, D, generator=g).requires_grad_()
    v1 = torch.randn(B, G, S, D + 1, generator=g).requires_grad_()
    pos = torch.tensor([[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [2, 3, 4, 5, -1]])
    out, stats = torch.ops.rlfoundry_kernels.invariant_attention(q, k, v1, pos, pos.new_empty(0), pos.new_empty(0), scale)
    visible = torch.arange(S)[None, None] <= pos[..., None]
    real = (pos >= 0)[:, None, :, None]
    ref = _attention_ref(q, k, v1[..., :D], visible | (pos < 0)[..., None], scale)
    assert ((out.double() - ref) * real).abs().max().item() < 1e-5
    assert torch.equal(out[2, :, 4], torch.zeros(H, D))  # the padding query
    dout = torch.randn(B, H, T, D, generator=g)
    grads = torch.ops.rlfoundry_kernels.invariant_attention_backward(
        dout, q, k, v1, out, stats, pos, pos.new_empty(0), pos.new_empty(0), scale)
    want = torch.autograd.grad((ref * real * dout.double()).sum(), (q, k, v1))
    for name, got, w in zip("qkv", grads, want):
        assert got.shape == w.shape, name
        assert (got.double() - w).abs().max().item() < 1e-5, name
    assert torch.equal(grads[2][..., D], torch.zeros(B, G, S))


@pytest.mark.parametrize("threads", [1, 2])
def test_invariant_attention_gives_a_query_the_same_bits_however_computed(threads):
    """A sequence's queries: alone (a causal row of its own), decoded one at a time against a cache
    holding more slots than it sees, among other rows and with other queries, and packed after a
    shared prompt in the trainer's form (`seq`, `keys`: its key places as positions in the row) —
    the same bits every time, forward; and the packed form's gradients are those of each sequence
    computed alone, summed over the shared prompt's keys."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    ops = torch.ops.rlfoundry_kernels
    try:
        g = torch.Generator().manual_seed(threads)
        H, G, D, P, R, scale = 4, 2, 32, 6, 5, 32 ** -0.5
        none = torch.empty(0, dtype=torch.long)

        def alone(q, k, v):  # q [H, n, D], k, v [G, n, D]: a causal sequence of its own
            n = q.shape[1]
            return ops.invariant_attention(q[None], k[None], v[None], torch.arange(n)[None], none, none, scale)[0][0]

        # a prompt of P tokens and two responses of R: each sequence's queries, keys and values
        qp, kp, vp = torch.randn(H, P, D, generator=g), torch.randn(G, P, D, generator=g), torch.randn(G, P, D, generator=g)
        resp = [(torch.randn(H, R, D, generator=g), torch.randn(G, R, D, generator=g), torch.randn(G, R, D, generator=g))
                for _ in range(2)]
        seqs = [(torch.cat([qp, q], 1), torch.cat([kp, k], 1), torch.cat([vp, v], 1)) for q, k, v in resp]
        want = [alone(*s) for s in seqs]
        # decoded: one query at a time over a cache of 20 slots (garbage past the sequence), among 3 rows
        q0, k0, v0 = seqs[0]
        n = P + R
        cache_k, cache_v = torch.randn(3, G, 20, D, generator=g), torch.randn(3, G, 20, D, generator=g)
        cache_k[1, :, :n], cache_v[1, :, :n] = k0, v0
        for t in range(n):
            qs = torch.randn(3, H, 1, D, generator=g)
            qs[1, :, 0] = q0[:, t]
            pos = torch.tensor([[7], [t], [19]])
            out = ops.invariant_attention(qs, cache_k, cache_v, pos, none, none, scale)[0]
            assert torch.equal(out[1, :, 0], want[0][:, t]), t
        # packed: [prompt | response 0 | response 1] in row 1 of 2, both responses seeing the prompt
        T = P + 2 * R + 1  # (one padding token)
        q = torch.randn(2, H, T, D, generator=g)
        k, v = torch.randn(2, G, T, D, generator=g), torch.randn(2, G, T, D, generator=g)
        q[1, :, :P], k[1, :, :P], v[1, :, :P] = qp, kp, vp
        for i, (qr, kr, vr) in enumerate(resp):
            at = slice(P + i * R, P + (i + 1) * R)
            q[1, :, at], k[1, :, at], v[1, :, at] = qr, kr, vr
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        keys = [list(range(T - 1)),  # row 0: one sequence of T - 1 tokens
                list(range(P)),  # row 1: the prompt's own
                list(range(P + R)),  # response 0's: the prompt, then itself
                list(range(P)) + list(range(P + R, P + 2 * R))]  # response 1's
        keys = torch.tensor([s + [0] * (T - len(s)) for s in keys])  # (places past a sequence: any slot)
        seq = torch.tensor([[0] * T, [1] * P + [2] * R + [3] * R + [0]])
        pos = torch.tensor([list(range(T - 1)) + [-1], list(range(P)) + list(range(P, P + R)) * 2 + [-1]])
        out, stats = ops.invariant_attention(q, k, v, pos, seq, keys, scale)
        assert torch.equal(out[1, :, :P + R], want[0]) and torch.equal(out[1, :, P + R:T - 1], want[1][:, P:])
        dout = torch.randn(2, H, T, D, generator=g)
        dq, dk, dv = ops.invariant_attention_backward(dout, q, k, v, out, stats, pos, seq, keys, scale)
        # each sequence alone through fp64 autograd, their key gradients summed where they share the prompt
        ref_q, ref_k, ref_v = torch.zeros(H, T, D, dtype=torch.float64), *torch.zeros(2, G, T, D, dtype=torch.float64)
        for slots, queries in ((list(range(P + R)), list(range(P + R))),
                               (list(range(P)) + list(range(P + R, P + 2 * R)), list(range(P + R, P + 2 * R)))):
            qs, ks, vs = (x.detach()[1, :, slots].double().requires_grad_() for x in (q, k, v))
            o = _attention_ref(qs[None], ks[None], vs[None], torch.ones(len(slots), len(slots)).tril().bool()[None], scale)[0]
            mine = [slots.index(t) for t in queries]
            gq, gk, gv = torch.autograd.grad((o[:, mine] * dout[1][:, queries].double()).sum(), (qs, ks, vs))
            ref_q[:, queries] += gq[:, mine]
            ref_k[:, slots] += gk
            ref_v[:, slots] += gv
        for got, ref in ((dq[1], ref_q), (dk[1], ref_k), (dv[1], ref_v)):
            assert (got.double() - ref).abs().max().item() < 1e-5
        assert torch.equal(dq[1, :, T - 1], torch.zeros(H, D))  # the padding token's
    finally:
        torch.set_num_threads(saved)


def test_invariant_attention_rejects_bad_input():
    ops = torch.ops.rlfoundry_kernels
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 4, 8)
    none = torch.empty(0, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"pos\[0, 2\] = 4 past the 4 key places"):
        ops.invariant_attention(q, k, k, torch.tensor([[0, 1, 4]]), none, none, 1.0)
    with pytest.raises(RuntimeError, match="keys holds 5, not a key slot"):
        ops.invariant_attention(q, k, k, torch.tensor([[0, 1, 2]]), torch.zeros(1, 3, dtype=torch.long),
                                torch.tensor([[0, 1, 5]]), 1.0)
    with pytest.raises(RuntimeError, match="mismatched shapes"):
        ops.invariant_attention(q, torch.randn(1, 1, 4, 7), k, torch.tensor([[0, 1, 2]]), none, none, 1.0)
    with pytest.raises(RuntimeError, match="fp32"):
        ops.invariant_attention(q.double(), k, k, torch.tensor([[0, 1, 2]]), none, none, 1.0)


@pytest.mark.parametrize("D", [32, 128, 40])
def test_rms_norm_and_rope_equal_torchs_and_each_row_stands_alone(D):
    """`rms_norm` and `rope` (the batch-invariant mode's RMSNorm and rotary embedding) within fp32
    rounding of torch's forms in fp64, their backwards within fp32 rounding of fp64 autograd's,
    and each row's output the same bits alone as among 300 rows."""
    from rlfoundry.model.glm4_moe import apply_rope

    ops = torch.ops.rlfoundry_kernels
    g = torch.Generator().manual_seed(D)
    N, H, R, eps = 300, 3, D // 2, 1e-5
    x = (torch.randn(N, D, generator=g) * 3).requires_grad_()
    w = (1 + 0.1 * torch.randn(D, generator=g)).requires_grad_()
    y, r = ops.rms_norm(x, w, eps)
    x64, w64 = x.double(), w.double()
    ref = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps))
    assert (y.double() - ref).abs().max().item() < 1e-5
    gy = torch.randn(N, D, generator=g)
    dx, dw = ops.rms_norm_backward(gy, x, w, r)
    want = torch.autograd.grad((ref * gy.double()).sum(), (x, w))
    assert (dx.double() - want[0]).abs().max().item() < 1e-5
    assert (dw.double() - want[1]).abs().max().item() < 1e-4 * N ** 0.5
    for rows in (slice(0, 1), slice(5, 6), slice(7, 40)):
        assert torch.equal(ops.rms_norm(x.detach()[rows], w, eps)[0], y[rows])

    q = torch.randn(N, H, D, generator=g, requires_grad=True)
    angle = torch.rand(N, R // 2, generator=g, dtype=torch.float64) * 6
    cos = torch.cat([angle.cos(), angle.cos(), torch.ones(N, D - R, dtype=torch.float64)], -1)
    sin = torch.cat([-angle.sin(), angle.sin(), torch.zeros(N, D - R, dtype=torch.float64)], -1)
    out = ops.rope(q, cos.float(), sin.float(), R)
    ref = apply_rope(q.double()[None], cos[None], sin[None], R)[0]
    assert (out.double() - ref).abs().max().item() < 1e-5
    gq = torch.randn(N, H, D, generator=g)
    want = torch.autograd.grad((ref * gq.double()).sum(), q)[0]
    assert (ops.rope_backward(gq, cos.float(), sin.float(), R).double() - want).abs().max().item() < 1e-5
    assert torch.equal(ops.rope(q.detach()[3:4, 1:2], cos.float()[3:4], sin.float()[3:4], R)[0, 0], out[3, 1])
    with pytest.raises(RuntimeError, match="R even and at most D"):
        ops.rope(q.detach(), cos.float(), sin.float(), D + 2)


def test_swiglu_and_combine_equal_torchs_and_each_row_stands_alone():
    """`swiglu` (silu(gate) * up, gate and up the halves of one product) and `combine` (the
    experts' weighted sum in top-k order) within fp32 rounding of fp64 forms, their backwards of
    fp64 autograd's, a row's result the same bits alone; bad rows are refused."""
    ops = torch.ops.rlfoundry_kernels
    g = torch.Generator().manual_seed(0)
    for I in (64, 20):  # (20: a partial vector)
        gu = (torch.randn(150, 2 * I, generator=g) * 3).requires_grad_()
        gate, up = gu.chunk(2, -1)
        h = ops.swiglu(gate, up)
        ref = F.silu(gate.double()) * up.double()
        assert (h.double() - ref).abs().max().item() < 1e-5
        assert torch.equal(ops.swiglu(gate[7:8].contiguous(), up[7:8].contiguous()), h[7:8])
        dh = torch.randn(150, I, generator=g)
        dgate, dup = ops.swiglu_backward(dh, gate, up)
        want = torch.autograd.grad((ref * dh.double()).sum(), gu)[0]
        assert (torch.cat([dgate, dup], -1).double() - want).abs().max().item() < 1e-5
    N, K, R, D = 40, 4, 170, 48
    y = torch.randn(R, D, generator=g, requires_grad=True)
    rows = torch.randperm(R, generator=g)[:N * K]
    w = torch.rand(N, K, generator=g, requires_grad=True)
    out = ops.combine(y, rows, w)
    ref = (y.double()[rows].view(N, K, D) * w.double()[..., None]).sum(1)
    assert (out.double() - ref).abs().max().item() < 1e-5
    assert torch.equal(ops.combine(y.detach(), rows[8:12], w.detach()[2:3]), out[2:3])
    gout = torch.randn(N, D, generator=g)
    dy, dw = ops.combine_backward(gout, y, rows, w)
    want = torch.autograd.grad((ref * gout.double()).sum(), (y, w))
    assert (dy.double() - want[0]).abs().max().item() < 1e-5 and (dw.double() - want[1]).abs().max().item() < 1e-5
    with pytest.raises(RuntimeError, match=r"rows\[3\] = 170 not a row of y"):
        ops.combine(y.detach(), torch.tensor([0, 1, 2, 170]), w.detach()[:1])
