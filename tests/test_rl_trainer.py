"""The trainer workshop's RL step (TrainerWorker without Ray) on samples the model generated itself."""

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
