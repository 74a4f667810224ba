"""Reading training records from JSONL, Parquet or a Hugging Face `datasets` directory, validated.

A record is a dict. `read_records(path, schema)` yields the records that fit the schema; a bad row
raises `DataError` naming the file and line (row for Parquet / datasets), or, with `skip_bad=True`,
is skipped and counted in the returned `DataStats`.

Schemas: "text" (a string under `text_key`), "messages" (a list of {role, content} under
`messages_key`), "prompt" (slime's {"prompt": str or messages, "label": ..., "metadata": {...}}).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


class DataError(ValueError):
    """A data file or row is unusable; the message names the file and the line or row."""


@dataclass
class DataStats:
    read: int = 0
    skipped: int = 0
    reasons: dict = field(default_factory=dict)


ROLES = {"system", "user", "assistant", "observation", "tool"}


def _check(record, schema: str, text_key: str, messages_key: str, prompt_key: str = "prompt") -> str | None:
    """Why the record does not fit the schema, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if schema == "text":
        if not isinstance(record.get(text_key), str) or not record[text_key]:
            return f"field '{text_key}' must be a non-empty string"
    elif schema == "messages":
        msgs = record.get(messages_key)
        if not isinstance(msgs, list) or not msgs:
            return f"field '{messages_key}' must be a non-empty list of messages"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return f"field '{messages_key}[{i}]' must be {{role: one of {sorted(ROLES)}, content: string}}"
        if not any(m["role"] == "assistant" for m in msgs):
            return f"field '{messages_key}' has no assistant message to train on"
    elif schema == "prompt":
        p = record.get(prompt_key)
        if not (isinstance(p, str) and p) and not (isinstance(p, list) and p and all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in p)):
            return f"field '{prompt_key}' must be a non-empty string or a list of {{role, content}} messages"
        if "metadata" in record and not isinstance(record["metadata"], dict):
            return "field 'metadata' must be an object"
    else:
        raise ValueError(f"unknown schema {schema!r}")
    return None


def _rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for every row of a file or dataset directory."""
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise DataError(f"{path}: a directory needs the `datasets` package (pip install datasets)") from None
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: not a Hugging Face datasets directory ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        for i, row in enumerate(ds):
            yield f"{path}: row {i}", row
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}: row {i}", row
    elif path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{lineno}", DataError(f"invalid JSON ({e.msg})")
    else:
        raise DataError(f"{path}: unknown format (use .jsonl, .parquet or a datasets directory)")


def read_records(path: str | Path, schema: str, text_key: str = "text", messages_key: str = "messages",
                 skip_bad: bool = False, stats: DataStats | None = None, prompt_key: str = "prompt") -> Iterator[dict]:
    stats = stats if stats is not None else DataStats()
    for where, record in _rows(Path(path)):
        why = str(record) if isinstance(record, DataError) else _check(record, schema, text_key, messages_key,
                                                                         prompt_key)
        if why is None:
            stats.read += 1
            yield record
        elif skip_bad:
            stats.skipped += 1
            stats.reasons[why] = stats.reasons.get(why, 0) + 1
        else:
            raise DataError(f"{where}: {why}")
