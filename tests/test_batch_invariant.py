"""Batch-invariant fp32 arithmetic (`Glm4MoeForCausalLM.set_batch_invariant`): a sequence's logits are
the same bits whatever it is computed with — decoded alone or among others, one token at a time with a
KV cache or whole in a training forward, in a padded batch or packed after a shared prompt."""

import pytest
import torch
import torch.nn.functional as F

from conftest import hf_twin, random_model, small_config
from rlfoundry.model.glm4_moe import KVCache, invariant_rows, packed_sequences


def test_invariant_rows_pads_small_products_to_multiples_of_four():
    assert [invariant_rows(m) for m in (1, 2, 3, 4, 5, 7, 8, 9, 11, 12, 13, 500)] == \
        [4, 4, 4, 4, 8, 8, 8, 12, 12, 12, 13, 500]


@pytest.mark.parametrize("native", [True, False])
def test_batch_invariant_model_matches_transformers(native, monkeypatch):
    """The same function as the usual path: logits and every gradient within 1e-5 of transformers'
    (padding mask included), through the dense decode path of the experts too — with the native
    kernels (`invariant_matmul`, `invariant_attention`) and without them (MKL's padded products)."""
    from rlfoundry.model import kernels

    if not native:
        monkeypatch.setitem(kernels._state, "loaded", False)
    cfg = small_config()
    ours = random_model(cfg, seed=3).set_batch_invariant()
    hf = hf_twin(ours)
    ids = torch.randint(0, cfg.vocab_size, (3, 19), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 19, dtype=torch.long)
    mask[1, 13:] = 0
    with torch.no_grad():  # 57 tokens x 8 experts: the dense path
        a, b = ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
        assert (a - b)[mask.bool()].abs().max().item() <= 1e-5
    out, ref = ours(ids).logits, hf(ids).logits  # with autograd: the sparse path
    assert (out - ref).abs().max().item() <= 1e-5

    def loss_of(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))

    loss_of(out).backward()
    loss_of(ref).backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        if ".mtp_layers." not in name:
            assert (p.grad - hf_params[name].grad).abs().max().item() <= 1e-5, name


def _decode(model, cfg, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
    """Row 0's logits at its last prompt token and at each response token but the last, decoding
    all rows together: a prefill of the (ragged) prompts, then one token a row per step."""
    B, L = len(prompts), len(responses[0])
    cache = KVCache.for_model(cfg, B, 64)
    P = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (P - len(p)) for p in prompts])
    lens = torch.tensor([len(p) for p in prompts])
    with torch.no_grad():
        out = model(ids, cache=cache, input_lens=lens).logits
        rows = [out[0, len(prompts[0]) - 1]]
        for t in range(L - 1):
            step = torch.tensor([[r[t]] for r in responses])
            rows.append(model(step, cache=cache).logits[0, 0])
    return torch.stack(rows)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_sequence_gets_the_same_bits_alone_batched_decoded_and_trained(threads):
    cfg = small_config(max_position_embeddings=64)
    model = random_model(cfg, seed=5).set_batch_invariant()
    g = torch.Generator().manual_seed(6)

    def tokens(n):
        return torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist()

    prompt, responses = tokens(5), [tokens(9) for _ in range(3)]  # 5 keys at first: fewer than 12
    others = [tokens(3 + i % 11) for i in range(14)]
    other_responses = [tokens(9) for _ in others]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        alone = _decode(model, cfg, [prompt], responses[:1])
        for n in (2, 5, 12, 15):  # 2, 5 and 12 rows, and more than 12
            batched = _decode(model, cfg, [prompt] + others[:n - 1], responses[:1] + other_responses[:n - 1])
            assert torch.equal(batched, alone), n
    finally:
        torch.set_num_threads(saved)

    P, R = len(prompt), len(responses[0])
    seq = torch.tensor([prompt + responses[0]])
    with torch.no_grad():
        assert torch.equal(model(seq).logits[0, P - 1:-1], alone)
        # right-padded among longer sequences, as the trainer's plain micro-batches
        longest = max(len(o) + 9 for o in others)
        rows = [prompt + responses[0]] + [o + r for o, r in zip(others, other_responses)]
        ids = torch.tensor([r + [0] * (longest - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
        assert torch.equal(model(ids, attention_mask=mask).logits[0, P - 1:P + R - 1], alone)
        # packed after the shared prompt with the other responses, as the trainer's shared-prompt rows
        packed = torch.tensor([prompt + responses[1] + responses[0] + responses[2]])
        seg = torch.tensor([[0] * P + [1] * R + [2] * R + [3] * R])
        pos = torch.tensor([list(range(P)) + list(range(P, P + R)) * 3])
        out = model(packed, segment_ids=seg, position_ids=pos, prefix_lens=torch.tensor([P])).logits[0]
        assert torch.equal(torch.cat([out[P - 1:P], out[P + R:P + 2 * R - 1]]), alone)
        # a prompt sharing only its first 3 tokens with the row's (a hindsight-relabelled sample's),
        # packed after it as its rest and its response, seeing those 3 (per-segment prefix_lens)
        other = prompt[:3] + tokens(4)
        want = model(torch.tensor([other + responses[0]])).logits[0, len(other) - 1:-1]
        L = len(other) - 3
        row = torch.tensor([prompt + responses[1] + other[3:] + responses[0]])
        seg = torch.tensor([[0] * P + [1] * R + [2] * (L + R)])
        pos = torch.tensor([list(range(P)) + list(range(P, P + R)) + list(range(3, 3 + L + R))])
        out = model(row, segment_ids=seg, position_ids=pos, prefix_lens=torch.tensor([[P, P, 3]])).logits[0]
        assert torch.equal(out[P + R + L - 1:P + R + L + R - 1], want)


def test_packed_sequences_lists_each_sequences_keys_and_own_queries_in_order():
    """Row 0: a prompt of 2, responses of 3 and 2, one padding token; row 1: two documents, no
    shared prefix."""
    seg = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 0], [0, 0, 0, 1, 1, 1, 1, 1]])
    valid = torch.tensor([[1] * 7 + [0], [1] * 8]).bool()
    seqs = packed_sequences(seg, torch.tensor([2, 0]), valid)
    keys = [row[:n].tolist() for row, n in zip(seqs.keys_QS, [2, 5, 4, 3, 5])]
    assert keys == [[0, 1], [0, 1, 2, 3, 4], [0, 1, 5, 6], [8, 9, 10], [11, 12, 13, 14, 15]]
    queries = [row[:n].tolist() for row, n in zip(seqs.queries_QT, [2, 3, 2, 3, 5])]
    assert queries == [[0, 1], [2, 3, 4], [5, 6], [8, 9, 10], [11, 12, 13, 14, 15]]
    # a response's queries see the prompt and their own response up to themselves
    assert seqs.mask_QTS[2, :2].tolist() == [[True, True, True, False, False], [True, True, True, True, False]]
    assert seqs.mask_QTS[1, 0].tolist() == [True, True, True, False, False]
    # each real token's query found where its own sequence computes it
    Tq = seqs.queries_QT.shape[1]
    for n in valid.flatten().nonzero().flatten().tolist():
        q, t = divmod(int(seqs.scatter_N[n]), Tq)
        assert int(seqs.queries_QT[q, t]) == n
