"""The rollout workshop: the inference engine, its HTTP server, and clients."""

__all__ = ["Engine", "Output", "RandomStream", "RequestError", "SamplingParams", "sample"]


def __getattr__(name: str):
    # The engine (and torch with it) loads on first use, not with the package: the watchdog
    # (`python -m rlfoundry.rollout.watchdog`, one in front of every engine server and the router
    # an RL run starts) needs neither, and importing torch would add ~2 s to each of their starts.
    if name in __all__:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
