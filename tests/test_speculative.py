"""MTP speculative decoding: greedy output identical to plain decoding; sampling keeps the target
distribution (checked against exact probabilities by enumeration)."""

import itertools

import pytest
import torch

from conftest import random_model, small_config
from rlfoundry.rl.config import DEFAULT_MODEL as SHIPPED
from rlfoundry.rollout import Engine, SamplingParams


def shipped_model_and_prompts(n: int, seed: int):
    """The shipped model (its MTP layer trained: drafts accepted several at a time) and n of its
    Countdown level-2 prompts, as token ids (chat template applied)."""
    from rlfoundry.buffer import PromptDataset
    from rlfoundry.data.tokenizer import load_tokenizer
    from rlfoundry.model import load_pretrained

    tok = load_tokenizer(SHIPPED)
    ds = PromptDataset.load("task:countdown:2", n_per_level=n, seed=seed)
    return load_pretrained(SHIPPED), [ds.token_ids(i, tok) for i in range(len(ds))]


@pytest.fixture
def eager_dynamo(monkeypatch):
    """torch.compile with dynamo's eager backend (the backend the test passes to `use`, "eager"
    by default): which graphs there are, and the engine's bookkeeping around them, are under test,
    not inductor — nor AOTInductor: no step or prefill is compiled ahead of time (`AOTStep.build`
    and `AOTPrefill.build` give None, as where a build fails), so every call goes through the
    torch.compile'd functions, whose
    graphs `warmup` compiles either way (tests/test_aot.py and
    test_compiled_speculative_decoding_equals_eager_plain_decoding take the ahead-of-time steps;
    their builds took 2.3 of the 3.3 minutes of the two tests here that use this fixture, from
    empty caches). Dynamo's caches are reset before and after."""
    from rlfoundry.rollout.aot import AOTPrefill, AOTStep

    compile_ = torch.compile
    for cls in (AOTStep, AOTPrefill):
        monkeypatch.setattr(cls, "build", classmethod(lambda cls, *args, **kwargs: None))

    def use(backend="eager"):
        monkeypatch.setattr(torch, "compile", lambda fn, dynamic, fullgraph, options=None: compile_(
            fn, dynamic=dynamic, fullgraph=fullgraph, backend=backend))

    torch._dynamo.reset()
    yield use
    torch._dynamo.reset()


def test_speculative_greedy_is_identical_to_plain_decoding():
    model = random_model(small_config(max_position_embeddings=96), seed=8)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 9, 1, 5, 12, 2)]
    params = [SamplingParams(temperature=0, max_new_tokens=m) for m in (30, 7, 19, 40, 3, 25)]
    plain = Engine(model, max_batch=3).generate(prompts, params)
    for k in (1, 3):
        engine = Engine(model, max_batch=3, speculative_steps=k)
        spec = engine.generate(prompts, params)
        for a, b in zip(plain, spec):
            assert a[0].output_ids == b[0].output_ids and a[0].finish_reason == b[0].finish_reason
            assert max(abs(x - y) for x, y in zip(a[0].logprobs, b[0].logprobs)) <= 1e-5
        assert engine.stats["spec_verify_steps"] > 0 and engine.stats["spec_accept_length"] >= 1.0
    # a stop token in the middle of accepted drafts ends the sequence there
    stop = plain[3][0].output_ids[10]
    p = SamplingParams(temperature=0, max_new_tokens=40, stop_token_ids=[stop])
    a = Engine(model, max_batch=2).generate([prompts[3]], p)[0][0]
    b = Engine(model, max_batch=2, speculative_steps=3).generate([prompts[3]], p)[0][0]
    assert a.output_ids == b.output_ids and b.output_ids[-1] == stop


def test_speculative_greedy_with_the_shipped_drafter_accepts_several_tokens_and_changes_nothing():
    """The shipped model's trained MTP layer drafts well, so this is the test in which drafts are
    accepted several at a time (a random model's rarely are): one prompt at a time and a batch of
    prompts whose drafts are accepted to different depths, output and log-probs as plain decoding."""
    model, prompts = shipped_model_and_prompts(6, seed=10_000)
    params = SamplingParams(temperature=0, max_new_tokens=48)
    plain = Engine(model, max_batch=6).generate(prompts, params)
    for batch in (1, 6):
        engine = Engine(model, max_batch=batch, speculative_steps=3)
        spec = engine.generate(prompts, params)
        for a, b in zip(plain, spec):
            assert a[0].output_ids == b[0].output_ids and a[0].finish_reason == b[0].finish_reason
            assert max(abs(x - y) for x, y in zip(a[0].logprobs, b[0].logprobs)) <= 1e-5
        assert engine.stats["spec_accept_length"] >= 2.5


def test_compiled_speculative_decoding_equals_eager_plain_decoding():
    """compile_decode with speculative_steps: verification goes through the compiled main-model
    layers (k+1 tokens a row) and the greedy draft chain through one compiled graph (`greedy_drafts`;
    in a batch the rows' catch-ups are padded to one length), and from a sequence's second cycle on
    both through one (`greedy_cycle`: verification, then the next drafts; a greedy prefill, the
    MTP layer's prefill and the first drafts through it too); on CPU in fp32 the cycles of all k
    drafts run `greedy_cycle` compiled ahead of time (`rollout/aot.py`), and so does a greedy
    prefill of one prompt at batch 1 (`AOTPrefill`), the others (fewer drafts near a response's
    end, prefills of several prompts) the torch.compile'd one. With the shipped drafter
    (drafts accepted several at a time, to different depths per row), one prompt at a time and a
    batch: the same greedy tokens as eager plain decoding, log-probs within 1e-5."""
    model, prompts = shipped_model_and_prompts(6, seed=10_001)
    params = SamplingParams(temperature=0, max_new_tokens=32)
    plain = Engine(model, max_batch=6).generate(prompts, params)
    engine = Engine(model, max_batch=6, speculative_steps=3, compile_decode=True)
    calls = {"chain": 0, "cycle": 0, "ahead": 0, "ahead_prefill": 0}
    for name, attr in (("chain", "_greedy_drafts"), ("cycle", "_greedy_cycle")):
        def counted(*args, _fn=getattr(engine, attr), _name=name):
            calls[_name] += 1
            return _fn(*args)
        setattr(engine, attr, counted)
    ahead = engine._aot_cycle_step()  # (built at the first cycle otherwise)
    if ahead is not None:  # (native kernels built: a C++ compiler, as compiled decoding needs)
        engine._aot_cycle = lambda *args: calls.update(ahead=calls["ahead"] + 1) or ahead(*args)
        engine._aot_cycle.applies = ahead.applies
    prefill = engine._aot_prefill_step()
    if prefill is not None:
        engine._aot_prefill = lambda *args: calls.update(ahead_prefill=calls["ahead_prefill"] + 1) or prefill(*args)
        engine._aot_prefill.applies = prefill.applies
    single = [engine.generate([p], params)[0] for p in prompts[:2]]
    # a greedy prefill drafts the first cycle in its own call (`greedy_cycle` over the prompt:
    # one prompt ahead of time, where it is built)
    assert calls["chain"] == 0 and (calls["ahead_prefill"] == 2 or prefill is None and calls["cycle"] >= 2)
    spec = single + engine.generate(prompts, params)
    for a, b in zip(plain[:2] + plain, spec):
        assert a[0].output_ids == b[0].output_ids and a[0].finish_reason == b[0].finish_reason
        assert max(abs(x - y) for x, y in zip(a[0].logprobs, b[0].logprobs)) <= 1e-5
    assert engine.stats["spec_accept_length"] >= 2.5
    # every cycle verifies in `greedy_cycle`; the separate chain drafts only after a row finished
    # and another moved into its slot
    assert calls["cycle"] + calls["ahead"] > 2 * calls["chain"] > 0
    assert calls["ahead"] > 0 or ahead is None


def test_speculative_sampling_keeps_the_target_distribution():
    V = 6
    model = random_model(small_config(vocab_size=V, max_position_embeddings=32), seed=4)
    prompt = [1, 4, 2]
    # exact probabilities of the 2nd and 3rd generated tokens, by enumerating every prefix
    with torch.no_grad():
        prefixes = torch.tensor([prompt + [a, b] for a, b in itertools.product(range(V), repeat=2)])
        logits = model(prefixes).logits.float()
    p1 = logits[0, len(prompt) - 1].softmax(-1)                                  # [V]
    p2 = logits.view(V, V, -1, V)[:, 0, len(prompt)].softmax(-1)                  # [V(t1), V]
    p3 = logits.view(V, V, -1, V)[:, :, len(prompt) + 1].softmax(-1)              # [V, V, V]
    joint2 = p1[:, None] * p2
    marg2 = joint2.sum(0)
    marg3 = (joint2[:, :, None] * p3).sum((0, 1))

    engine = Engine(model, max_batch=64, speculative_steps=2)
    counts2, counts3, n = torch.zeros(V), torch.zeros(V), 0
    for seed in range(80):
        outs = engine.generate([prompt], SamplingParams(temperature=1.0, max_new_tokens=4, n=64, seed=seed))[0]
        for o in outs:
            counts2[o.output_ids[1]] += 1
            counts3[o.output_ids[2]] += 1
            n += 1
    assert engine.stats["spec_verify_steps"] > 0
    for counts, exact in ((counts2, marg2), (counts3, marg3)):
        expected = exact * n
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 20.5, (counts / n, exact)  # 5 degrees of freedom, p = 0.001


def test_warmup_compiles_every_graph_that_decoding_needs(monkeypatch, eager_dynamo):
    """A compile_decode engine's warm-up leaves nothing to compile: greedy and sampled speculative
    decoding (plain decode steps too, where a response has one token left) at every batch size up
    to max_batch, drafts accepted to every depth (the shipped drafter) and k shrinking at the ends
    of responses, and the compiled prefills of their prompts (rows padded to the longest; with n
    samples a prompt too), run with dynamo's recompilation an error; greedy, the tokens of eager plain decoding. The model's
    dense MoE path is made to end at 5 tokens, so that every
    regime (its two sides for one token a row, for k + 1, and for the draft chain's catch-ups and
    steps) is reached at small batches. The graphs are traced with dynamo's eager backend: which
    graphs there are is the guards' business, whatever compiles them. None of them takes the
    model's Python floats as inputs."""
    from rlfoundry.model import glm4_moe
    from rlfoundry.model.glm4_moe import Experts

    scalar_inputs = []  # graph inputs that are Python floats made tensors (see `engine._compile`)

    def eager(gm, example_inputs):
        scalar_inputs.extend(n.name for n in gm.graph.nodes if n.op == "placeholder"
                             and isinstance(v := n.meta.get("example_value"), torch.Tensor) and v.dim() == 0
                             and v.dtype == torch.float64)
        return gm.forward

    eager_dynamo(eager)
    monkeypatch.setattr(Experts, "DENSE_MAX_ROWS", 16 * 4)  # 16 experts: dense up to 4 tokens
    monkeypatch.setattr(glm4_moe, "SMALL_PRODUCT_ROWS", 8)  # small products up to 8 rows (see `small_linear`)
    model, prompts = shipped_model_and_prompts(10, seed=10_002)
    assert model.token_switches() == [5, 9]
    engine = Engine(model, max_batch=6, speculative_steps=3, compile_decode=True)
    engine.warmup()
    greedy = [SamplingParams(temperature=0, max_new_tokens=5 + 2 * b) for b in range(6)]
    plain = [o.output_ids for (o,) in Engine(model, max_batch=6).generate(prompts[:6], greedy)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for B in range(1, 7):
            for temperature in (0.0, 1.0):
                params = [SamplingParams(temperature=temperature, max_new_tokens=5 + 2 * b, seed=b) for b in range(B)]
                outs = engine.generate(prompts[:B], params)
                if temperature == 0:  # (prefilled compiled, the prompts' rows padded to the longest)
                    assert [o.output_ids for (o,) in outs] == plain[:B]
        for n in (2, 3):  # n samples a prompt (see below)
            outs = engine.generate(prompts[:6 // n], SamplingParams(temperature=1.0, max_new_tokens=6, n=n, seed=n))
            assert [len(o) for o in outs] == [n] * (6 // n)
        # a one-token prompt among others: its row of the MTP layer's prefill is padding only, and
        # the prefill's slots stay one range (no graph of scattered slots)
        mixed = [prompts[0], prompts[1][:1], prompts[2]]
        want = [o.output_ids for (o,) in Engine(model, max_batch=6).generate(mixed, greedy[:3])]
        assert [o.output_ids for (o,) in engine.generate(mixed, greedy[:3])] == want
    assert engine.stats["spec_accept_length"] >= 2.0
    assert not scalar_inputs  # the model's floats (RMSNorm eps, ...) are constants in the graphs
    # a plain engine's warm-up: one token a row, and the prefills' 2 or more
    engine = Engine(model, max_batch=6, compile_decode=True)
    engine.warmup()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for B in range(1, 7):
            assert [o.output_ids for (o,) in engine.generate(prompts[:B], greedy[:B])] == plain[:B]
        # n samples a prompt, as RL asks: the prompts' first samples prefill in consecutive slots
        # (the graphs of warm-up), the others copied from them
        for n in (2, 3):
            outs = engine.generate(prompts[:6 // n], SamplingParams(temperature=1.0, max_new_tokens=4, n=n, seed=n))
            assert [len(o) for o in outs] == [n] * (6 // n)


def test_compiled_greedy_prefill_drafts_for_every_sample_and_for_late_joiners(eager_dynamo):
    """A compiled greedy speculative prefill drafts the first cycle in its own call (`greedy_cycle`
    over the prompts) and leaves the MTP cache at each prompt's last pair: with n samples a prompt
    the other samples' caches are copied from the first's (the last pair with them), and a request
    that joins running ones prefills in slots past 0. Both give plain decoding's greedy tokens and
    log-probs. Traced with dynamo's eager backend: the bookkeeping is under test, not inductor."""
    eager_dynamo()
    model, prompts = shipped_model_and_prompts(10, seed=10_003)

    def same(want, got):
        assert [o.output_ids for o in got] == [o.output_ids for o in want]
        assert all(max(abs(a - b) for a, b in zip(x.logprobs, y.logprobs)) <= 1e-5 for x, y in zip(want, got))

    n3 = SamplingParams(temperature=0, max_new_tokens=40, n=3)
    engine = Engine(model, max_batch=9, speculative_steps=3, compile_decode=True)
    for want, got in zip(Engine(model, max_batch=9).generate(prompts[:3], n3), engine.generate(prompts[:3], n3)):
        same(want, got)
    assert engine.stats["spec_accept_length"] >= 2.0
    one, two = SamplingParams(temperature=0, max_new_tokens=30), SamplingParams(temperature=0, max_new_tokens=30, n=2)
    first = engine.add_request(prompts[4], one)
    engine.step()
    engine.step()
    late = engine.add_request(prompts[5], two)  # prefilled in slots 1 and 2
    while engine.has_work():
        engine.step()
    want = Engine(model, max_batch=9).generate(prompts[4:6], [one, two])
    same(want[0], first.outputs)
    same(want[1], late.outputs)
