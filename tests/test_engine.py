"""The inference engine against the full forward of the same model (and transformers' generate)."""

import threading
import time
import warnings

import pytest
import torch

from conftest import hf_twin, random_model, small_config
from rlfoundry.rollout import Engine, RandomStream, RequestError, SamplingParams, sample


@pytest.fixture(scope="module")
def model():
    return random_model(small_config(max_position_embeddings=128), seed=21)


def _prompts(cfg, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]


def trainer_logprobs(model, prompt, output, temperature=1.0):
    """What the trainer computes: log softmax(logits / T) of the sampled tokens, full forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1:-1].float()
    scaled = logits / (temperature if temperature > 0 else 1.0)
    return scaled.log_softmax(-1).gather(1, torch.tensor(output)[:, None]).flatten(), logits


def test_greedy_equals_full_forward_and_transformers_generate(model):
    cfg = model.config
    prompts = _prompts(cfg, [3, 11, 6, 1])
    outs = Engine(model, max_batch=4).generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))
    hf = hf_twin(model)
    for p, (o,) in zip(prompts, outs):
        lp, logits = trainer_logprobs(model, p, o.output_ids)
        assert logits.argmax(-1).tolist() == o.output_ids
        assert (lp - torch.tensor(o.logprobs)).abs().max().item() <= 1e-5
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
        assert ref[0, len(p):].tolist() == o.output_ids
        assert o.finish_reason == "length" and o.weight_version == "0"


def test_sampled_logprobs_equal_trainer_logprobs(model):
    prompts = _prompts(model.config, [4, 9, 2], seed=1)
    params = SamplingParams(temperature=0.7, max_new_tokens=16, seed=5)
    outs = Engine(model, max_batch=8).generate(prompts, params)
    for p, (o,) in zip(prompts, outs):
        lp, _ = trainer_logprobs(model, p, o.output_ids, temperature=0.7)
        assert (lp - torch.tensor(o.logprobs)).abs().max().item() <= 1e-5


def test_n_samples_share_one_prefill_and_seeds_reproduce(model):
    prompt = _prompts(model.config, [7])[0]
    engine = Engine(model, max_batch=8)
    params = SamplingParams(temperature=1.0, max_new_tokens=10, n=6, seed=123)
    first = engine.generate([prompt], params)[0]
    assert engine.stats["prompt_tokens"] == 7           # one prefill for six samples
    assert [o.index for o in first] == list(range(6))
    assert len({tuple(o.output_ids) for o in first}) > 1  # the samples differ
    # same seed, different company in the batch: same outputs
    other = _prompts(model.config, [5, 3], seed=9)
    again = engine.generate([other[0], prompt, other[1]], [SamplingParams(temperature=1.0, max_new_tokens=4),
                                                           params, SamplingParams(temperature=0.5)])[1]
    assert [o.output_ids for o in again] == [o.output_ids for o in first]
    for o in first:
        lp, _ = trainer_logprobs(model, prompt, o.output_ids)
        assert (lp - torch.tensor(o.logprobs)).abs().max().item() <= 1e-5


def test_queueing_beyond_capacity_gives_the_same_results(model):
    prompts = _prompts(model.config, [2, 5, 8, 3, 6, 4, 7, 1, 9], seed=2)
    greedy = SamplingParams(temperature=0, max_new_tokens=9)
    small = Engine(model, max_batch=2).generate(prompts, greedy)      # most requests wait
    alone = [Engine(model, max_batch=1).generate([p], greedy)[0][0] for p in prompts[:3]]
    assert [o[0].output_ids for o in small[:3]] == [o.output_ids for o in alone]
    big = Engine(model, max_batch=16).generate(prompts, greedy)
    assert [o[0].output_ids for o in small] == [o[0].output_ids for o in big]


def test_sequences_finishing_at_different_steps_keep_their_caches(model):
    """Finished sequences leave holes in the batch that the last running ones move into (one cache
    copy per layer for all of them, after the step): every sample still decodes what it decodes
    alone, greedy and seeded, with the same log-probs to fp32 rounding."""
    prompts = _prompts(model.config, [3, 8, 5, 1, 6, 9, 2], seed=4)
    params = [SamplingParams(temperature=t, n=n, seed=7 + i, max_new_tokens=m, ignore_eos=True)
              for i, (t, n, m) in enumerate([(0, 1, 3), (1.0, 3, 11), (0, 1, 5), (1.0, 2, 1), (0.8, 3, 8),
                                             (0, 1, 14), (1.0, 2, 2)])]
    together = Engine(model, max_batch=16).generate(prompts, params)
    for p, sp, outs in zip(prompts, params, together):
        alone = Engine(model, max_batch=4).generate([p], sp)[0]
        for a, b in zip(outs, alone):
            assert a.output_ids == b.output_ids and len(a.output_ids) == sp.max_new_tokens
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5


def test_stop_tokens_eos_and_lengths(model):
    prompt = _prompts(model.config, [5], seed=3)[0]
    engine = Engine(model, max_batch=4, max_len=20)
    free = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=10))[0][0]
    stop = free.output_ids[3]
    first_stop = free.output_ids.index(stop)
    o = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[stop]))[0][0]
    assert o.output_ids == free.output_ids[: first_stop + 1] and o.finish_reason == "stop" and o.matched_stop == stop
    eos_engine = Engine(model, max_batch=4, max_len=20, eos_token_ids=[stop])
    assert eos_engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=10))[0][0].finish_reason == "stop"
    o = eos_engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True))[0][0]
    assert o.output_ids == free.output_ids and o.finish_reason == "length"
    o = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=100))[0][0]
    assert len(o.output_ids) == 20 - 5 and o.finish_reason == "length"   # the context ends it
    assert engine.generate([prompt], SamplingParams(max_new_tokens=0))[0][0].output_ids == []


def test_truncation_filters(model):
    prompt = _prompts(model.config, [6], seed=4)[0]
    engine = Engine(model, max_batch=4)
    greedy = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=8))[0][0].output_ids
    for params in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        o = engine.generate([prompt], SamplingParams(temperature=1.3, max_new_tokens=8, seed=1, **params))[0][0]
        assert o.output_ids == greedy
        lp, _ = trainer_logprobs(model, prompt, o.output_ids, temperature=1.3)  # untruncated log-probs
        assert (lp - torch.tensor(o.logprobs)).abs().max().item() <= 1e-5


def test_sampler_draws_from_softmax_and_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    rows, rounds = 2000, 10
    gens = [RandomStream(i) for i in range(rows)]
    batch = logits.expand(rows, 5)

    def counts_of(params):
        counts = torch.zeros(5)
        for _ in range(rounds):
            ids, lp = sample(batch, [params] * rows, gens)
            counts += torch.bincount(ids, minlength=5)
        return counts, lp

    n = rows * rounds
    counts, lp = counts_of(SamplingParams(temperature=1.0))
    expected = logits.softmax(-1)[0] * n
    assert ((counts - expected) ** 2 / expected).sum().item() < 18.5  # chi-square, 4 dof, p = 0.001
    counts, lp = counts_of(SamplingParams(temperature=2.0, top_k=2))
    assert counts[2:].sum() == 0
    assert abs(counts[0] / n - 1 / (1 + torch.e ** -0.5)) < 0.015          # renormalised over the top 2
    counts, lp = counts_of(SamplingParams(temperature=1.0, top_p=0.6))  # nucleus: the top 2 (0.49 + 0.18)
    assert counts[2:].sum() == 0


def test_routed_experts_replay_to_the_same_logprobs(model):
    prompt = _prompts(model.config, [6], seed=5)[0]
    o = Engine(model, max_batch=2).generate([prompt], SamplingParams(temperature=1.0, max_new_tokens=7, seed=2,
                                                                     return_routed_experts=True))[0][0]
    seq = torch.tensor([prompt + o.output_ids])
    with torch.no_grad():
        full = model(seq)
    T = len(prompt) + len(o.output_ids) - 1
    assert o.routed_experts.shape == (T, model.config.num_moe_layers, model.config.num_experts_per_tok)
    assert torch.equal(o.routed_experts.long().sort(-1).values, full.routed_experts[0, :T].sort(-1).values)
    routed = torch.cat([o.routed_experts.long(), full.routed_experts[0, T:]])[None]
    with torch.no_grad():
        replay = model(seq, routed_experts=routed)
    assert torch.allclose(replay.logits, full.logits, atol=1e-6)


def test_bad_requests_name_the_field(model):
    engine = Engine(model, max_batch=2, max_len=16)
    with pytest.raises(RequestError, match="sampling_params.temperature must be >= 0, got -1"):
        engine.add_request([1, 2], SamplingParams(temperature=-1))
    with pytest.raises(RequestError, match="sampling_params.max_new_tokens must be >= 0"):
        engine.add_request([1, 2], SamplingParams(max_new_tokens=-5))
    with pytest.raises(RequestError, match="does not fit the context of 16"):
        engine.add_request(list(range(16)))
    with pytest.raises(RequestError, match="input_ids"):
        engine.add_request([1, 10_000])
    with pytest.raises(RequestError, match="sampling_params.n must be <= max_batch=2"):
        engine.add_request([1], SamplingParams(n=3))
    assert not engine.has_work()


def _wait(cond, timeout=30.0):
    t = time.time()
    while not cond():
        assert time.time() - t < timeout, "timed out"
        time.sleep(0.005)


def test_abort_pause_and_weight_update_mid_generation(model, tmp_path):
    from rlfoundry.model import save_pretrained

    cfg = model.config
    local = random_model(cfg, seed=21)  # our own copy: its weights change here
    engine = Engine(local, max_batch=4).start()
    try:
        prompt = _prompts(cfg, [4], seed=6)[0]
        greedy = SamplingParams(temperature=0, max_new_tokens=60)
        reference = engine.generate([prompt], greedy)[0][0]
        # abort: partial output, finish_reason abort
        req = engine.add_request(prompt, SamplingParams(temperature=0, max_new_tokens=60))
        _wait(lambda: req.seqs[0].output_ids.__len__() >= 3)
        assert engine.abort(req.id)
        req.done.wait(10)
        out = req.outputs[0]
        assert out.finish_reason == "abort" and 3 <= len(out.output_ids) < 60
        assert out.output_ids == reference.output_ids[: len(out.output_ids)]
        # pause: no progress until continue, then the same tokens as without a pause
        req = engine.add_request(prompt, greedy)
        _wait(lambda: len(req.seqs[0].output_ids) >= 2)
        engine.pause()
        time.sleep(0.05)
        frozen = len(req.seqs[0].output_ids)
        time.sleep(0.2)
        assert len(req.seqs[0].output_ids) == frozen and not req.done.is_set()
        engine.resume()
        req.done.wait(20)
        assert req.outputs[0].output_ids == reference.output_ids
        # weight update mid-generation: new version on the output, new weights from then on
        other = random_model(cfg, seed=99)
        req = engine.add_request(prompt, greedy)
        _wait(lambda: len(req.seqs[0].output_ids) >= 5)
        engine.pause()
        n_before = len(req.seqs[0].output_ids)
        engine.update_weights(other.state_dict(), version="v7")
        engine.resume()
        req.done.wait(20)
        out = req.outputs[0]
        assert out.weight_version == "v7"
        assert out.output_ids[:n_before] == reference.output_ids[:n_before]
        fresh = engine.generate([prompt], greedy)[0][0]
        assert fresh.output_ids == Engine(other, max_batch=1).generate([prompt], greedy)[0][0].output_ids
        # subset update by checkpoint name (one expert of one layer), and from a directory
        w = torch.randn(cfg.moe_intermediate_size, cfg.hidden_size)
        engine.update_weights({"model.layers.1.mlp.experts.3.up_proj.weight": w}, version="v8")
        I = cfg.moe_intermediate_size
        assert torch.equal(local.model.layers[1].mlp.experts.gate_up_proj[3, I:], w)
        save_pretrained(model, tmp_path / "ckpt")
        engine.update_weights(tmp_path / "ckpt", version="v9")
        again = engine.generate([prompt], greedy)[0][0]
        assert again.output_ids == reference.output_ids and again.weight_version == "v9"
    finally:
        engine.shutdown()


def test_abort_all_mid_generation_then_the_engine_serves_on(model):
    engine = Engine(model, max_batch=8).start()
    try:
        prompts = _prompts(model.config, [3, 6, 2], seed=3)
        long = SamplingParams(temperature=1.0, max_new_tokens=300, n=2, ignore_eos=True)
        reqs = [engine.add_request(p, long) for p in prompts]
        _wait(lambda: all(len(s.output_ids) >= 2 for r in reqs for s in r.seqs))
        engine.abort_all()
        for r in reqs:
            assert r.done.wait(10) and all(o.finish_reason == "abort" and len(o.output_ids) < 300 for o in r.outputs)
        assert not engine.has_work()
        greedy = SamplingParams(temperature=0, max_new_tokens=7)
        assert engine.generate(prompts[:1], greedy)[0][0].output_ids == \
            Engine(model, max_batch=1).generate(prompts[:1], greedy)[0][0].output_ids
    finally:
        engine.shutdown()


def test_control_calls_wait_for_one_step_at_most(model):
    """abort / pause / weight updates from another thread take effect after the step in flight:
    the loop lets them in before its next step (locks are not fair; the loop used to take the
    engine again at once, and an abort in CI waited 77 steps)."""
    engine = Engine(model, max_batch=4).start()
    try:
        req = engine.add_request(_prompts(model.config, [4], seed=1)[0],
                                 SamplingParams(temperature=0, max_new_tokens=400, ignore_eos=True))
        _wait(lambda: len(req.seqs[0].output_ids) >= 2)
        waited = []
        for _ in range(20):
            s0 = engine.stats["steps"]
            engine.update_weights({}, version="v1")   # nothing copied: just a call between steps
            waited.append(engine.stats["steps"] - s0)
            time.sleep(0.002)
        assert not req.done.is_set(), "the request finished before the calls ended"
        s0 = engine.stats["steps"]
        assert engine.abort(req.id)
        waited.append(engine.stats["steps"] - s0)
        # the step in flight, and one that may start between reading the count and asking
        assert max(waited) <= 2, waited
    finally:
        engine.shutdown()


def test_the_model_runs_only_on_the_loop_thread(model, monkeypatch):
    """With a loop running (`run` on the calling thread, as `rlfoundry serve` runs it on its main
    thread), requests, weight updates, pauses and aborts from other threads are carried out on the
    loop's thread, which alone runs the model: torch ops from a second thread would start a second
    OpenMP team (slow with more threads than cores). `shutdown` from another thread ends `run`."""
    import rlfoundry.rollout.engine as engine_module

    engine = Engine(model, max_batch=4)
    ran_on = {"forward": set(), "update": set()}
    forward, update = model.forward, engine_module.update_from_tensors
    monkeypatch.setattr(model, "forward", lambda *a, **k: ran_on["forward"].add(threading.get_ident()) or forward(*a, **k))
    monkeypatch.setattr(engine_module, "update_from_tensors",
                        lambda *a: ran_on["update"].add(threading.get_ident()) or update(*a))
    results = {}

    def client():
        try:
            _wait(lambda: engine.looping)  # `run` has begun on the main thread
            params = SamplingParams(temperature=0, max_new_tokens=6)
            results["first"] = engine.generate(_prompts(model.config, [5, 3]), params)
            assert engine.update_weights(dict(model.state_dict()), version="7") > 0
            engine.pause()
            engine.resume()
            req = engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=1000, ignore_eos=True))
            _wait(lambda: len(req.seqs[0].output_ids) >= 2)
            assert engine.abort(req.id)
            results["after"] = engine.generate([[1, 2]], params)[0][0]
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            results["error"] = e
        finally:
            engine.shutdown()

    other = threading.Thread(target=client)
    other.start()
    engine.run()  # returns on the client's shutdown()
    other.join()
    assert "error" not in results, results.get("error")
    assert ran_on["forward"] == ran_on["update"] == {threading.get_ident()}
    assert results["after"].weight_version == "7" and len(results["after"].output_ids) == 6
    assert engine.generate([[1, 2]], SamplingParams(temperature=0, max_new_tokens=6))[0][0].output_ids == \
        results["after"].output_ids  # no loop now: generate drives the steps itself


def test_requests_arriving_during_a_step_join_the_next_one_together(model):
    """Submitting never waits for the running step (a server thread would stall, and requests
    would join one per step): while a step holds the engine, requests queue at once, and the next
    step admits them all in one prefill."""
    engine = Engine(model, max_batch=16).start()
    prefills = []
    run_prefill = engine._prefill
    engine._prefill = lambda reqs: (prefills.append(len(reqs)), run_prefill(reqs))[1]
    params = SamplingParams(temperature=0, max_new_tokens=3)
    in_step, step_may_end = threading.Event(), threading.Event()

    def long_step():
        with engine._lock:
            in_step.set()
            step_may_end.wait(60)

    holder = threading.Thread(target=long_step)
    holder.start()
    try:
        in_step.wait(10)
        reqs, submitter = [], threading.Thread(
            target=lambda: reqs.extend(engine.add_request(p, params) for p in _prompts(model.config, [4, 7, 2, 5, 3])))
        submitter.start()
        submitter.join(5)
        assert len(reqs) == 5, "add_request waited for the running step"
        assert engine.load()["waiting"] == 5  # metrics do not wait for the step either
        step_may_end.set()
        holder.join()
        for r in reqs:
            assert r.done.wait(60)
        assert prefills == [5]
    finally:
        step_may_end.set()
        engine.shutdown()


def test_an_idle_engine_waits_for_a_burst_of_requests_to_end(model):
    """admit_quiet_s: an idle loop starts requests once none has arrived for that long, so a burst
    (here 6 requests 5 ms apart) is prefilled as one batch; a stream that never pauses is started
    after ADMIT_MAX_WAIT_S at most; without it a request starts at once."""
    prompts = _prompts(model.config, [4, 7, 2, 5, 3, 6])
    params = SamplingParams(temperature=0, max_new_tokens=3)
    with pytest.raises(ValueError, match="admit_quiet_s"):
        Engine(model, admit_quiet_s=-1.0)

    def burst(engine, gap_s, n):
        prefills, run_prefill = [], engine._prefill
        engine._prefill = lambda reqs: (prefills.append((time.monotonic(), len(reqs))), run_prefill(reqs))[1]
        engine.start()
        try:
            t0, reqs = time.monotonic(), []
            for i in range(n):
                reqs.append(engine.add_request(prompts[i % len(prompts)], params))
                time.sleep(gap_s)
            for r in reqs:
                assert r.done.wait(60)
            return t0, prefills
        finally:
            engine.shutdown()

    _, prefills = burst(Engine(model, max_batch=16, admit_quiet_s=0.05), 0.005, 6)
    assert [n for _, n in prefills] == [6]
    t0, prefills = burst(Engine(model, max_batch=64, admit_quiet_s=0.05), 0.01, 30)  # never quiet for 50 ms
    assert len(prefills) > 1 and prefills[0][0] - t0 < Engine.ADMIT_MAX_WAIT_S + 0.03
    t0, prefills = burst(Engine(model, max_batch=16), 0.0, 1)
    assert prefills[0][0] - t0 < 0.02


def test_compiled_decode_equals_eager_decoding(model, optimized_cpp):
    """compile_decode=True runs decode steps (and prefills of ragged prompts)
    through torch.compile'd layers (their C++ at -O3, as the engine builds it outside the tests): the same greedy tokens as the eager engine, log-probs within
    1e-5 of the trainer's full forward, through a batch that shrinks to one sequence (the two
    compiled regimes), for greedy rows (reduced inside the graph) and sampled ones; weights updated
    in place are the ones the compiled steps then use."""
    cfg = model.config
    prompts = _prompts(cfg, [3, 11, 6, 1], seed=4)
    params = [SamplingParams(temperature=0, max_new_tokens=n) for n in (12, 5, 9, 16)]
    compiled = Engine(random_model(cfg, seed=21), max_batch=4, compile_decode=True)  # the fixture's weights
    compiled.warmup()  # compiles batch 1 and batch >= 2, one token a row and the prefill's 2+
    assert compiled.stats["generated_tokens"] == 0 and not compiled.has_work()
    forward, tokens_a_row = compiled._forward, []
    compiled._forward = lambda model, ids, step: tokens_a_row.append(ids.shape[1]) or forward(model, ids, step)
    assert compiled._aot is not None  # CPU, fp32, native kernels: decode steps compiled ahead of time

    class Spy:  # the batch size of every ahead-of-time step
        def __init__(self, inner):
            self.inner, self.batches = inner, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, ids, positions, num_keys):
            self.batches.append(ids.shape[0])
            return self.inner(ids, positions, num_keys)

    compiled._aot = aot = Spy(compiled._aot)
    outs = compiled.generate(prompts, params)
    # the prompts (3, 11, 6 and 1 tokens) were prefilled compiled, as one batch of rows of 11 (the
    # shorter ones' padding written past their ends), the rest one token a row, ahead of time
    assert tokens_a_row == [11] and {1, 2, 4} <= set(aot.batches)
    for p, (o,), (e,) in zip(prompts, outs, Engine(model, max_batch=4).generate(prompts, params)):
        assert o.output_ids == e.output_ids
        lp, _ = trainer_logprobs(model, p, o.output_ids)
        assert (lp - torch.tensor(o.logprobs)).abs().max().item() <= 1e-5
    # greedy decode steps reduce the logits inside the compiled graph; a batch with sampled rows
    # takes the compiled layers and then `sample`: log-probs under temperature, mixed with greedy rows
    mixed = [SamplingParams(temperature=0.7, max_new_tokens=10, seed=3), params[1],
             SamplingParams(temperature=1.0, max_new_tokens=7, seed=4), params[3]]
    for p, sp, (o,) in zip(prompts, mixed, compiled.generate(prompts, mixed)):
        assert len(o.output_ids) == sp.max_new_tokens or o.finish_reason == "stop"
        lp, _ = trainer_logprobs(model, p, o.output_ids, sp.temperature)
        assert (lp - torch.tensor(o.logprobs)).abs().max().item() <= 1e-5
    # n samples of one prompt start from its compiled prefill (copied to their slots: one prompt
    # alone, ahead of time); a prompt of over DECODE_ATTENTION_MAX_T tokens is prefilled eager
    tokens_a_row.clear()
    prefill = compiled._aot_prefill
    assert prefill is not None  # (built by warmup)
    compiled._aot_prefill = lambda ids: tokens_a_row.append(ids.shape[1]) or prefill(ids)
    compiled._aot_prefill.applies = prefill.applies
    long_prompt = _prompts(cfg, [70], seed=8)[0]
    for p in (prompts[1], long_prompt):
        for o in compiled.generate([p], SamplingParams(temperature=1.0, max_new_tokens=6, n=3, seed=7))[0]:
            lp, _ = trainer_logprobs(model, p, o.output_ids)
            assert (lp - torch.tensor(o.logprobs)).abs().max().item() <= 1e-5
    assert tokens_a_row[0] == 11 and 70 not in tokens_a_row
    compiled._aot_prefill = prefill
    other = random_model(cfg, seed=5)
    compiled.update_weights(other.state_dict())
    new = compiled.generate(prompts, params)
    assert [o.output_ids for (o,) in new] != [o.output_ids for (o,) in outs]
    for (o,), (e,) in zip(new, Engine(other, max_batch=4).generate(prompts, params)):
        assert o.output_ids == e.output_ids and o.weight_version == "1"
