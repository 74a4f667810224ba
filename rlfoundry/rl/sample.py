"""`Sample`: the one record that travels from rollout to trainer (and into the buffer's database)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any


class Status(str, Enum):
    PENDING = "pending"        # not generated yet
    COMPLETED = "completed"    # stopped on an end-of-sequence / stop token
    TRUNCATED = "truncated"    # hit max_new_tokens
    ABORTED = "aborted"        # the engine aborted it (e.g. a weight update with abort)
    FAILED = "failed"          # generation or reward raised; kept for inspection, never trained


def correct_of(correct: float | None, reward: float | None) -> float:
    """`Sample.correct` from a sample's "correct" reward component (None: it has none) and its
    reward: the component, or else 1.0 for a positive reward. Reward components are numbers
    (`rlfoundry.rewards` converts them), so None means only that the component is missing."""
    return correct if correct is not None else float((reward or 0) > 0)


@dataclass
class Sample:
    prompt_ids: list[int]
    """Prompt token ids exactly as the engine saw them."""
    response_ids: list[int] = field(default_factory=list)
    """Generated token ids (for multi-turn: all turns after the prompt, tool outputs included)."""
    logprobs: list[float] = field(default_factory=list)
    """The engine's fp32 log-prob of each response token (after temperature); 0 where not generated."""
    loss_mask: list[int] = field(default_factory=list)
    """1 for response tokens the policy generated (trained on), 0 for tokens it did not (tool output)."""
    reward: float | None = None
    """The scalar reward the advantage uses."""
    rewards: dict[str, float] = field(default_factory=dict)
    """Named reward components (e.g. correct, format, overlong)."""
    status: Status = Status.PENDING
    policy_version: int = 0
    """Weight version of the engines when it was requested: the policy that generated it, or in
    async mode, where a weight update may reach it while it generates, its first and oldest."""
    last_policy_version: int | None = None
    """Weight version of the engine that produced its last token, as the engine reported it (None
    where it did not): above policy_version for a partial rollout (async mode)."""
    group_id: int = -1
    """Samples of one prompt share a group id (GRPO's group)."""
    index: int = 0
    """Position in its group."""
    prompt_index: int = -1
    """Index of the prompt in its dataset."""
    label: Any = None
    """The reference answer the reward checks against."""
    routed_experts: list | None = None
    """[T, L_moe, K] expert ids of every token as the engine routed them (routing replay)."""
    metadata: dict = field(default_factory=dict)
    text: str = ""
    """Decoded response, for rewards and logs."""
    relabelled_from: dict | None = None
    """Hindsight relabelling (algorithm.hindsight): the problem the response was generated for
    ({"question", "label"}), the prompt being another one's that it answers rightly; None for a
    sample generated for its own prompt."""

    def __post_init__(self) -> None:
        self.status = Status(self.status)
        if not self.loss_mask and self.response_ids:
            self.loss_mask = [1] * len(self.response_ids)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def correct(self) -> float:
        """The "correct" reward component, or else 1.0 for a positive reward (pass rates, accuracy)."""
        return correct_of(self.rewards.get("correct"), self.reward)

    def to_dict(self) -> dict:
        """Plain data (status as its string), as actors exchange it. Shallow: the dict holds the
        sample's own lists (`dataclasses.asdict` deep-copied every token list: ~0.1 s of a
        256-sample rollout step here); Ray and JSON copy them on the way anyway."""
        d = {name: getattr(self, name) for name in _FIELD_NAMES}
        d["status"] = self.status.value
        if isinstance(self.metadata, dict):  # a group's samples may share one metadata dict
            d["metadata"] = dict(self.metadata)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> "Sample":
        return cls(**json.loads(s))


_FIELD_NAMES = tuple(f.name for f in fields(Sample))
"""Sample's field names, once (`dataclasses.fields` rebuilds its list on every call: ~5 us of each
`to_dict`, thousands a step)."""
