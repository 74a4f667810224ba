"""Async (disaggregated) mode: rollouts generated ahead of the trainer within the staleness bound,
off-policy samples corrected by truncated importance sampling against the engines' log-probs,
the train-inference mismatch measured on the on-policy samples only, and the loop end to end with
a resume."""

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from rlfoundry.cli import main
from rlfoundry.rl.config import load_rl_config
from rlfoundry.rl.sample import Sample, Status
from rlfoundry.train.stages import ConfigError

from test_rl_loop import SMALL, _kill_after_two_lines, _run, lines, no_times


def test_async_configs_are_checked_before_anything_starts():
    load_rl_config(None, ["mode=async", "algorithm.tis_cap=2"])
    for overrides, field in {("mode=async",): "field 'algorithm.tis_cap'",
                             ("mode=async", "algorithm.tis_cap=2", "max_staleness=0"): "field 'max_staleness'",
                             ("mode=async", "algorithm.tis_cap=2", "deterministic=true"): "field 'mode'.*deterministic",
                             ("mode=async", "algorithm.tis_cap=2", "debug=rollout_only"): "field 'mode'.*debug",
                             ("mode=fast",): "field 'mode' must be sync or async"}.items():
        with pytest.raises(ConfigError, match=field):
            load_rl_config(None, list(overrides))


def test_rollouts_ahead_keep_within_the_staleness_bound():
    """The generating thread starts rollout r once rollout r - max_staleness is trained, requests
    under the engines' version as last set, hands results over in order, stops between rollouts on
    close, and passes a failure on to whoever waits."""
    from rlfoundry.rl.loop import _RolloutsAhead

    started, lock = [], threading.Lock()

    def generate(step, version_now, stopping):
        with lock:
            started.append((step, version_now()))
        time.sleep(0.01)
        return {"step": step}

    def settle():
        time.sleep(0.2)
        with lock:
            return list(started)

    ahead = _RolloutsAhead(generate, 0, max_staleness=2)
    assert ahead.result(0) == {"step": 0}
    assert settle() == [(0, 0), (1, 0), (2, 0)]  # two ahead of the trainer, which has trained none
    ahead.trained(1)
    assert ahead.result(1) == {"step": 1} and settle() == [(0, 0), (1, 0), (2, 0), (3, 1)]
    ahead.close()
    assert not ahead._thread.is_alive()

    def failing(step, version_now, stopping):
        raise OSError("engine gone")

    ahead = _RolloutsAhead(failing, 5, max_staleness=1)
    with pytest.raises(RuntimeError, match="rollout 5.*engine gone"):
        ahead.result(5)
    ahead.close()


def _groups(engine, version: int, first_group: int, seed: int) -> list[list[dict]]:
    from rlfoundry.rollout.engine import SamplingParams

    prompts = [[3 + g, 7, 11 + g, 5] for g in range(4)]
    outs = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=10, n=4, seed=seed, ignore_eos=True))
    return [[Sample(p, o.output_ids, o.logprobs, reward=float(i % 2 == g % 2), group_id=first_group + g, index=i,
                    status=Status.COMPLETED, policy_version=version).to_dict() for i, o in enumerate(os_)]
            for g, (p, os_) in enumerate(zip(prompts, outs))]


def test_an_async_step_corrects_stale_samples_by_truncated_importance_sampling(tmp_path):
    """A batch-invariant trainer at version 1 given samples of version 1 (the engine updated to its
    weights) and of version 0: the mismatch is measured on the version-1 samples alone (0 bit for
    bit, where the stale ones differ), the stale samples' mean log-ratio is logged, and the policy
    loss is GRPO's with each token weighted by min(pi_trainer / pi_engine, cap) — at ratio 1 (one
    update a rollout), the loss of the step is -mean over tokens of A * that weight."""
    from rlfoundry.model import load_pretrained
    from rlfoundry.rl.algorithms import group_advantages
    from rlfoundry.rl.policy import make_batches, sequence_logprobs
    from rlfoundry.rl.workers import TrainerWorker
    from rlfoundry.rollout.engine import Engine

    cap = 1.02
    cfg = load_rl_config(None, ["mode=async", f"algorithm.tis_cap={cap}", "batch_invariant=true",
                                "algorithm.micro_batch_size=8", "train.lr=3e-2", "train.final_lr=3e-2"])
    worker = TrainerWorker(cfg, str(tmp_path))
    engine = Engine(load_pretrained(cfg.model), max_batch=64, batch_invariant=True)
    first = worker.train(_groups(engine, 0, 0, seed=0), None, 0)  # version 0 on version 0: on-policy
    assert first["train/staleness_max"] == 0 and first["train/mismatch_max"] == 0.0
    assert "train/offpolicy_logratio_mean" not in first
    stale = _groups(engine, 0, 10, seed=1)  # sampled before the update, trained after it
    engine.update_weights(worker.model.state_dict())
    fresh = _groups(engine, 1, 20, seed=2)
    groups = stale + fresh

    samples, advs = [], []
    for g in groups:
        samples += [Sample(**s) for s in g]
        advs += group_advantages(torch.tensor([[s["reward"] for s in g]]), "grpo")[0].tolist()
    with torch.no_grad():
        batch = make_batches(samples, advs, len(samples), "token-mean", version=1)[0]
        logp, _ = sequence_logprobs(worker.policy, batch, 1.0)
    mask = batch.response_mask[:, 1:].float()
    engine_lp = batch.engine_logprobs[:, 1:]
    ratio = torch.exp(logp - engine_lp)
    on = ~batch.stale
    assert batch.stale.tolist() == [True] * 16 + [False] * 16
    assert torch.equal((logp - engine_lp)[on] * mask[on], torch.zeros_like(mask[on]))  # bit for bit
    assert ((logp - engine_lp).abs() * mask)[~on].max() > 1e-3  # the update moved the stale ones
    expected_loss = float((-batch.advantages[:, None] * ratio.clamp(max=cap) * mask).sum() / mask.sum())
    expected_lag = float(((logp - engine_lp) * mask)[~on].sum() / mask[~on].sum())

    m = worker.train(groups, None, 1)
    assert m["train/staleness_mean"] == 0.5 and m["train/staleness_max"] == 1 and m["train/stale_frac"] == 0.5
    assert m["train/mismatch_max"] == 0.0 and m["train/mismatch_mean"] == 0.0
    assert m["train/offpolicy_logratio_mean"] == pytest.approx(expected_lag, rel=1e-5)
    assert m["train/pg_loss"] == pytest.approx(expected_loss, rel=1e-5, abs=1e-7)
    assert (ratio > cap).any()  # the cap was in play


def test_stale_groups_are_filtered_not_trained(tmp_path):
    from rlfoundry.rl.workers import BufferWorker

    cfg = load_rl_config(None, ["mode=async", "algorithm.tis_cap=2", "rollout.prompts_per_step=3",
                                "rollout.n_samples_per_prompt=2"])
    bw = BufferWorker(cfg, str(tmp_path))
    reqs = bw.requests(4, 2)
    groups = [[Sample(r["prompt_ids"], [5, 6], [-0.1, -0.2], reward=float(i), status=Status.COMPLETED,
                      group_id=r["group_id"], index=i, policy_version=v).to_dict() for i in range(2)]
              for r, v in zip(reqs, (2, 3, 1))]
    bw.put(groups)
    kept = bw.training_groups(4, min_version=2)
    assert [g[0]["group_id"] for g in kept] == [reqs[0]["group_id"], reqs[1]["group_id"]]
    assert bw.step_stats(4)["groups_filtered"] == 1 and bw.counts()["samples_filtered"] == 2
    assert bw.counts()["groups_filtered_by_reason"] == {"stale": 1}
    assert len(bw.training_groups(4)) == 2  # and it stays out


def test_async_mode_end_to_end_killed_and_resumed(tmp_path, capsys):
    """The loop in async mode: each rollout generated while the previous one trains (requested
    under the weights one version back), every trained sample within max_staleness of the step
    that trains it, the cores shared out among engines and trainers computing at once; killed with
    SIGKILL mid-run (a rollout ahead half generated, perhaps) and resumed, it logs every step once
    and its buffer accounts for every sample, none trained twice."""
    from rlfoundry.buffer import Buffer
    from rlfoundry.rollout.launch import threads_each

    out = tmp_path / "run"
    common = [*SMALL, "mode=async", "algorithm.tis_cap=2", "max_staleness=1", "eval_every=0", "checkpoint_every=1",
              "steps=8"]
    _kill_after_two_lines(_run(out, common), out)  # SIGKILL to the driver, Ray, the engines
    assert 2 <= len(lines(out)) < 8
    assert main(["rl", "--out", str(out), "--resume", *common]) == 0
    ms = lines(out)
    assert [m["step"] for m in ms] == list(range(1, 9))
    trained = [m for m in ms if "train/staleness_max" in m]
    assert trained and all(m["train/staleness_max"] <= 1 for m in trained)
    assert any(m["train/stale_frac"] > 0 for m in trained)  # generated ahead, under the previous weights
    assert all("time/rollout_wait_s" in m for m in ms)
    # a step's kept groups are those it trained (groups filtered as stale count as filtered)
    assert all(m.get("train/samples", 0) == 4 * m["groups_kept"] for m in ms), \
        [(m.get("train/samples"), m["groups_kept"]) for m in ms]
    engines = json.loads((out / "engines.json").read_text())
    assert [e["torch_threads"] for e in engines] == [threads_each(2)]  # one engine beside one trainer
    buf = Buffer(out / "buffer.sqlite")
    for rollout in range(8):
        for g in buf.groups(rollout, ("trained",)):
            assert all(rollout - 1 <= s.policy_version <= rollout for s in g), (rollout, [s.policy_version for s in g])
            assert all(s.policy_version <= s.last_policy_version <= rollout for s in g)  # partial rollouts: <
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["samples_trained"] == sum(m.get("train/samples", 0) for m in ms)
    assert c["samples_generated"] == c["samples_trained"] + c["samples_filtered"] + c["samples_pending"]
    assert (Path(out) / "hf" / "model.safetensors").exists()
    # killed after a checkpoint but before its step's line was written: the resumed run writes it
    # from the checkpoint (here: the last line removed by hand, and nothing left to run)
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in ms[:-1]))
    assert main(["rl", "--out", str(out), "--resume", *common]) == 0
    assert no_times(lines(out)) == no_times(ms)
