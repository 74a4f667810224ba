"""The trainer workshop's RL step (TrainerWorker without Ray) on samples the model generated itself."""

import pytest

from rlfoundry.rl.config import load_rl_config
from rlfoundry.rl.sample import Sample, Status


def _own_samples(model, groups: int, n: int) -> list[list[dict]]:
    """Groups sampled from `model` itself (engine log-probs), with rewards that differ in each group."""
    from rlfoundry.rollout.engine import Engine, SamplingParams

    engine = Engine(model, max_batch=64)
    prompts = [[3 + g, 7, 11 + g, 5] for g in range(groups)]
    outs = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=12, n=n, seed=0, ignore_eos=True))
    return [[Sample(p, o.output_ids, o.logprobs, reward=float(i % 2), group_id=g, index=i,
                    status=Status.COMPLETED).to_dict() for i, o in enumerate(os_)]
            for g, (p, os_) in enumerate(zip(prompts, outs))]


def test_updates_per_rollout_are_clipped_against_the_rollout_policy(tmp_path):
    """With several optimizer steps per rollout, every mini-batch's PPO ratio is taken against the
    policy that generated the samples (computed before the first update): later mini-batches see
    ratios away from 1 and get clipped, and the logged train-inference mismatch stays the on-policy one."""
    from rlfoundry.rl.workers import TrainerWorker

    cfg = load_rl_config(None, ["algorithm.updates_per_rollout=2", "algorithm.micro_batch_size=64",
                                "train.lr=3e-2", "train.final_lr=3e-2"])
    worker = TrainerWorker(cfg, str(tmp_path))
    m = worker.train(_own_samples(worker.model, groups=8, n=8))
    assert m["train/mismatch_max"] < 1e-4
    assert m["train/clip_frac"] > 0  # the first update has ratio 1 everywhere; only the second clips


@pytest.mark.parametrize("extra", [[], ["train.bf16=true", "algorithm.updates_per_rollout=2"]],
                         ids=["fp32", "bf16-two-updates"])
def test_compiled_trainer_compiles_at_start_up_and_trains_like_eager(tmp_path, extra):
    """train.compile: TrainerWorker traces the RL loss's forward and backward when it starts (one
    graph with symbolic sizes; under train.bf16 with autocast, which is part of the graph, and with
    the no-grad old-log-prob pass that several updates a rollout need), leaving weights and
    gradients untouched; a step on real samples of another shape then reuses those graphs and gives
    the eager step's loss."""
    import torch
    import torch._dynamo

    from rlfoundry.rl.workers import TrainerWorker

    # micro-batches of 8: the start-up runs 8, 4 and 2 samples and one group (bf16 with two updates:
    # 5 graphs, 71 s here, against 7 and 111 s at 64); the step below, 16 samples, runs two of 8
    overrides = ["algorithm.micro_batch_size=8", "rollout.max_new_tokens=12", *extra, "train.compile=aot_eager"]
    torch._dynamo.reset()
    compiled = TrainerWorker(load_rl_config(None, overrides), str(tmp_path / "c"))
    eager = TrainerWorker(load_rl_config(None, overrides[:-1]), str(tmp_path / "e"))
    assert all(p.grad is None for p in compiled.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(compiled.model.state_dict().values(), eager.model.state_dict().values()))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    groups = _own_samples(eager.model, groups=4, n=4)
    mc, me = compiled.train(groups), eager.train(groups)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no new compile
    assert abs(mc["train/loss"] - me["train/loss"]) < 1e-5
    assert abs(mc["train/mismatch_max"] - me["train/mismatch_max"]) < 1e-5


def test_exact_mode_gives_the_engines_log_probs_bit_for_bit(tmp_path):
    """exact: the trainer computes in fp64 from its fp32 weights, the engine holds an fp64 copy of
    the same weights (as `rlfoundry rl` starts its engines), and both round log-probs to fp32: the
    trainer's log-probs of sampled tokens equal the engine's exactly — through batches that shrink
    as sequences finish, micro-batches of another size, and after a training step and a weight
    update. In fp32 the same comparison is not exact (MKL's matrix products round by shape)."""
    import torch

    from rlfoundry.model import load_pretrained
    from rlfoundry.rl.workers import TrainerWorker
    from rlfoundry.rollout.engine import Engine, SamplingParams

    def groups_from(engine, seed):
        prompts = [[3 + g, 7, 11 + g, 5][: 2 + g % 3] for g in range(8)]
        outs = engine.generate(prompts, SamplingParams(temperature=0.9, max_new_tokens=20, n=6, seed=seed))
        return [[Sample(p, o.output_ids, o.logprobs, reward=float(i % 2), group_id=g, index=i,
                        status=Status.COMPLETED).to_dict() for i, o in enumerate(os_)]
                for g, (p, os_) in enumerate(zip(prompts, outs))]

    common = ["algorithm.micro_batch_size=20", "rollout.temperature=0.9", "train.lr=1e-2", "train.final_lr=1e-2"]
    exact = TrainerWorker(load_rl_config(None, common + ["exact=true"]), str(tmp_path / "x"))
    engine = Engine(load_pretrained(exact.cfg.model, dtype=torch.float64), max_batch=64)
    assert engine.model.lm_head.weight.dtype == torch.float64
    m = exact.train(groups_from(engine, 0))
    assert m["train/mismatch_max"] == 0.0 and m["train/grad_norm"] > 0
    assert all(p.dtype == torch.float32 for p in exact.model.parameters())
    engine.update_weights(exact.model.state_dict(), version="1")  # fp32 weights into the fp64 copy
    assert exact.train(groups_from(engine, 1))["train/mismatch_max"] == 0.0

    plain = TrainerWorker(load_rl_config(None, common), str(tmp_path / "p"))
    assert plain.train(groups_from(Engine(plain.model, max_batch=64), 0))["train/mismatch_max"] > 0


@pytest.mark.parametrize("share_prompts", [True, False])
def test_batch_invariant_mode_gives_the_engines_log_probs_bit_for_bit_in_fp32(tmp_path, share_prompts):
    """batch_invariant: engine and trainer both compute each sequence as if alone, in fp32: the
    trainer's log-probs equal the engine's exactly — the engine decoding on one thread, batches that
    shrink as sequences finish, prompts of 2 - 4 tokens, micro-batches of another size, responses
    packed after their shared prompt or one row a sample, and after a step and a weight update."""
    import torch

    from rlfoundry.model import load_pretrained
    from rlfoundry.rl.workers import TrainerWorker
    from rlfoundry.rollout.engine import Engine, SamplingParams

    def groups_from(engine, seed):
        prompts = [[3 + g, 7, 11 + g, 5][: 2 + g % 3] for g in range(8)]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            outs = engine.generate(prompts, SamplingParams(temperature=0.9, max_new_tokens=20, n=6, seed=seed))
        finally:
            torch.set_num_threads(threads)
        return [[Sample(p, o.output_ids, o.logprobs, reward=float(i % 2), group_id=g, index=i,
                        status=Status.COMPLETED).to_dict() for i, o in enumerate(os_)]
                for g, (p, os_) in enumerate(zip(prompts, outs))]

    worker = TrainerWorker(load_rl_config(None, [
        "algorithm.micro_batch_size=20", "rollout.temperature=0.9", "train.lr=1e-2", "train.final_lr=1e-2",
        "batch_invariant=true", f"algorithm.share_prompts={str(share_prompts).lower()}"]), str(tmp_path))
    engine = Engine(load_pretrained(worker.cfg.model), max_batch=64, batch_invariant=True)
    m = worker.train(groups_from(engine, 0))
    assert m["train/mismatch_max"] == 0.0 and m["train/grad_norm"] > 0
    engine.update_weights(worker.model.state_dict(), version="1")
    assert worker.train(groups_from(engine, 1))["train/mismatch_max"] == 0.0


def test_exact_log_probs_stand_in_for_the_old_policy_pass(tmp_path):
    """With several updates a rollout, the later updates' PPO denominators are the sampling policy's
    log-probs. In a batch-invariant run those are the engine's bit for bit, so the trainer skips its
    no-grad pass and uses them: the same step, weight for weight, as with the pass, and the mismatch
    is still measured (on the first update, whose denominators the trainer computes)."""
    import torch

    from rlfoundry.model import load_pretrained
    from rlfoundry.rl.workers import TrainerWorker
    from rlfoundry.rollout.engine import Engine, SamplingParams

    overrides = ["algorithm.micro_batch_size=16", "algorithm.updates_per_rollout=2", "batch_invariant=true",
                 "train.lr=3e-2", "train.final_lr=3e-2"]
    skip, with_pass = (TrainerWorker(load_rl_config(None, overrides), str(tmp_path / d)) for d in "ab")
    with_pass.engine_logprobs_exact = False  # still batch-invariant, but computes the pass
    engine = Engine(load_pretrained(skip.cfg.model), max_batch=64, batch_invariant=True)
    prompts = [[3 + g, 7, 11 + g, 5] for g in range(6)]
    outs = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=12, n=4, seed=0))
    groups = [[Sample(p, o.output_ids, o.logprobs, reward=float(i % 2), group_id=g, index=i,
                      status=Status.COMPLETED).to_dict() for i, o in enumerate(os_)]
              for g, (p, os_) in enumerate(zip(prompts, outs))]
    calls = []
    import rlfoundry.rl.policy as policy
    real = policy.sequence_logprobs
    policy.sequence_logprobs = lambda *a, **k: calls.append(torch.is_grad_enabled()) or real(*a, **k)
    try:
        ms = skip.train(groups)
        no_grad_skip = calls.count(False)
        mp = with_pass.train(groups)
    finally:
        policy.sequence_logprobs = real
    assert no_grad_skip == 0 and calls.count(False) > 0  # the no-grad pass ran in the second worker only
    assert ms["train/clip_frac"] > 0 and ms["train/mismatch_max"] == 0.0 and mp["train/mismatch_max"] == 0.0
    assert "train/mismatch_mean" in ms
    assert all(torch.equal(a, b) for a, b in zip(skip.model.parameters(), with_pass.model.parameters()))


def test_bf16_training_computes_every_rl_forward_under_autocast(tmp_path):
    """train.bf16 in RL: the loss's forward runs under bf16 autocast (it used to be ignored when
    the trainer was given RL's loss), and so does the no-grad pass that records the old log-probs,
    so that with unchanged weights the PPO ratio is exactly 1 (nothing clipped). The train-inference
    mismatch is then bf16's, orders of magnitude above fp32's."""
    from rlfoundry.rl.workers import TrainerWorker

    cfg = load_rl_config(None, ["train.bf16=true", "algorithm.updates_per_rollout=2", "algorithm.micro_batch_size=64",
                                "train.lr=1e-12", "train.final_lr=1e-12"])
    worker = TrainerWorker(cfg, str(tmp_path))
    m = worker.train(_own_samples(worker.model, groups=8, n=8))
    assert m["train/clip_frac"] == 0.0
    assert m["train/mismatch_max"] > 1e-3


@pytest.mark.parametrize("routing_replay", [False, True], ids=["routed", "replayed"])
def test_shared_prompt_packing_gives_the_per_sample_loss_and_gradients(routing_replay):
    """algorithm.share_prompts: a group's prompt computed once, its responses packed after it (each
    seeing the prompt and itself), gives every sample the log-probs, and the step the loss and
    gradients, of one row per sample — in fp64 to 1e-12 (gradients: to the rounding of their fp32
    dtype) — through groups of different sizes, an
    empty response, micro-batches that split a group, and replayed expert choices; with fewer
    token positions through the model."""
    import torch

    from rlfoundry.model import load_pretrained
    from rlfoundry.model.glm4_moe import ComputeIn
    from rlfoundry.rl.policy import make_batches, policy_loss
    from rlfoundry.rollout.engine import Engine, SamplingParams

    cfg = load_rl_config(None, ["algorithm.entropy_coef=0.01"])  # the entropy's gradient too
    model = load_pretrained(cfg.model)
    engine = Engine(model, max_batch=64)
    samples = []
    for g, n in enumerate([3, 1, 5, 4]):
        prompt = [(3 + g * 7 + i * 5) % 500 + 1 for i in range(20 + 3 * g)]  # prompts longer than responses
        outs = engine.generate([prompt], SamplingParams(temperature=1.0, max_new_tokens=10 + g, n=n, seed=g,
                                                        return_routed_experts=routing_replay))[0]
        samples += [Sample(prompt, o.output_ids, o.logprobs, group_id=g, index=i,
                           routed_experts=o.routed_experts.tolist() if routing_replay else None)
                    for i, o in enumerate(outs)]
    samples[4] = Sample(samples[4].prompt_ids, [], [], group_id=1,  # an empty response (nothing to train)
                        routed_experts=samples[4].routed_experts[: len(samples[4].prompt_ids)] if routing_replay else None)
    if not routing_replay:  # hindsight-relabelled samples after their groups: prompts that share
        for at, g in ((3, 0), (10, 2)):  # all but their last tokens with the group's join its row
            src = samples[at - 1]
            samples.insert(at, Sample(src.prompt_ids[:-3] + [7, 9, 11, 13], src.response_ids[:6], [0.0] * 6,
                                      group_id=g, relabelled_from={"question": "q", "label": None}))
    advs = [(-1.0) ** i * (1 + i / 10) for i in range(len(samples))]
    policy = ComputeIn(model, torch.float64)

    def step(share: bool, temperature: float = 1.0):
        model.zero_grad(set_to_none=True)
        batches = make_batches(samples, advs, 5, "token-mean", routing_replay=routing_replay, share_prompts=share)
        total, logps = 0.0, []
        for b in batches:
            loss, m = policy_loss(policy, b, cfg.algorithm, temperature)
            (loss * b.weight).backward()
            total += loss.item() * b.weight
            logps += [m["logprob_mean"], m["entropy"]]
        return total, [p.grad.clone() for p in model.parameters() if p.grad is not None], batches, logps

    for temperature in (0.7, 1.0):  # at 1 the packed path takes the entropy from the same log-softmax
        loss_a, grads_a, plain, logp_a = step(False, temperature)
        loss_b, grads_b, packed, logp_b = step(True, temperature)
        assert abs(loss_a - loss_b) < 1e-12 and len(grads_a) == len(grads_b) > 0
        scale = max(a.abs().max().item() for a in grads_a)  # gradients accumulate in the fp32 parameters' dtype
        assert max((a - b).abs().max().item() for a, b in zip(grads_a, grads_b)) < 1e-6 * scale
        assert max(abs(a - b) for a, b in zip(logp_a, logp_b)) < 1e-12
    assert sum(b.num_tokens for b in packed) < 0.8 * sum(b.num_tokens for b in plain)
    assert all(b.packed.input_ids.shape[0] < b.input_ids.shape[0] for b in packed[:1])
    if not routing_replay:  # the first micro-batch: group 0 and its relabelled sample in one row, group 1
        assert packed[0].packed.input_ids.shape[0] == 2 and packed[0].packed.prefix_lens[0].tolist() == [20] * 4 + [17]
    # a micro-batch goes to the trainer's device whole (`train.device`), packed rows and routes too;
    # one already there keeps its tensors (no copy)
    import dataclasses

    def tensors(obj):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, torch.Tensor):
                yield v
            elif dataclasses.is_dataclass(v):
                yield from tensors(v)

    moved = packed[0].to("meta")
    assert len(list(tensors(moved))) == len(list(tensors(packed[0]))) >= 10 + 2 * routing_replay
    assert all(t.device.type == "meta" for t in tensors(moved)) and moved.weight == packed[0].weight
    assert all(a is b for a, b in zip(tensors(packed[0].to("cpu")), tensors(packed[0])))


def _data_parallel_rank(rank: int, world: int, groups: list, out: str) -> dict:
    """One of `world` data-parallel trainers (in `spawn`'s process group) taking two RL steps."""
    import torch.distributed as dist

    from rlfoundry.rl.workers import TrainerWorker

    cfg = load_rl_config(None, ["algorithm.micro_batch_size=8", "train.lr=1e-3", "train.final_lr=1e-3",
                                f"num_trainers={world}"])
    worker = TrainerWorker(cfg, out)
    worker.rank, worker.world, worker.trainer.replicated = rank, world, world > 1  # what join_group sets
    metrics = [worker.train(groups) for _ in range(2)]
    digests: list = [None] * world
    dist.all_gather_object(digests, worker.weights_digest())
    return {"metrics": metrics, "digests": digests,
            "state": {k: v.clone() for k, v in worker.model.state_dict().items()}}


@pytest.mark.parametrize("world,n_groups,n", [(2, 5, 6), (3, 1, 2)], ids=["2-trainers", "3-trainers-2-samples"])
def test_data_parallel_trainers_take_one_trainers_steps(tmp_path, world, n_groups, n):
    """num_trainers=2: each trainer trains on about half of a step's tokens (a group cut in two
    between them), the gradients are summed before the optimizer step: the two end with the same
    weights bit for bit, and their steps are one trainer's on all the samples — the same loss,
    gradient norm and mismatch up to float rounding, and the same weight change. The same with
    three trainers and two samples, where one trainer has nothing to train on."""
    import torch

    from rlfoundry.model import load_pretrained
    from rlfoundry.rl.workers import TrainerWorker
    from rlfoundry.train.distributed import spawn

    from rlfoundry.rl.config import DEFAULT_MODEL

    groups = _own_samples(load_pretrained(DEFAULT_MODEL), groups=n_groups, n=n)
    dp = spawn(_data_parallel_rank, world, groups, str(tmp_path / "dp"))
    assert len(set(dp["digests"])) == 1
    one = TrainerWorker(load_rl_config(None, ["algorithm.micro_batch_size=8", "train.lr=1e-3", "train.final_lr=1e-3"]),
                        str(tmp_path / "one"))
    base = {k: v.clone() for k, v in one.model.state_dict().items()}
    ones = [one.train(groups) for _ in range(2)]
    for a, b in zip(dp["metrics"], ones):
        assert a["train/samples"] == b["train/samples"] == n_groups * n
        for k in ("train/loss", "train/pg_loss", "train/logprob_mean", "train/entropy"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4)
        # (the first step's mismatch is itself fp32 rounding, ~1e-7 on average, which differs with the
        # micro-batches; the second's is mostly the first step's change to the policy)
        assert a["train/mismatch_mean"] == pytest.approx(b["train/mismatch_mean"], rel=1e-5, abs=1e-6)
        assert a["train/mismatch_max"] == pytest.approx(b["train/mismatch_max"], rel=1e-5, abs=1e-5)
    # the weight change: Adam's first steps move each weight by ~lr whatever its gradient's size, so
    # gradients at rounding level may differ in sign between the two; the change as a whole agrees
    delta_dp = torch.cat([(dp["state"][k] - base[k]).flatten() for k in base])
    delta_one = torch.cat([(v - base[k]).flatten() for k, v in one.model.state_dict().items()])
    assert delta_one.norm() > 0 and (delta_dp - delta_one).norm() / delta_one.norm() < 1e-2


def test_relabelled_samples_follow_their_groups_and_groups_go_shortest_first():
    """`_after_their_groups` puts each relabelled sample right after its group (those of groups not
    in the update at the end); `_shortest_first` then orders whole groups by their packed row's
    length (or their longest sample's), stably, keeping each group's samples together in order."""
    from rlfoundry.rl.workers import _after_their_groups, _shortest_first

    def sample(g, n, relabelled=False):
        return Sample([g] * 4, [g] * n, group_id=g, relabelled_from={"question": "q"} if relabelled else None)

    part = [(sample(g, n), float(i)) for i, (g, n) in enumerate([(0, 5), (0, 5), (1, 1), (1, 2), (2, 9), (3, 1)])]
    rel = [(sample(2, 3, True), 2.0), (sample(0, 4, True), 2.0), (sample(7, 1, True), 2.0)]
    merged = _after_their_groups(part, rel)
    assert merged == part[:2] + [rel[1]] + part[2:5] + [rel[0]] + part[5:] + [rel[2]]
    ordered = _shortest_first(merged, share_prompts=True)  # rows 4 + 1 (3), 4 + 1 (7), 4 + 3 (1), 4 + 12 (2), 4 + 14 (0)
    assert ordered == part[5:] + [rel[2]] + part[2:4] + [part[4], rel[0]] + part[:2] + [rel[1]]
    by_sample = _shortest_first(merged, share_prompts=False)  # longest samples: 5 (3), 6 (1), 5 (7), 13 (2), 9 (0)
    assert by_sample == part[5:] + [rel[2]] + part[2:4] + part[:2] + [rel[1]] + [part[4], rel[0]]


def test_shard_splits_a_step_by_tokens_into_contiguous_parts():
    from rlfoundry.rl.workers import _shard

    pairs = [(Sample([1] * 4, [2] * n), float(i)) for i, n in enumerate([1, 9, 3, 3, 6, 2, 8, 4])]
    for world in (1, 2, 3, 5):
        parts = [_shard(pairs, r, world) for r in range(world)]
        assert [p for part in parts for p in part] == pairs  # every sample once, in order
        sizes = [sum(len(s.tokens) for s, _ in part) for part in parts]
        assert max(sizes) - min(sizes) <= max(len(s.tokens) for s, _ in pairs)
    # fewer samples than trainers: some trainers get none (and still take part in the step)
    assert sorted(len(_shard(pairs[:1], r, 3)) for r in range(3)) == [0, 0, 1]


def test_trainers_join_their_group_over_the_backend_of_their_tensors(tmp_path, monkeypatch):
    """The RL trainer's model is on CPU, also where CUDA is present: its data-parallel group must be
    gloo (NCCL refuses CPU tensors), not chosen by whether the machine has a GPU."""
    import torch
    import torch.distributed as dist

    from rlfoundry.rl.workers import TrainerWorker

    worker = TrainerWorker(load_rl_config(None, ["num_trainers=2"]), str(tmp_path))
    joined = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.update(backend=backend, **kw))
    worker.join_group("127.0.0.1", 29999, 1, 2)
    assert joined["backend"] == "gloo" and joined["rank"] == 1 and joined["world_size"] == 2
    assert worker.trainer.replicated


def test_hindsight_samples_train_by_likelihood_and_stay_out_of_the_mismatch():
    """algorithm.hindsight: a relabelled sample (`relabelled_from`) in a micro-batch takes its
    ratio against the trainer's own log-probs whatever the old log-probs given (here the engines',
    which for a relabelled prompt mean nothing), so the loss's gradient is the closed form
    -(A * sum of the on-policy sample's log-probs + lambda * sum of the relabelled one's) / tokens;
    and the train-inference mismatch is measured on the on-policy sample alone."""
    from rlfoundry.model import load_pretrained
    from rlfoundry.rl.policy import make_batches, policy_loss, sequence_logprobs
    from rlfoundry.rollout.engine import Engine, SamplingParams

    cfg = load_rl_config(None, ["algorithm.hindsight=0.7"])
    model = load_pretrained(cfg.model)
    prompt = [5, 9, 13, 17, 21, 25]
    outs = Engine(model, max_batch=8).generate(
        [prompt], SamplingParams(temperature=0.8, max_new_tokens=8, n=2, seed=0, ignore_eos=True))[0]
    on = Sample(prompt, outs[0].output_ids, outs[0].logprobs)
    relabelled = Sample([5, 9, 14, 17], outs[1].output_ids, [-7.0] * 8, relabelled_from={"question": "q", "label": "1"})
    A, lam = -1.3, cfg.algorithm.hindsight
    for share in (False, True):
        batch = make_batches([on, relabelled], [A, lam], 8, "token-mean", share_prompts=share)[0]
        assert batch.relabelled.tolist() == [False, True]
        batch.old_logprobs, batch.old_from_engine = batch.engine_logprobs[:, 1:], False
        model.zero_grad(set_to_none=True)
        loss, m = policy_loss(model, batch, cfg.algorithm, 0.8)
        loss.backward()
        got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        assert m["_n/mismatch_mean"] == 8 and m["mismatch_max"] < 1e-5  # the on-policy sample's 8 tokens only

        model.zero_grad(set_to_none=True)
        logp = sequence_logprobs(model, batch, 0.8)[0]
        mask = batch.response_mask[:, 1:].float()
        (-(A * (logp[0] * mask[0]).sum() + lam * (logp[1] * mask[1]).sum()) / mask.sum()).backward()
        want = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        scale = max(w.abs().max().item() for w in want)
        assert len(got) == len(want) and max((g - w).abs().max().item() for g, w in zip(got, want)) < 1e-5 * scale


def test_hindsight_relabels_a_groups_wrong_answers_into_its_first_update(tmp_path):
    """TrainerWorker with algorithm.hindsight: the trained groups' wrong Countdown answers come back
    as right answers to the problems they solve — the prompt's question replaced, the response
    token for token, at most hindsight_per_group distinct problems a group, none held out — and
    join the step's samples."""
    from rlfoundry.data.tasks import Countdown
    from rlfoundry.data.tasks.base import is_held_out
    from rlfoundry.rl.workers import TrainerWorker

    worker = TrainerWorker(load_rl_config(None, ["algorithm.hindsight=0.5", "algorithm.hindsight_per_group=2"]),
                           str(tmp_path))
    tok = worker.tokenizer
    for a in range(2, 13):  # numbers with a wrong answer whose relabelled problem is held out
        nums, target = [a, 3, 2], a * 3 * 2
        held = next((e for e in (f"{a} + 3", f"{a} - 2", f"{a} + 3 + 2", f"{a} * 3 - 2", f"{a} * 2 + 3")
                     if is_held_out(Countdown.question(nums, eval(e)))), None)
        if held:
            break
    assert held is not None
    question = Countdown.question(nums, target)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                tokenize=False), add_special_tokens=False)
    meta = {"task": "countdown", "level": 2, "numbers": nums, "target": target, "question": question}
    texts = [f"<answer>{a} * 3 * 2</answer>",   # right
             f"<answer>{held}</answer>",         # wrong, but its problem is held out
             f"<answer>{a} * 3</answer>",        # wrong: relabelled
             f"<answer>3 * {a}</answer>",        # the same problem again
             f"<answer>{a} * 2 * 2</answer>",    # uses a 2 it was not given twice
             f"<answer>{a} * 3 + 2</answer>",    # wrong: relabelled
             f"<answer>{a} + 2</answer>"]        # a third problem: over hindsight_per_group
    group = [Sample(prompt, tok.encode(t, add_special_tokens=False), [-1.0] * len(tok.encode(t, add_special_tokens=False)),
                    reward=float(i == 0), status=Status.COMPLETED, group_id=7, index=i, metadata=meta, text=t)
             for i, t in enumerate(texts)]
    for s in group:
        s.loss_mask = [1] * len(s.response_ids)
    out = worker._hindsight([group])
    assert [s.text for s in out] == [texts[2], texts[5]]
    for s, value in zip(out, (a * 3, a * 3 + 2)):
        want = question.replace(f"make {target}.", f"make {value}.")
        assert s.metadata["question"] == want and s.metadata["target"] == value
        assert s.relabelled_from == {"question": question, "label": None}
        assert tok.decode(s.prompt_ids) == tok.decode(prompt).replace(question, want)
        assert s.response_ids == group[texts.index(s.text)].response_ids and s.reward == 1.0
    m = worker.train([[s.to_dict() for s in group]])
    assert m["train/hindsight_samples"] == 2 and m["train/samples"] == len(texts)


def shout(response: str, metadata: dict) -> dict | None:
    """A relabel function for the test below: any answer answers the question asked louder."""
    return {**metadata, "question": metadata["question"].upper()} if response else None


def test_a_custom_relabel_function_by_dotted_path(tmp_path):
    """algorithm.hindsight_fn: the function given by dotted path relabels in place of the built-in
    tasks' (here for samples of no built-in task); its question replaces the prompt's."""
    from rlfoundry.rl.workers import TrainerWorker

    worker = TrainerWorker(load_rl_config(None, ["algorithm.hindsight=1", "algorithm.hindsight_fn=test_rl_trainer.shout"]),
                           str(tmp_path))
    tok = worker.tokenizer
    prompt = tok.encode("say: make it so", add_special_tokens=False)
    group = [Sample(prompt, [7, 8], [-1.0, -1.0], reward=float(i), status=Status.COMPLETED, text=t,
                    metadata={"question": "make it so"}) for i, t in enumerate(["a", "b"])]
    out = worker._hindsight([group])
    assert len(out) == 1 and out[0].text == "a" and tok.decode(out[0].prompt_ids) == "say: MAKE IT SO"
    assert out[0].relabelled_from == {"question": "make it so", "label": None} and out[0].response_ids == [7, 8]
