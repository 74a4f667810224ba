"""The data buffer: prompt datasets, groups of samples, per-prompt statistics — persisted in one
SQLite file (WAL mode, synchronous commits) in the run directory.

Life of a group (the n samples of one prompt), keyed by the rollout step that asked for it:

    pending  --put-->  generated  --mark_trained-->  trained
                        |  filtered (kept, never trained: e.g. all rewards equal, or failed)

Every transition is one transaction, so a killed run finds the database as of its last commit.
Resuming from a trainer checkpoint at step S calls `rollback(S)`: groups trained after S go back to
`generated` (the model that learned from them was lost) and are trained again from the stored samples;
groups still `pending` are generated again. No sample is lost and none is trained twice into the
same model. The prompt order is a pure function of (seed, stage, position): a resumed run draws the
same prompts.

Prompt records use slime's format `{"prompt": str or messages, "label": ..., "metadata": {...}}`
(keys configurable), from JSONL, Parquet, a Hugging Face datasets directory, or a built-in task
(`task:countdown:2,3` — levels 2 and 3).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlfoundry.data.datasets import DataError, DataStats, read_records
from rlfoundry.rl.sample import Sample, correct_of


@dataclass
class PromptRecord:
    prompt: str | list[dict]
    label: Any = None
    metadata: dict = field(default_factory=dict)


class PromptDataset:
    """An indexable list of prompt records with a way to turn one into token ids."""

    def __init__(self, records: list[PromptRecord], name: str = "prompts"):
        if not records:
            raise DataError(f"{name}: no prompts")
        self.records, self.name = records, name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> PromptRecord:
        return self.records[i]

    @classmethod
    def load(cls, source: str, *, prompt_key: str = "prompt", label_key: str = "label",
             metadata_key: str = "metadata", n_per_level: int = 1000, seed: int = 0,
             skip_bad: bool = False, stats: DataStats | None = None, held_out: bool = False) -> "PromptDataset":
        """From a file or datasets directory, or `task:NAME[:LEVELS]` (n_per_level problems per level,
        of the task's training share of questions, or with `held_out` of its held-out share)."""
        if source.startswith("task:"):
            from rlfoundry.data.tasks import get_task

            parts = source.split(":")
            task = get_task(parts[1])
            levels = [int(x) for x in parts[2].split(",")] if len(parts) > 2 and parts[2] else \
                list(range(1, task.levels + 1))
            records = []
            for level in levels:
                for p in task.problems(n_per_level, level, seed=seed, held_out=held_out):
                    r = task.rl_record(p)
                    records.append(PromptRecord(r["prompt"], r["label"], r["metadata"] | {"question": p.question}))
            return cls(records, source)
        records = []
        for r in read_records(source, "prompt", skip_bad=skip_bad, stats=stats, prompt_key=prompt_key):
            meta = r.get(metadata_key) or {}
            if not isinstance(meta, dict):
                raise DataError(f"{source}: field '{metadata_key}' must be an object, got {type(meta).__name__}")
            records.append(PromptRecord(r[prompt_key], r.get(label_key), meta))
        return cls(records, source)

    def token_ids(self, i: int, tokenizer, apply_chat_template: bool = True) -> list[int]:
        prompt = self.records[i].prompt
        if isinstance(prompt, list) or apply_chat_template:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = prompt
        return tokenizer.encode(text, add_special_tokens=False)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS groups (
    id INTEGER PRIMARY KEY, rollout_id INTEGER NOT NULL, stage TEXT NOT NULL, prompt_idx INTEGER NOT NULL,
    state TEXT NOT NULL, train_step INTEGER, reason TEXT);
CREATE INDEX IF NOT EXISTS groups_rollout ON groups (rollout_id, state);
CREATE TABLE IF NOT EXISTS samples (
    group_id INTEGER NOT NULL, idx INTEGER NOT NULL, status TEXT NOT NULL, reward REAL, data TEXT NOT NULL,
    PRIMARY KEY (group_id, idx));
CREATE TABLE IF NOT EXISTS prompts (
    stage TEXT NOT NULL, idx INTEGER NOT NULL, served INTEGER NOT NULL DEFAULT 0,
    samples INTEGER NOT NULL DEFAULT 0, passed REAL NOT NULL DEFAULT 0,
    last_samples INTEGER NOT NULL DEFAULT 0, last_passed REAL NOT NULL DEFAULT 0, PRIMARY KEY (stage, idx));
"""


class Buffer:
    """The persistent buffer of one run (thread-safe; one writer process)."""

    def __init__(self, path: str | Path, seed: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self._lock = threading.Lock()
        self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(prompts)")}
        for name, kind in (("last_samples", "INTEGER"), ("last_passed", "REAL")):  # files of earlier versions
            if name not in columns:
                self.db.execute(f"ALTER TABLE prompts ADD COLUMN {name} {kind} NOT NULL DEFAULT 0")

    def close(self) -> None:
        self.db.close()

    def _tx(self):
        return _Transaction(self.db, self._lock)

    # ------------------------------------------------------------------ prompts
    def _order(self, stage: str, epoch: int, n: int) -> list[int]:
        g = torch.Generator().manual_seed(hash_seed(self.seed, stage, epoch))
        return torch.randperm(n, generator=g).tolist()

    def draw(self, rollout_id: int, stage: str, dataset_len: int, n: int, skip_solved: float = 0.0,
             skip_unsolved: float = 0.0) -> list[tuple[int, int]]:
        """Hand out n new prompts of `stage` for rollout `rollout_id` as pending groups:
        [(group_id, prompt_idx)], walking the stage's epoch orders from where the last draw stopped.

        Pass-rate-aware sampling: a prompt whose latest group was all correct is passed over with
        probability `skip_solved`, one whose latest group was all wrong with `skip_unsolved` (such
        groups carry no GRPO signal, and they mostly come back the same: in the demo's RL, 70% of
        all-correct groups and 87% of all-wrong ones repeat at the prompt's next draw, against 62%
        of mixed groups staying mixed). This is Kimi k1.5's prioritized sampling (Kimi Team 2025,
        'Sampling strategies': problems drawn in proportion to 1 - success rate) with two deviations: it
        judges a prompt by its latest group, not its whole history, so that a prompt the policy has
        learned (or unlearned) is treated as it is now; and it skips in both directions, since a
        tiny policy's unsolved prompts stay unsolved. A skipped prompt waits for its next epoch; after
        `dataset_len` skips in a row the next prompt is served whatever its record. The decisions are
        a pure function of (seed, stage, position) and the stored results, so a resumed run draws the
        same prompts."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (f"cursor:{stage}",)).fetchone()
            k = int(row[0]) if row else 0
            out = []
            orders: dict[int, list[int]] = {}
            skipped = in_a_row = 0
            while len(out) < n:
                epoch, i = divmod(k, dataset_len)
                if epoch not in orders:
                    orders[epoch] = self._order(stage, epoch, dataset_len)
                idx = orders[epoch][i]
                k += 1
                if (skip_solved or skip_unsolved) and in_a_row < dataset_len:
                    last = db.execute("SELECT last_samples, last_passed FROM prompts WHERE stage = ? AND idx = ?",
                                      (stage, idx)).fetchone()
                    p = 0.0 if not last or not last[0] else (
                        skip_solved if last[1] >= last[0] else skip_unsolved if last[1] == 0 else 0.0)
                    if p and hash_seed(self.seed, stage, "skip", k) / 2 ** 63 < p:
                        skipped += 1
                        in_a_row += 1
                        continue
                in_a_row = 0
                gid = db.execute("INSERT INTO groups (rollout_id, stage, prompt_idx, state) VALUES (?, ?, ?, 'pending')",
                                 (rollout_id, stage, idx)).lastrowid
                db.execute("INSERT INTO prompts (stage, idx, served) VALUES (?, ?, 1) "
                           "ON CONFLICT (stage, idx) DO UPDATE SET served = served + 1", (stage, idx))
                out.append((gid, idx))
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"cursor:{stage}", str(k)))
            _add(db, f"draws:{rollout_id}", 1)
            if skipped:
                _add(db, f"skipped:{rollout_id}", skipped)
        return out

    def draws(self, rollout_id: int) -> int:
        """How many times prompts were drawn for rollout `rollout_id` (1 + its refill rounds)."""
        return self._count(f"draws:{rollout_id}")

    def skipped(self, rollout_id: int) -> int:
        """How many prompts the draws of rollout `rollout_id` passed over (skip_solved / skip_unsolved)."""
        return self._count(f"skipped:{rollout_id}")

    def _count(self, key: str) -> int:
        """A counter of the meta table (kept by `_add`); 0 if never added to."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def count_groups(self, rollout_id: int, states: tuple[str, ...]) -> int:
        q = ",".join("?" * len(states))
        return self.db.execute(f"SELECT COUNT(*) FROM groups WHERE rollout_id = ? AND state IN ({q})",
                               (rollout_id, *states)).fetchone()[0]

    def pending(self, rollout_id: int) -> list[tuple[int, int]]:
        """Groups of `rollout_id` handed out but never stored (a run killed mid-rollout)."""
        return self.db.execute("SELECT id, prompt_idx FROM groups WHERE rollout_id = ? AND state = 'pending' "
                               "ORDER BY id", (rollout_id,)).fetchall()

    def has_rollout(self, rollout_id: int) -> bool:
        return self.db.execute("SELECT 1 FROM groups WHERE rollout_id = ? LIMIT 1", (rollout_id,)).fetchone() is not None

    # ------------------------------------------------------------------ samples
    def put(self, group_id: int, samples: list[Sample], filtered: str | None = None) -> None:
        """Store a finished group (state generated, or filtered with the reason)."""
        self.put_many([(group_id, samples, filtered)])

    def put_many(self, groups: list[tuple[int, list[Sample], str | None]]) -> None:
        """Store several finished groups in one transaction (one disk sync)."""
        with self._tx() as db:
            for group_id, samples, filtered in groups:
                row = db.execute("SELECT stage, prompt_idx, state FROM groups WHERE id = ?", (group_id,)).fetchone()
                if row is None:
                    raise KeyError(f"no group {group_id} in {self.path}")
                stage, prompt_idx, state = row
                if state != "pending":
                    raise ValueError(f"group {group_id} is already {state}")
                db.executemany("INSERT OR REPLACE INTO samples VALUES (?, ?, ?, ?, ?)",
                               [(group_id, s.index, s.status.value, s.reward, s.to_json()) for s in samples])
                db.execute("UPDATE groups SET state = ?, reason = ? WHERE id = ?",
                           ("filtered" if filtered else "generated", filtered, group_id))
                passed = sum(s.correct for s in samples)
                db.execute("UPDATE prompts SET samples = samples + ?, passed = passed + ?, last_samples = ?, "
                           "last_passed = ? WHERE stage = ? AND idx = ?",
                           (len(samples), passed, len(samples), passed, stage, prompt_idx))

    def groups(self, rollout_id: int, states: tuple[str, ...] = ("generated",)) -> list[list[Sample]]:
        """The stored groups of a rollout, in the order they were drawn."""
        return [[Sample(**d) for d in g] for g in self.group_dicts(rollout_id, states)]

    def group_dicts(self, rollout_id: int, states: tuple[str, ...] = ("generated",)) -> list[list[dict]]:
        """`groups` as the plain data they are stored as (`Sample.to_dict`'s), as actors exchange them."""
        q = ",".join("?" * len(states))
        out: dict[int, list[dict]] = {}
        for gid, data in self.db.execute(  # one read: every group, with its samples (if any) in order
                f"SELECT g.id, s.data FROM groups g LEFT JOIN samples s ON s.group_id = g.id "
                f"WHERE g.rollout_id = ? AND g.state IN ({q}) ORDER BY g.id, s.idx", (rollout_id, *states)):
            samples = out.setdefault(gid, [])
            if data is not None:
                samples.append(json.loads(data))
        return list(out.values())

    def sample_stats(self, rollout_id: int, states: tuple[str, ...]) -> list[tuple]:
        """(reward, status, correct, response length) of every stored sample of a rollout's groups
        in `states`, read by SQLite's JSON functions from the stored records: a step's statistics
        without building its samples in Python (~20 ms of each RL step for ~700 samples), `correct`
        by `Sample.correct`'s rule (`correct_of`)."""
        q = ",".join("?" * len(states))
        try:
            rows = self.db.execute(
                "SELECT s.reward, s.status, json_extract(s.data, '$.rewards.correct'), "
                "json_array_length(s.data, '$.response_ids') FROM samples s JOIN groups g ON s.group_id = g.id "
                f"WHERE g.rollout_id = ? AND g.state IN ({q}) ORDER BY g.id, s.idx", (rollout_id, *states)).fetchall()
        except sqlite3.OperationalError:  # an SQLite built without its JSON functions: decode the samples
            return [(s.reward, s.status.value, s.correct, len(s.response_ids))
                    for g in self.groups(rollout_id, states) for s in g]
        return [(reward, status, correct_of(correct, reward), length) for reward, status, correct, length in rows]

    def filter_groups(self, group_ids: list[int], reason: str) -> int:
        """Stored groups that are not to be trained after all (async mode: stale), filtered with the
        reason; returns how many."""
        with self._tx() as db:
            return sum(db.execute("UPDATE groups SET state = 'filtered', reason = ? WHERE id = ? AND "
                                  "state = 'generated'", (reason, gid)).rowcount for gid in group_ids)

    def mark_trained(self, rollout_id: int, train_step: int) -> int:
        with self._tx() as db:
            return db.execute("UPDATE groups SET state = 'trained', train_step = ? WHERE rollout_id = ? AND "
                              "state = 'generated'", (train_step, rollout_id)).rowcount

    def rollback(self, train_step: int) -> int:
        """Undo what happened after trainer step `train_step` (the checkpoint a run resumes from):
        groups trained later become `generated` again. Returns how many."""
        with self._tx() as db:
            return db.execute("UPDATE groups SET state = 'generated', train_step = NULL "
                              "WHERE state = 'trained' AND train_step > ?", (train_step,)).rowcount

    def reset_pending(self, rollout_id: int) -> None:
        """Drop the partial samples of pending groups of a rollout (they are generated again)."""
        with self._tx() as db:
            db.execute("DELETE FROM samples WHERE group_id IN (SELECT id FROM groups WHERE rollout_id = ? "
                       "AND state = 'pending')", (rollout_id,))

    # ------------------------------------------------------------------ statistics
    def pass_rate(self, stage: str, prompt_idx: int) -> float | None:
        row = self.db.execute("SELECT samples, passed FROM prompts WHERE stage = ? AND idx = ?",
                              (stage, prompt_idx)).fetchone()
        return None if not row or not row[0] else row[1] / row[0]

    def counts(self) -> dict:
        """Prompts served and samples per state, for `rlfoundry inspect`."""
        c = {"prompts_served": self.db.execute("SELECT COALESCE(SUM(served), 0) FROM prompts").fetchone()[0],
             "distinct_prompts": self.db.execute("SELECT COUNT(*) FROM prompts").fetchone()[0]}
        c["prompts_skipped"] = self.db.execute(  # passed over by skip_solved / skip_unsolved
            "SELECT COALESCE(SUM(CAST(value AS INTEGER)), 0) FROM meta WHERE key LIKE 'skipped:%'").fetchone()[0]
        by_state = dict(self.db.execute(
            "SELECT g.state, COUNT(s.idx) FROM groups g LEFT JOIN samples s ON s.group_id = g.id GROUP BY g.state"))
        pending_groups = self.db.execute("SELECT COUNT(*) FROM groups WHERE state = 'pending'").fetchone()[0]
        c["samples_generated"] = sum(by_state.get(k, 0) for k in ("generated", "trained", "filtered"))
        c["samples_trained"] = by_state.get("trained", 0)
        c["samples_filtered"] = by_state.get("filtered", 0)
        c["groups_filtered_by_reason"] = dict(self.db.execute(  # zero_variance, failed, stale (async mode)
            "SELECT COALESCE(reason, ''), COUNT(*) FROM groups WHERE state = 'filtered' GROUP BY reason"))
        c["samples_pending"] = by_state.get("generated", 0)   # stored, not trained yet
        c["groups_pending"] = pending_groups                  # handed out, not generated yet
        statuses = dict(self.db.execute("SELECT status, COUNT(*) FROM samples GROUP BY status"))
        c["by_status"] = statuses
        c["rollouts"] = self.db.execute("SELECT COUNT(DISTINCT rollout_id) FROM groups").fetchone()[0]
        return c


def _add(db: sqlite3.Connection, key: str, n: int) -> None:
    """Add n to the counter `key` of the meta table (inside the caller's transaction)."""
    db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + ?",
               (key, str(n), n))


def hash_seed(*parts) -> int:
    """A stable 63-bit seed from parts (Python's hash() is salted per process)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "little") >> 1


class _Transaction:
    def __init__(self, db: sqlite3.Connection, lock: threading.Lock):
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, *_) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()
