"""The rollout workshop: the inference engine, its HTTP server, and clients."""

from .engine import Engine, Output, RandomStream, RequestError, SamplingParams, sample

__all__ = ["Engine", "Output", "RandomStream", "RequestError", "SamplingParams", "sample"]
