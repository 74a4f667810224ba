"""Prefill and incremental decoding with the KV cache give the logits of the full forward."""

import torch

from conftest import random_model, small_config
from rlfoundry.model import KVCache


def test_ragged_batch_prefill_then_decode_equals_full_forward():
    cfg = small_config()
    model = random_model(cfg)
    gen = torch.Generator().manual_seed(3)
    prompt_lens = [5, 9, 2]
    total = 16
    seqs = [torch.randint(0, cfg.vocab_size, (total,), generator=gen) for _ in prompt_lens]
    cache = KVCache.for_model(cfg, num_slots=4, max_len=32)
    slots = torch.tensor([2, 0, 3])  # slots need not be 0..B-1

    with torch.no_grad():
        # prefill: right-padded prompts of different lengths in one forward
        T = max(prompt_lens)
        batch = torch.zeros(3, T, dtype=torch.long)
        for b, n in enumerate(prompt_lens):
            batch[b, :n] = seqs[b][:n]
        out = model(batch, cache=cache, slots=slots, input_lens=torch.tensor(prompt_lens))
        steps = [[out.logits[b, :n]] for b, n in enumerate(prompt_lens)]
        assert cache.lens[slots].tolist() == prompt_lens
        # decode: each row advances one token per step, from its own position
        pos = list(prompt_lens)
        while min(pos) < total:
            live = [b for b in range(3) if pos[b] < total]
            ids = torch.stack([seqs[b][pos[b]] for b in live])[:, None]
            out = model(ids, cache=cache, slots=slots[live])
            for i, b in enumerate(live):
                steps[b].append(out.logits[i, :1])
                pos[b] += 1
        for b in range(3):
            full = model(seqs[b][None]).logits[0]
            assert (torch.cat(steps[b]) - full).abs().max().item() <= 1e-5


def test_chunked_prefill_and_rollback():
    cfg = small_config(use_qk_norm=False, n_group=2, topk_group=1)
    model = random_model(cfg, seed=4)
    seq = torch.randint(0, cfg.vocab_size, (1, 20))
    cache = KVCache.for_model(cfg, num_slots=1, max_len=20)
    with torch.no_grad():
        full = model(seq).logits
        a = model(seq[:, :7], cache=cache).logits
        b = model(seq[:, 7:15], cache=cache).logits
        assert (torch.cat([a, b], 1) - full[:, :15]).abs().max().item() <= 1e-5
        # write 3 wrong tokens, roll back, continue with the right ones (speculative rejection)
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        cache.truncate(torch.tensor([0]), torch.tensor([15]))
        c = model(seq[:, 15:], cache=cache).logits
        assert (c - full[:, 15:]).abs().max().item() <= 1e-5


def test_mtp_with_cache_equals_full_mtp_forward():
    cfg = small_config()
    model = random_model(cfg, seed=5)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    cache = KVCache.for_model(cfg, num_slots=2, max_len=16, num_layers=1)
    with torch.no_grad():
        hidden = model(ids).hidden
        full = model.mtp_forward(hidden[:, :-1], ids[:, 1:]).logits
        a = model.mtp_forward(hidden[:, :6], ids[:, 1:7], cache=cache).logits
        steps = [a] + [model.mtp_forward(hidden[:, t:t + 1], ids[:, t + 1:t + 2], cache=cache).logits
                       for t in range(6, 11)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_mtp_catch_up_keeping_one_position_a_row_caches_every_pair():
    """`keep_B` (speculative decoding's catch-up of the MTP cache): the outputs at the kept position
    of each row equal the whole forward's there, and the cache holds every pair's keys and values,
    as after the whole forward — the next step's logits agree."""
    cfg = small_config()
    model = random_model(cfg, seed=6)
    ids = torch.randint(0, cfg.vocab_size, (3, 9))
    caches = [KVCache.for_model(cfg, num_slots=3, max_len=16, num_layers=1) for _ in range(2)]
    keep = torch.tensor([5, 0, 3])
    with torch.no_grad():
        hidden = model(ids).hidden
        full = model.mtp_forward(hidden[:, :6], ids[:, 1:7], cache=caches[0])
        kept = model.mtp_forward(hidden[:, :6], ids[:, 1:7], cache=caches[1], keep_B=keep)
        rows = torch.arange(3)
        assert kept.logits.shape == (3, 1, cfg.vocab_size) and kept.hidden.shape == (3, 1, cfg.hidden_size)
        assert (kept.logits[:, 0] - full.logits[rows, keep]).abs().max().item() <= 1e-5
        assert (kept.hidden[:, 0] - full.hidden[rows, keep]).abs().max().item() <= 1e-5
        assert kept.routed_experts.shape[:2] == (3, 1)
        assert torch.equal(kept.routed_experts[:, 0], full.routed_experts[rows, keep])
        for a, b in zip(caches[0].storage, caches[1].storage):
            assert torch.equal(a, b)
        after = [model.mtp_forward(hidden[:, 6:7], ids[:, 7:8], cache=c).logits for c in caches]
    assert (after[0] - after[1]).abs().max().item() <= 1e-5


def test_cached_rope_tables_equal_computed_ones_bit_for_bit():
    """A cache from `for_model` looks cos/sin up in tables; they hold the very bits `rope_cos_sin`
    computes for the same positions (fp32, fp64 and bf16; batch-1 and wider shapes), and a cached
    forward gives the same logits with or without them."""
    from rlfoundry.model.glm4_moe import at_least_fp32, rope_cos_sin
    cfg = small_config()
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        cache = KVCache.for_model(cfg, num_slots=2, max_len=300, dtype=dtype)
        for shape in ([1, 1], [3, 1], [2, 37]):
            pos = torch.randint(0, 300, shape)
            want = rope_cos_sin(pos, cfg, dtype)
            got = tuple(t[pos].to(dtype) for t in cache.rope)
            assert cache.rope[0].dtype == at_least_fp32(dtype)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    model = random_model(cfg, seed=4)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    logits = []
    for tables in (True, False):
        cache = KVCache.for_model(cfg, num_slots=2, max_len=16)
        if not tables:
            cache.rope = None
        with torch.no_grad():
            logits.append(torch.cat([model(ids[:, :7], cache=cache).logits] +
                                    [model(ids[:, t:t + 1], cache=cache).logits for t in range(7, 10)], 1))
    assert torch.equal(*logits)


def test_cache_overflow_is_an_error():
    cfg = small_config()
    model = random_model(cfg)
    cache = KVCache.for_model(cfg, num_slots=1, max_len=4)
    try:
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    except ValueError as e:
        assert "KV cache overflow" in str(e)
    else:
        raise AssertionError("no error")
    assert cache.lens.tolist() == [0]


def test_cache_step_rows_equals_make_for_slots_in_order():
    """`CacheStep.rows` (the engine's per-cycle shortcut, given the lengths it holds) places the
    tokens exactly as `make` does for slots 0..B-1, and refuses to overflow alike."""
    import pytest

    from rlfoundry.model.glm4_moe import CacheStep

    cache = KVCache.for_model(small_config(), num_slots=4, max_len=16)
    cache.lens[:3] = torch.tensor([5, 0, 9])
    for T in (1, 4):
        ref = CacheStep.make(cache, 3, T, torch.arange(3), None, torch.device("cpu"))
        got = CacheStep.rows(cache, [5, 0, 9], T, torch.device("cpu"))
        assert torch.equal(got.position_ids_BT, ref.position_ids_BT) and torch.equal(got.slots_B, ref.slots_B)
        assert (got.valid_BT, got.num_keys, got.slot_range) == (ref.valid_BT, ref.num_keys, ref.slot_range)
        assert torch.equal(got.mask(), ref.mask())
    with pytest.raises(ValueError, match="KV cache overflow"):
        CacheStep.rows(cache, [5, 0, 9], 8, torch.device("cpu"))


def test_value_ones_cache_gives_the_plain_cache_bits():
    """A `value_ones` cache (the batch-invariant engine's: [V | 1] kept, not built each step) gives
    the same logits bit for bit as a plain one, with and without batch invariance, short key
    counts (< 12, padded) included; the ones survive writes and slot copies."""
    cfg = small_config()
    gen = torch.Generator().manual_seed(5)
    seqs = torch.randint(0, cfg.vocab_size, (3, 14), generator=gen)
    lens = torch.tensor([3, 6, 2])
    for invariant in (True, False):
        model = random_model(cfg, seed=6).set_batch_invariant(invariant)
        runs = []
        for ones in (False, True):
            cache = KVCache.for_model(cfg, num_slots=4, max_len=24, value_ones=ones)
            slots = torch.tensor([1, 0, 3])
            with torch.no_grad():
                out = [model(seqs[:, :6], cache=cache, slots=slots, input_lens=lens).logits]
                cache.copy_slots([0], [2])  # slot 2 becomes a copy of slot 0 (length 6)
                slots = torch.tensor([1, 2, 3])
                for t in range(8):  # every row one token a step from its own length
                    out.append(model(seqs[:, 6 + t:7 + t], cache=cache, slots=slots).logits)
            if ones:
                assert all(bool((v[..., -1] == 1).all()) for v in cache.v)
            runs.append(out)
        for a, b in zip(*runs):
            assert torch.equal(a, b)
