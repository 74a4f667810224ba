"""Schedules: learning-rate warm-up then cosine decay, and batch-size warm-up (GLM-4.5: warm-up to
2.5e-4, cosine to 2.5e-5; batch ramped from 16M to 64M tokens over the first 500B)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, peak: float, final: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to `final` at `total_steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * progress))


def batch_size_warmup(tokens_seen: int, start: int, end: int, ramp_tokens: int, multiple: int = 1) -> int:
    """Batch size (in sequences or tokens) growing linearly from `start` to `end` over the first
    `ramp_tokens` tokens, rounded down to a multiple of `multiple`."""
    if tokens_seen >= ramp_tokens:
        return end
    size = start + (end - start) * tokens_seen / ramp_tokens
    return max(multiple, int(size) // multiple * multiple)
