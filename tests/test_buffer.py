"""The SQLite buffer: prompt order, group life cycle, statistics, rollback on resume, datasets."""

import json
import sqlite3

import pytest

from rlfoundry.buffer import Buffer, PromptDataset
from rlfoundry.data.datasets import DataError
from rlfoundry.rl.sample import Sample, Status


def group(gid, rewards):
    return [Sample([1, 2], [3, 4], [-0.1, -0.2], reward=r, rewards={"correct": r}, status=Status.COMPLETED,
                   group_id=gid, index=i) for i, r in enumerate(rewards)]


def test_life_cycle_counts_and_persistence(tmp_path):
    db = tmp_path / "buffer.sqlite"
    b = Buffer(db, seed=1)
    assert b.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    drawn = b.draw(0, "main", dataset_len=5, n=3)
    assert len({i for _, i in drawn}) == 3
    b.put(drawn[0][0], group(drawn[0][0], [1.0, 0.0]))
    b.put(drawn[1][0], group(drawn[1][0], [1.0, 1.0]), filtered="zero variance")
    assert b.pending(0) == [drawn[2]]
    with pytest.raises(ValueError, match="already generated"):
        b.put(drawn[0][0], group(drawn[0][0], [1.0]))
    assert b.counts()["samples_generated"] == 4 and b.counts()["samples_filtered"] == 2
    assert b.pass_rate("main", drawn[0][1]) == 0.5
    b.close()
    # reopened (as after a kill): the same state; the cursor continues the same epoch order
    b = Buffer(db, seed=1)
    got = b.groups(0)
    assert len(got) == 1 and got[0][0].logprobs == [-0.1, -0.2] and got[0][1].reward == 0.0
    more = b.draw(1, "main", 5, 4)  # 2 left of epoch 0, then epoch 1 starts
    assert {i for _, i in drawn} | {i for _, i in more[:2]} == set(range(5))
    b.put(drawn[2][0], group(drawn[2][0], [0.0, 0.0]))
    assert b.mark_trained(0, train_step=1) == 2
    c = b.counts()
    assert (c["samples_trained"], c["samples_pending"], c["groups_pending"], c["prompts_served"]) == (4, 0, 4, 7)
    # resume from a checkpoint at step 0: the groups trained at step 1 are to be trained again
    assert b.rollback(0) == 2
    assert b.counts()["samples_trained"] == 0 and len(b.groups(0)) == 2


def test_refill_draws_are_counted_per_rollout(tmp_path):
    """Dynamic-sampling refills draw more prompts for the same rollout: the buffer counts the draws
    and the groups per state, which decide (persistently) whether another refill is due."""
    b = Buffer(tmp_path / "buffer.sqlite", seed=0)
    first = b.draw(3, "main", dataset_len=50, n=4)
    b.put_many([(gid, group(gid, [1.0, 0.0] if k < 2 else [1.0, 1.0]), None if k < 2 else "zero_variance")
                for k, (gid, _) in enumerate(first)])
    assert b.draws(3) == 1 and b.draws(4) == 0
    assert b.count_groups(3, ("generated", "trained")) == 2 and b.count_groups(3, ("filtered",)) == 2
    refill = b.draw(3, "main", 50, 2)  # the two filtered ones replaced by new prompts
    assert b.draws(3) == 2 and not {i for _, i in refill} & {i for _, i in first}
    assert b.pending(3) == refill and b.count_groups(3, ("generated", "trained")) == 2
    b.close()
    assert Buffer(tmp_path / "buffer.sqlite").draws(3) == 2


def test_same_seed_same_prompt_order(tmp_path):
    a = [i for _, i in Buffer(tmp_path / "a.sqlite", seed=7).draw(0, "s", 100, 10)]
    b = [i for _, i in Buffer(tmp_path / "b.sqlite", seed=7).draw(0, "s", 100, 10)]
    c = [i for _, i in Buffer(tmp_path / "c.sqlite", seed=8).draw(0, "s", 100, 10)]
    assert a == b and a != c


def test_prompt_datasets(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2", "metadata": {"k": 1}}) + "\n" +
                    json.dumps({"question": [{"role": "user", "content": "hi"}], "answer": "x"}) + "\n")
    ds = PromptDataset.load(str(path), prompt_key="question", label_key="answer")
    assert len(ds) == 2 and ds[0].label == "2" and ds[0].metadata == {"k": 1} and isinstance(ds[1].prompt, list)
    path.write_text(json.dumps({"prompt": ""}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:1: field 'prompt'"):
        PromptDataset.load(str(path))
    t = PromptDataset.load("task:countdown:2,3", n_per_level=5)
    assert len(t) == 10 and {r.metadata["level"] for r in t.records} == {2, 3}


def test_a_crash_inside_a_transaction_leaves_nothing_half_written(tmp_path):
    b = Buffer(tmp_path / "b.sqlite")
    gid = b.draw(0, "s", 3, 1)[0][0]
    bad = group(gid, [1.0])
    bad.append(object())  # not a Sample: fails mid-way
    with pytest.raises(AttributeError):
        b.put(gid, bad)
    assert b.db.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 0
    assert b.pending(0) == [(gid, b.pending(0)[0][1])]
    assert isinstance(b.db, sqlite3.Connection)


def test_rl_task_prompts_are_not_the_pretraining_sft_or_held_out_problems(tmp_path):
    """task:... RL prompts come from their own seed range: other draws than the problems whose
    worked solutions `rlfoundry pretrain` (seed 0) and `sft` (seed 1) trained the model on, and
    never a held-out question (the held-out sets hold nothing else)."""
    from rlfoundry.data.tasks import get_task
    from rlfoundry.data.tasks.base import is_held_out
    from rlfoundry.rl.config import load_rl_config
    from rlfoundry.rl.workers import BufferWorker

    cfg = load_rl_config(None, ["data.curriculum=[{source: 'task:countdown:2', steps: 0}]", "data.n_per_level=200"])
    worker = BufferWorker(cfg, str(tmp_path))
    rl = [worker.stages[0][i].metadata["question"] for i in range(200)]
    held_out = [r["metadata"]["question"] for r in worker.eval_requests()["task:countdown:2"]]
    task = get_task("countdown")
    for seed in (0, 1):  # pre-training, SFT
        trained = {p.question for p in task.problems(3000, 2, seed=seed)}
        assert sum(q in trained for q in rl) <= 60  # chance repeats only (level 2 is a small space: ~15%)
        assert not trained & set(held_out)
    assert not set(rl) & set(held_out)
    assert all(is_held_out(q) for q in held_out) and not any(is_held_out(q) for q in rl)
