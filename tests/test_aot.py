"""The engine's ahead-of-time compiled decode step (rollout/aot.py) against the torch.compile'd one
and eager decoding: the same outputs, weights read in place, its disk cache shared between models."""

import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from conftest import random_model, small_config
from rlfoundry.model import kernels
from rlfoundry.model.glm4_moe import CacheStep
from rlfoundry.rollout import Engine, SamplingParams
from rlfoundry.rollout.aot import regimes
from rlfoundry.rollout.engine import decode_forward

pytestmark = pytest.mark.skipif(not kernels.load(), reason="needs the native kernels (a C++ compiler)")

CFG = small_config(max_position_embeddings=64)


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """The packages these tests build go to a cache of their own (shared by them, not with the
    user's ~/.cache), so that the one that must load another model's package finds one."""
    path = tmp_path_factory.mktemp("aot_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "cache_dir", lambda: path)
        yield path


def _steps(engine: Engine, model, B: int, S: int, seed: int = 0):
    """The ahead-of-time step, the torch.compile'd one and eager `decode_forward` on the same
    random cache rows (each call writes the same keys and values at position S - 1)."""
    g = torch.Generator().manual_seed(seed)
    for t in engine.cache.storage:
        t.copy_(torch.randn(t.shape, generator=g))
    ids = torch.randint(0, CFG.vocab_size, (B, 1), generator=g)
    lens = torch.full((B,), S - 1)
    step = lambda: CacheStep.rows(engine.cache, lens.tolist(), 1, torch.device("cpu"))  # noqa: E731
    with torch.no_grad():
        return engine._aot(ids, lens[:, None], S), engine._forward(model, ids, step()), decode_forward(model, ids, step())


def _close(a, b):
    """The same choices and routing, floats within rounding: logits reach ~20 on these random
    caches, so an absolute 1e-4 is ~5e-6 of their scale (the engine tests hold realistic
    log-probs to 1e-5 against the trainer's)."""
    logits, choice, lp, h, routed = a
    assert torch.equal(choice, b[1]) and torch.equal(routed, b[4])
    for x, y in ((logits, b[0]), (lp, b[2]), (h, b[3])):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)


def test_regimes_split_where_the_path_changes():
    assert regimes(1, []) == [(1, 1)]
    assert regimes(64, []) == [(1, 1), (2, 64)]
    assert regimes(64, [129]) == [(1, 1), (2, 64)]
    assert regimes(64, [17, 65]) == [(1, 1), (2, 16), (17, 64)]
    assert regimes(3, [3]) == [(1, 1), (2, 2), (3, 3)]


def test_aot_step_equals_the_compiled_step_and_eager_for_every_batch_regime():
    model = random_model(CFG, seed=1)
    engine = Engine(model, max_batch=4, compile_decode=True)
    engine.warmup()
    assert list(engine._aot.runners) == [(1, 1), (2, 4)]
    for B, S in ((1, 2), (1, 40), (2, 7), (4, 2), (4, CFG.max_position_embeddings - 1)):
        aot, compiled, eager = _steps(engine, model, B, S, seed=B * 100 + S)
        _close(aot, compiled)
        _close(aot, eager)


def test_a_cached_package_decodes_another_model_and_sees_weight_updates(monkeypatch):
    """The second engine loads the first one's packages (same shapes): it must compute with its own
    weights and buffers — the routers' correction biases included, which inductor would otherwise
    write into the kernels — and see them change in place or be replaced. Loading leaves no
    extracted copy of a package in the temporary directory (`aot._load`)."""
    first = random_model(CFG, seed=2)
    Engine(first, max_batch=4, compile_decode=True).warmup()  # (built by the test above, if it ran)
    model = random_model(CFG, seed=3)
    engine = Engine(model, max_batch=4, compile_decode=True)
    compiled, real = [], torch._inductor.aoti_compile_and_package
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda *a, **k: compiled.append(1) or real(*a, **k))
    extracted = lambda: set(Path(tempfile.gettempdir()).glob("aotinductor_*"))  # noqa: E731
    before = extracted()
    engine.warmup()
    assert engine._aot is not None and not compiled  # loaded from the cache
    assert len(engine._aot.runners) == 2 and not extracted() - before
    aot, _, eager = _steps(engine, model, 3, 20)
    _close(aot, eager)
    with torch.no_grad():  # in place, as update_weights copies
        for router in model.moe_routers():
            router.e_score_correction_bias.normal_(0.0, 0.5)
        model.lm_head.weight.mul_(-1.5)
    aot2, _, eager2 = _steps(engine, model, 3, 20)
    _close(aot2, eager2)
    assert not torch.equal(aot2[1], aot[1]) or (aot2[2] - aot[2]).abs().max() > 1e-3
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))  # replaced
    engine._aot.bind_weights()
    aot3, _, eager3 = _steps(engine, model, 3, 20)
    _close(aot3, eager3)


def test_engine_decodes_to_the_end_of_its_context_through_both_compiled_steps():
    """A step over the whole cache (the longest row at max_len) is the torch.compile'd step's;
    every other decode step the ahead-of-time one's: greedy tokens and log-probs as eager."""
    model = random_model(CFG, seed=4)
    max_len = 24
    compiled = Engine(model, max_batch=4, max_len=max_len, compile_decode=True)
    compiled.warmup()
    aot, keys = compiled._aot, []

    class Spy:
        def __getattr__(self, name):
            return getattr(aot, name)

        def __call__(self, ids, positions, num_keys):
            keys.append(num_keys)
            return aot(ids, positions, num_keys)

    compiled._aot = Spy()
    prompts = [[5, 6, 7], [8] * 10, [9, 10]]
    params = SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True)
    outs = compiled.generate(prompts, params)
    eager = Engine(model, max_batch=4, max_len=max_len).generate(prompts, params)
    for (o,), (e,) in zip(outs, eager):
        assert o.output_ids == e.output_ids and o.finish_reason == "length"
        assert (torch.tensor(o.logprobs) - torch.tensor(e.logprobs)).abs().max() <= 1e-5
    assert max(keys) == max_len - 1  # the last step, over max_len keys, went the other way


def test_aot_prefill_of_one_prompt_equals_the_compiled_one_and_eager():
    """One library for every prompt length T in its range (a dynamic size): a plain engine's
    `decode_forward` over one prompt against the torch.compile'd function and eager, at the
    range's ends and between; then the engine's one-prompt generations take it, with eager
    decoding's tokens. (A speculative engine's, `greedy_cycle` with the MTP layer's prefill and
    the first drafts: tests/test_speculative.py::test_compiled_speculative_decoding_equals_eager_plain_decoding.)"""
    model = random_model(CFG, seed=1)  # (the model and engine of the first test: its graphs and packages)
    engine = Engine(model, max_batch=4, compile_decode=True)
    engine.warmup()
    pre, g = engine._aot_prefill, torch.Generator().manual_seed(7)
    assert pre is not None and pre.lo == 2 and pre.hi == engine.max_len - 1
    for T in (2, 7, pre.hi):
        ids = torch.randint(0, CFG.vocab_size, (1, T), generator=g)
        engine.cache.lens.zero_()
        step = lambda: CacheStep.make(engine.cache, 1, T, torch.arange(1), None, torch.device("cpu"))  # noqa: E731
        with torch.no_grad():
            aot = pre(ids)
            _close(aot, engine._forward(model, ids, step()))
            _close(aot, decode_forward(model, ids, step()))
    assert not pre.applies(1) and not pre.applies(pre.hi + 1)
    calls = []
    engine._aot_prefill = lambda *args: calls.append(args[0].shape[1]) or pre(*args)
    engine._aot_prefill.applies = pre.applies
    prompts = [[5, 6, 7], [8] * 20, [9]]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    for p, (e,) in zip(prompts, Engine(model, max_batch=4).generate(prompts, params)):
        (o,) = engine.generate([p], params)[0]
        assert o.output_ids == e.output_ids
        assert (torch.tensor(o.logprobs) - torch.tensor(e.logprobs)).abs().max() <= 1e-5
    assert calls == [3, 20]  # (a one-token prompt prefills eager)


def test_a_failed_build_warns_and_decoding_keeps_the_compiled_step(monkeypatch):
    model = random_model(CFG, seed=5)
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no export")))
    engine = Engine(model, max_batch=4, compile_decode=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.warmup()
    assert engine._aot is None
    assert any("ahead-of-time compiled decode_forward" in str(w.message) and "no export" in str(w.message)
               for w in caught)
    prompts = [[1, 2, 3], [4, 5]]
    params = SamplingParams(temperature=0, max_new_tokens=6)
    for (o,), (e,) in zip(engine.generate(prompts, params), Engine(model, max_batch=4).generate(prompts, params)):
        assert o.output_ids == e.output_ids


def test_only_compiled_fp32_engines_build_them():
    """A plain compiled engine builds the decode step, a speculative one the cycle, eager ones none."""
    model = random_model(CFG, seed=6)
    plain, spec = Engine(model, max_batch=2, compile_decode=True), Engine(model, max_batch=2, compile_decode=True, speculative_steps=2)
    assert plain._aot_wanted and not plain._aot_cycle_wanted
    assert spec._aot_cycle_wanted and not spec._aot_wanted
    engine = Engine(model, max_batch=2)
    assert not engine._aot_wanted and not engine._aot_cycle_wanted
    engine = Engine(model, max_batch=2)
    engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    assert engine._aot is None
    # a context of 3 leaves the prefill one prompt length (2): a static size, no library, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Engine(model, max_batch=2, max_len=3, compile_decode=True)._aot_prefill_step() is None
