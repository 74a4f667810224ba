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
    assert b.counts()["groups_filtered_by_reason"] == {"zero variance": 1}
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


def test_sample_stats_read_in_sql_equal_the_samples_own(tmp_path):
    """A step's statistics come from SQLite's JSON functions, not from the samples decoded in
    Python: the same rewards, statuses, `Sample.correct` (the "correct" component, else a positive
    reward) and response lengths, in the groups' order, for the states asked."""
    b = Buffer(tmp_path / "buffer.sqlite", seed=0)
    (g1, _), (g2, _), (g3, _) = b.draw(0, "main", dataset_len=10, n=3)
    mixed = [Sample([1, 2], [3, 4, 5], [-0.1] * 3, reward=0.5, rewards={"correct": 0.0, "format": 0.5},
                    status=Status.TRUNCATED, group_id=g1, index=0),
             Sample([1, 2], [3], [-0.1], reward=2.0, rewards={}, status=Status.COMPLETED, group_id=g1, index=1),
             Sample([1, 2], [], [], reward=None, status=Status.FAILED, group_id=g1, index=2)]
    b.put(g1, mixed)
    b.put(g2, group(g2, [1.0, 1.0]), filtered="zero_variance")
    b.put(g3, group(g3, [0.0, 1.0]))
    b.mark_trained(0, train_step=1)
    for states in (("generated", "filtered", "trained"), ("filtered",), ("generated",)):
        want = [(s.reward, s.status.value, s.correct, len(s.response_ids)) for g in b.groups(0, states) for s in g]
        assert b.sample_stats(0, states) == want
    assert [c for _, _, c, _ in b.sample_stats(0, ("trained", "filtered"))] == [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    want = b.sample_stats(0, ("trained", "filtered"))

    class NoJSON:  # an SQLite built without its JSON functions
        def __init__(self, db):
            self.db = db

        def execute(self, sql, *args):
            if "json_" in sql:
                raise sqlite3.OperationalError("no such function: json_extract")
            return self.db.execute(sql, *args)

    b.db = NoJSON(b.db)
    assert b.sample_stats(0, ("trained", "filtered")) == want  # the samples decoded instead


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


def test_pass_rate_aware_draws_skip_prompts_whose_latest_group_was_uniform(tmp_path):
    """skip_solved / skip_unsolved pass over prompts whose latest group was all correct / all wrong
    (judged by the latest group only), deterministically; after dataset_len skips in a row the next
    prompt is served whatever its record, so a draw always completes."""
    def run(path, skip):
        b = Buffer(path, seed=3)
        first = b.draw(0, "s", dataset_len=10, n=10)
        outcome = {}
        for k, (gid, idx) in enumerate(first):  # 3 solved, 3 unsolved, 4 mixed
            rewards = [1.0, 1.0] if k < 3 else [0.0, 0.0] if k < 6 else [1.0, 0.0]
            outcome[idx] = "solved" if k < 3 else "unsolved" if k < 6 else "mixed"
            b.put(gid, group(gid, rewards))
        return b, outcome, [idx for _, idx in b.draw(1, "s", 10, 4, *skip)]

    b, outcome, served = run(tmp_path / "a.sqlite", (1.0, 1.0))
    assert sorted(outcome[i] for i in served) == ["mixed"] * 4
    order = b._order("s", 1, 10)  # epoch 1's order: everything before its last mixed prompt was skipped
    skipped = order.index(served[-1]) + 1 - 4
    assert b.skipped(1) == skipped > 0 and b.skipped(0) == 0 and b.counts()["prompts_skipped"] == skipped
    assert run(tmp_path / "b.sqlite", (1.0, 1.0))[2] == served  # a function of seed and stored results
    _, outcome, served = run(tmp_path / "c.sqlite", (1.0, 0.0))  # only the solved ones are passed over
    assert "solved" not in {outcome[i] for i in served} and len(served) == 4
    _, _, plain = run(tmp_path / "d.sqlite", (0.0, 0.0))  # off: the plain epoch order
    assert plain == order[:4]
    # a mixed prompt's next group decides its next draw: the latest record, not the history
    gid, idx = b.draw(2, "s", 10, 1, 1.0, 1.0)[0]
    assert outcome[idx] == "mixed"
    b.put(gid, group(gid, [1.0, 1.0]))
    rest = []
    for step in range(3, 12):
        rest += [i for _, i in b.draw(step, "s", 10, 1, 1.0, 1.0)]
    assert idx not in rest[:3]  # the other 3 mixed prompts first (epoch 2 continues from the cursor)
    # every prompt uniform: each draw serves anyway after 10 skips in a row
    b2 = Buffer(tmp_path / "e.sqlite", seed=0)
    for gid, _ in b2.draw(0, "s", 5, 5):
        b2.put(gid, group(gid, [1.0, 1.0]))
    assert len(b2.draw(1, "s", 5, 3, 1.0, 1.0)) == 3


def test_buffer_files_of_earlier_versions_gain_the_latest_group_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE prompts (stage TEXT NOT NULL, idx INTEGER NOT NULL, served INTEGER NOT NULL "
                     "DEFAULT 0, samples INTEGER NOT NULL DEFAULT 0, passed REAL NOT NULL DEFAULT 0, "
                     "PRIMARY KEY (stage, idx)); INSERT INTO prompts VALUES ('s', 0, 1, 2, 1);")
    db.close()
    b = Buffer(path)
    assert b.pass_rate("s", 0) == 0.5
    assert b.db.execute("SELECT last_samples, last_passed FROM prompts").fetchall() == [(0, 0.0)]
    assert len(b.draw(0, "s", 3, 3, 1.0, 1.0)) == 3


def test_oversampled_draws_follow_the_recent_fraction_kept(tmp_path):
    """algorithm.oversample: each draw of a step is the groups missing over the last 4 steps'
    fraction kept (at most 4x); every kept group is trained; without refills the one draw is the
    oversampled one."""
    from rlfoundry.rl.config import load_rl_config
    from rlfoundry.rl.workers import BufferWorker

    def worker(path, *extra):
        cfg = load_rl_config(None, ["data.curriculum=[{source: 'task:countdown:2', steps: 0}]", "data.n_per_level=200",
                                    "rollout.prompts_per_step=6", "algorithm.oversample=true", *extra])
        return BufferWorker(cfg, str(path))

    def store(w, reqs, n_kept):  # the first n_kept groups get a reward signal, the rest none
        w.buffer.put_many([(r["group_id"], group(r["group_id"], [1.0, 0.0] if k < n_kept else [0.0, 0.0]),
                            None if k < n_kept else "zero_variance") for k, r in enumerate(reqs)])

    w = worker(tmp_path / "a", "algorithm.refill_rounds=2")
    sizes = []
    for step, kept in ((0, (2, 3, 1)), (1, (9,)), (2, (2, 0, 0))):
        for n in kept:
            reqs = w.requests(step, step)
            sizes.append(len(reqs))
            store(w, reqs, n)
    assert sizes == [6, 4, 1,   # step 0: nothing to go by, so the missing ones: 6, then 4, then 1
                     11,        # step 1: 11 drawn, 6 kept at step 0 -> 6 * 11 / 6
                     9, 6, 6]   # step 2: 22 drawn, 15 kept -> 6 * 22 / 15 = 8.8, then 4 * 22 / 15 = 5.9 twice
    assert len(w.training_groups(1)) == 9  # more than 6 kept: all of them trained
    assert w.requests(2, 2) == []  # 2 extra rounds done, 2 groups kept: trained as they are
    for n_kept, expected in ((3, 12), (1, 24)):  # no refills: the one draw, capped at 4x
        plain = worker(tmp_path / f"plain{n_kept}", "algorithm.refill_rounds=0")
        store(plain, plain.requests(0, 0), n_kept)
        assert plain.requests(0, 0) == [] and len(plain.requests(1, 1)) == expected
    # algorithm.oversample_margin: each draw that many times the prediction
    m = worker(tmp_path / "margin", "algorithm.refill_rounds=1", "algorithm.oversample_margin=1.5")
    first = m.requests(0, 0)
    store(m, first, 3)
    second = m.requests(0, 0)
    store(m, second, 2)
    assert len(first) == 9 and len(second) == 5  # nothing to go by at step 0: 6 * 1.5, then 3 * 1.5
    assert len(m.requests(1, 1)) == 26  # 14 drawn, 5 kept: 6 * 14 / 5 * 1.5 = 25.2
