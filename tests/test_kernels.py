"""The native CPU kernel (`rlfoundry.model.kernels`): attention of a few queries over a KV cache,
checked against torch's SDPA on both key layouts, several head dims (the compiled ones and the
generic path), GQA ratios and ragged rows; keys past a row's position are never read; and a
failed build leaves the pure-torch attention in place."""

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
