"""The rollout workshop: the inference engine, its HTTP server, and clients."""

from .engine import Engine, Output, RequestError, SamplingParams, sample

__all__ = ["Engine", "Output", "RequestError", "SamplingParams", "sample"]
